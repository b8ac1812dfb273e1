"""Improved precision and recall (Kynkäänniemi et al., 2019) on features, with k-nearest-neighbour radii.

A fake sample is *precise* if it falls inside the k-NN ball of some real sample; a real sample is *recalled* if it
falls inside the k-NN ball of some fake sample. The callback's features are L2-normalised first (``normalize``): in
raw ReLU feature space the classifier maps ambiguous images (e.g. two digits averaged) near the origin, where the
large balls of atypical real digits cover them (docs/quality.md). All distances come from the package's
chunked distance engine (``lightning_gan.parzen``'s blocks under ``pairwise_sq_dists_chunks``, before the row norms
are added): memory is bounded by its blocks.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

# the engine's blocks before the row norms are added: comparisons and top-k need no fresh (N x M) tensor
from lightning_gan.checks import check_positive_int
from lightning_gan.parzen import _Centres, _check_pair, _chunks, _compute_dtype, _partial_blocks

__all__ = ["PrecisionRecall", "knn_radii", "precision_recall"]


def _blocks(x: Tensor, y: Tensor) -> Iterator[tuple[int, int, int, int, Tensor, Tensor]]:
    """``(i0, i1, j0, j1, P, xx)`` with ``||x_i - y_j||^2 = P + xx``; ``P`` is reused by the next block."""
    x, y = _check_pair("x", x, "y", y)
    chunk_x, chunk_y = _chunks(x.device, None, None)
    return _partial_blocks(x, _Centres(y, chunk_y, _compute_dtype(x, y, None)), chunk_x)


def knn_radii(features: Tensor, k: int = 3) -> Tensor:
    """Squared distance of each row of ``features`` (N, d) to its ``k``-th nearest other row: (N,) float32."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or features.shape[0] <= k:
        raise ValueError(f"k={k!r} needs a positive integer below the number of points ({features.shape[0]}).")
    best = torch.full((features.shape[0], k + 1), torch.inf, device=features.device)
    for i0, i1, _, _, p, xx in _blocks(features, features):
        block = p.topk(min(k + 1, p.shape[1]), dim=1, largest=False).values.double() + xx[:, None]  # row order is P's
        best[i0:i1] = torch.cat([best[i0:i1], block.float()], 1).topk(k + 1, dim=1, largest=False).values
    return best.sort(1).values[:, k].clamp_min(0)  # column 0 is the point itself


def precision_recall(
    real: Tensor, fake: Tensor, k: int = 3, real_radii: Tensor | None = None, fake_radii: Tensor | None = None
) -> tuple[float, float]:
    """``(precision, recall)`` of ``fake`` (M, d) against ``real`` (N, d); radii are computed when not given."""
    real_radii = knn_radii(real, k) if real_radii is None else real_radii
    fake_radii = knn_radii(fake, k) if fake_radii is None else fake_radii
    precise = torch.zeros(fake.shape[0], dtype=torch.bool, device=fake.device)
    recalled = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)
    for i0, i1, j0, j1, p, xx in _blocks(fake, real):  # ||fake_i - real_j||^2 = p[i, j] + xx[i]
        recalled[j0:j1] |= (p <= (fake_radii[i0:i1].double() - xx).to(p.dtype)[:, None]).any(0)
        p.sub_(real_radii[j0:j1].to(p.dtype)[None, :])  # in place: the block is not read again
        precise[i0:i1] |= p.amin(1).double() <= -xx
    return float(precise.float().mean()), float(recalled.float().mean())


class PrecisionRecall(Metric):
    """Improved precision and recall of fake images against real ones, on ``feature(images)`` (N, d).

    ``update(images, real)`` as torchmetrics' ``FrechetInceptionDistance``; the features of each side are gathered
    across processes in rank order, L2-normalised first when ``normalize``. With ``reset_real_features=False``
    (default) the real features, and their k-NN radii, are kept across ``reset()``. ``compute()`` returns
    ``(precision, recall)`` as 0-d tensors.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    real_features: list[Tensor]
    fake_features: list[Tensor]

    def __init__(
        self,
        feature: nn.Module,
        k: int = 3,
        normalize: bool = True,
        reset_real_features: bool = False,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if not isinstance(feature, nn.Module):
            raise TypeError(f"feature must be an nn.Module returning (N, d) features, got {type(feature).__name__}.")
        check_positive_int("k", k)
        self.feature, self.k, self.normalize, self.reset_real_features = feature, k, normalize, reset_real_features
        self.add_state("real_features", [], dist_reduce_fx="cat")
        self.add_state("fake_features", [], dist_reduce_fx="cat")
        self.real_radii: Tensor | None = None

    def update(self, imgs: Tensor, real: bool) -> None:
        """Add the features of a batch of real or fake images."""
        features = self.feature(imgs).float()
        if self.normalize:
            features = nn.functional.normalize(features, dim=1)
        (self.real_features if real else self.fake_features).append(features)
        if real:
            self.real_radii = None

    def compute(self) -> tuple[Tensor, Tensor]:
        """``(precision, recall)``."""
        real, fake = dim_zero_cat(self.real_features), dim_zero_cat(self.fake_features)
        if self.real_radii is None or self.real_radii.shape[0] != real.shape[0]:
            self.real_radii = knn_radii(real, self.k)
        precision, recall = precision_recall(real, fake, self.k, real_radii=self.real_radii)
        return torch.tensor(precision), torch.tensor(recall)

    def reset(self) -> None:
        """Reset the fake features (and the real ones when ``reset_real_features``)."""
        if self.reset_real_features:
            super().reset()
            self.real_radii = None
            return
        kept = list(self.real_features)  # torchmetrics clears list states in place
        super().reset()
        self.real_features = kept
