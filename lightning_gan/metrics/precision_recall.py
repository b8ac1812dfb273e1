"""Improved precision and recall (Kynkäänniemi et al., 2019) on features, with k-nearest-neighbour radii.

A fake sample is *precise* if it falls inside the k-NN ball of some real sample; a real sample is *recalled* if it
falls inside the k-NN ball of some fake sample. The callback's features are L2-normalised first (``normalize``): in
raw ReLU feature space the classifier maps ambiguous images (e.g. two digits averaged) near the origin, where the
large balls of atypical real digits cover them (docs/quality.md). All distances come from the package's
chunked distance engine (:func:`lightning_gan.parzen.pairwise_sq_dists_chunks`): memory is bounded by its blocks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_gan.parzen import pairwise_sq_dists_chunks

__all__ = ["PrecisionRecall", "knn_radii", "precision_recall"]


def knn_radii(features: Tensor, k: int = 3) -> Tensor:
    """Squared distance of each row of ``features`` (N, d) to its ``k``-th nearest other row: (N,) float32."""
    if not isinstance(k, int) or k < 1 or features.shape[0] <= k:
        raise ValueError(f"k={k!r} needs a positive integer below the number of points ({features.shape[0]}).")
    best = torch.full((features.shape[0], k + 1), torch.inf, device=features.device)
    for rows, _, d2 in pairwise_sq_dists_chunks(features, features):
        merged = torch.cat([best[rows], d2.float()], 1)
        best[rows] = merged.topk(k + 1, dim=1, largest=False, sorted=True).values
    return best[:, k]  # column 0 is the point itself


def precision_recall(
    real: Tensor, fake: Tensor, k: int = 3, real_radii: Tensor | None = None, fake_radii: Tensor | None = None
) -> tuple[float, float]:
    """``(precision, recall)`` of ``fake`` (M, d) against ``real`` (N, d); radii are computed when not given."""
    real_radii = knn_radii(real, k) if real_radii is None else real_radii
    fake_radii = knn_radii(fake, k) if fake_radii is None else fake_radii
    precise = torch.zeros(fake.shape[0], dtype=torch.bool, device=fake.device)
    recalled = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)
    for rows, cols, d2 in pairwise_sq_dists_chunks(fake, real):  # d2[i, j] = ||fake_i - real_j||^2
        precise[rows] |= (d2 <= real_radii[cols][None, :]).any(1)
        recalled[cols] |= (d2 <= fake_radii[rows][:, None]).any(0)
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
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}.")
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
