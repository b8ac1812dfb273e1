"""Sample quality beyond Parzen: FID, KID, improved precision/recall and the classifier score, as a callback.

By default every statistic is computed on the package's MNIST classifier (:func:`lightning_gan.mnist_classifier`):
its numbers are not comparable with the Inception-based FIDs of papers, nor across feature extractors.

World-size invariance: sample chunk ``c`` is drawn from noise seeded ``seed + c``; rank ``r`` draws a contiguous
block of chunks, and takes a contiguous block of the reference images, so that torchmetrics' rank-ordered gather
rebuilds exactly the one-process order. The random subsets of KID are drawn from ``seed`` too, and ``compute()``
runs on every rank (a rank-zero-only compute would hang in its gather).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

from lightning_gan.checks import check_positive_ints
from lightning_gan.distributed import all_reduce
from lightning_gan.guards import diverged_generator
from lightning_gan.metrics.classifier import FeatureExtractor, mnist_classifier
from lightning_gan.metrics.precision_recall import PrecisionRecall
from lightning_gan.sampling import datamodule_images, sampling_generator, seeded_samples

__all__ = ["SampleQuality"]


class _Shared(nn.Module):
    """``module(x)``, computed once for the same input tensor however many metrics ask for it."""

    def __init__(self, module: nn.Module, num_features: int) -> None:
        super().__init__()
        self.module, self.num_features = module, num_features
        self.last: tuple[Tensor, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.last is None or self.last[0] is not x:
            self.last = (x, self.module(x))
        return self.last[1]


class _HeadOn(nn.Module):
    """The MNIST classifier's logits from its shared features (no second pass through its body)."""

    def __init__(self, features: _Shared, head: nn.Module) -> None:
        super().__init__()
        self.features, self.head = features, head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@dataclass
class _Metrics:
    """One reference split's metrics; their real statistics are kept across evaluations."""

    fid: FrechetInceptionDistance
    kid: KernelInceptionDistance
    pr: PrecisionRecall
    score: InceptionScore | None
    features: _Shared
    has_real: bool = False

    def all(self) -> list:
        return [m for m in (self.fid, self.kid, self.pr, self.score) if m is not None]


class SampleQuality(Callback):
    """FID, KID, improved precision/recall (k-NN radii) and the classifier score of the generator's samples.

    Logs ``quality/fid``, ``quality/kid_mean``, ``quality/kid_std``, ``quality/precision``, ``quality/recall`` and
    ``quality/classifier_score`` against the validation split every ``every_n_epochs`` validation epochs, and
    against the test split on ``test``, where it prints a one-line result. The reference statistics are computed once
    per split and kept. The feature networks are attributes of the callback, not of the GAN: they are never saved in
    its checkpoint.

    Args:
        num_samples: generator samples per evaluation, drawn from ``GAN.sampling_generator``.
        every_n_epochs: evaluate every this many validation epochs.
        feature: an ``nn.Module`` mapping images (N, C, H, W) in data space to features (N, d), e.g. an Inception
            network for CIFAR-10; default: the MNIST classifier's penultimate features.
        classifier: an ``nn.Module`` giving class logits (N, classes) for the classifier score; default: the MNIST
            classifier when ``feature`` is the default, else no classifier score.
        k: neighbours of the precision/recall radii (Kynkäänniemi et al.: 3).
        kid_subsets, kid_subset_size: KID's random subsets: 10 of 1,000 (torchmetrics' default is 100 of 1,000,
            ten times the cost: 27 s of CPU time per evaluation here; docs/quality.md).
        reference_size: use only the first this many reference images (default: the whole split).
        seed: seed of the samples' noise and of KID's subsets.
        chunk_size: noise vectors per seeded chunk (changing it changes the samples).

    Raises:
        ValueError: for a non-positive count, or a ``kid_subset_size`` above ``num_samples``.
    """

    def __init__(
        self,
        num_samples: int = 10_000,
        every_n_epochs: int = 1,
        feature: nn.Module | None = None,
        classifier: nn.Module | None = None,
        k: int = 3,
        kid_subsets: int = 10,
        kid_subset_size: int = 1000,
        reference_size: int | None = None,
        seed: int = 4321,
        chunk_size: int = 500,
    ) -> None:
        counts = {"num_samples": num_samples, "every_n_epochs": every_n_epochs, "k": k, "kid_subsets": kid_subsets}
        counts |= {"kid_subset_size": kid_subset_size, "reference_size": reference_size, "chunk_size": chunk_size}
        check_positive_ints(counts, optional=("reference_size",))
        if kid_subset_size > num_samples or (reference_size is not None and kid_subset_size > reference_size):
            raise ValueError(
                f"kid_subset_size={kid_subset_size} is larger than num_samples={num_samples} or reference_size="
                f"{reference_size}; KID draws subsets of that size from both: lower kid_subset_size."
            )
        for name, value in (("feature", feature), ("classifier", classifier)):
            if value is not None and not isinstance(value, nn.Module):
                raise TypeError(f"`{name}` must be an nn.Module (or None for the default), got {type(value).__name__}.")
        if feature is None:
            net = mnist_classifier()
            self.feature: nn.Module = FeatureExtractor(net)
            self.classifier: nn.Module | None = net if classifier is None else classifier
            self.feature_name = "MNIST classifier"
        else:
            self.feature, self.classifier = feature, classifier
            self.feature_name = type(feature).__name__
        self.feature.eval().requires_grad_(False)
        if self.classifier is not None:
            self.classifier.eval().requires_grad_(False)
        self.num_samples, self.every_n_epochs, self.k = num_samples, every_n_epochs, k
        self.kid_subsets, self.kid_subset_size = kid_subsets, kid_subset_size
        self.reference_size, self.seed, self.chunk_size = reference_size, seed, chunk_size
        self.metrics: dict[str, _Metrics] = {}
        self.results: dict[str, float] = {}

    # ------------------------------------------------------------------ metrics
    def _build(self, images: Tensor, device: torch.device) -> _Metrics:
        self.feature.to(device)
        num_features = getattr(self.feature, "num_features", None)
        if num_features is None:  # one real image tells the feature size
            with torch.no_grad():
                num_features = int(self.feature(images[:2].to(device)).shape[-1])
        shared = _Shared(self.feature, int(num_features))
        score, classifier = None, self.classifier
        if isinstance(self.feature, FeatureExtractor) and classifier is self.feature.classifier:
            classifier = _HeadOn(shared, classifier.head)
        with warnings.catch_warnings():  # "will save all extracted features in buffer": 10,000 x d, as intended
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            if classifier is not None:
                score = InceptionScore(feature=classifier, splits=1)
            metrics = _Metrics(
                fid=FrechetInceptionDistance(feature=shared, reset_real_features=False, normalize=True),
                kid=KernelInceptionDistance(
                    feature=shared,
                    subsets=self.kid_subsets,
                    subset_size=self.kid_subset_size,
                    reset_real_features=False,
                    normalize=True,
                ),
                pr=PrecisionRecall(shared, k=self.k),
                score=score,
                features=shared,
            )
        for metric in metrics.all():
            metric.to(device)
        return metrics

    # ------------------------------------------------------------------ data
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Refuse, before any training, a datamodule without the reference images, or images the default MNIST
        classifier cannot read."""
        for split in ("val", "test") if stage == "test" else ("val",):
            images = datamodule_images(trainer.datamodule, split, "SampleQuality")
            if isinstance(self.feature, FeatureExtractor) and tuple(images.shape[1:]) != (1, 28, 28):
                raise ValueError(
                    f"SampleQuality's default features come from the MNIST classifier, for (1, 28, 28) images; this "
                    f"data has {tuple(images.shape[1:])}: pass `feature=` a module for it (docs/quality.md)."
                )
            if len(images[: self.reference_size]) < self.kid_subset_size:
                raise ValueError(
                    f"SampleQuality: the {split} split has {len(images)} images, fewer than kid_subset_size="
                    f"{self.kid_subset_size}; lower kid_subset_size."
                )

    def _reference(self, trainer: Trainer, split: str) -> Tensor:
        return datamodule_images(trainer.datamodule, split, "SampleQuality")[: self.reference_size]

    @torch.no_grad()
    def _samples(self, trainer: Trainer, pl_module: LightningModule, shape: tuple[int, ...]) -> list[Tensor]:
        """This rank's contiguous block of the seeded sample chunks (chunk ``c`` from noise seeded ``seed + c``);
        a :class:`~lightning_gan.guards.NonFiniteError` on every rank when a rank's samples hold NaN/Inf."""
        n_chunks = math.ceil(self.num_samples / self.chunk_size)
        per_rank = math.ceil(n_chunks / trainer.world_size)
        generator, device = sampling_generator(pl_module), pl_module.device
        chunks = []
        for c in range(trainer.global_rank * per_rank, min(n_chunks, (trainer.global_rank + 1) * per_rank)):
            n = min(self.chunk_size, self.num_samples - c * self.chunk_size)
            chunks.append(seeded_samples(generator, n, self.seed + c, device).reshape(n, *shape).float())
        bad = torch.tensor(sum(int((~torch.isfinite(chunk)).sum()) for chunk in chunks), device=device)
        if bad := int(all_reduce(bad, "sum")):  # summed over the ranks: every rank raises together
            raise diverged_generator(bad, trainer.global_step, "SampleQuality")
        return chunks

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, trainer: Trainer, pl_module: LightningModule, split: str) -> dict[str, float]:
        """Every statistic of ``num_samples`` samples against the ``split`` images; the same on every rank."""
        reference = self._reference(trainer, split)
        per_rank = math.ceil(len(reference) / trainer.world_size)
        shard = reference[trainer.global_rank * per_rank : (trainer.global_rank + 1) * per_rank]
        samples = self._samples(trainer, pl_module, tuple(reference.shape[1:]))
        return self.measure(split, shard, samples, pl_module.device)

    @torch.no_grad()
    def measure(
        self, key: str, reference: Tensor, samples: list[Tensor], device: torch.device | str = "cpu"
    ) -> dict[str, float]:
        """The statistics of the batches ``samples`` against the images ``reference`` (this process's shares of
        both). The reference statistics are computed on the first call for ``key`` and kept for later ones."""
        device = torch.device(device)
        metrics = self.metrics.get(key)
        if metrics is None or metrics.fid.device != device:
            metrics = self.metrics[key] = self._build(reference, device)
        if not metrics.has_real:
            for batch in reference.split(1000):
                batch = batch.to(device).float()
                for metric in (metrics.fid, metrics.kid, metrics.pr):
                    metric.update(batch, real=True)
            metrics.has_real = True
        for batch in samples:
            batch = batch.to(device).float()
            for metric in (metrics.fid, metrics.kid, metrics.pr):
                metric.update(batch, real=False)
            if metrics.score is not None:
                metrics.score.update(batch)
        metrics.features.last = None
        with torch.random.fork_rng(devices=[]):  # KID's subsets: seeded, and the training stream left as it was
            torch.manual_seed(self.seed)
            fid = metrics.fid.compute()
            kid_mean, kid_std = metrics.kid.compute()
            precision, recall = metrics.pr.compute()
            results = {
                "quality/fid": float(fid),
                "quality/kid_mean": float(kid_mean),
                "quality/kid_std": float(kid_std),
                "quality/precision": float(precision),
                "quality/recall": float(recall),
            }
            if metrics.score is not None:
                with warnings.catch_warnings():  # one split: its std is undefined (NaN), and not used
                    warnings.filterwarnings("ignore", message=".*degrees of freedom.*")
                    results["quality/classifier_score"] = float(metrics.score.compute()[0])
        for metric in metrics.all():
            metric.reset()  # the fake side; the real statistics stay
        self.results = results
        return results

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        results = self.evaluate(trainer, pl_module, "val")
        pl_module.log_dict(results, sync_dist=True)  # identical on every rank: the mean leaves them as they are

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        results = self.evaluate(trainer, pl_module, "test")
        pl_module.log_dict(results, sync_dist=True)
        dataset = getattr(trainer.datamodule, "dataset_name", None)
        split = f"{dataset} test" if isinstance(dataset, str) else "test"
        self._print_result(split, len(self._reference(trainer, "test")))

    @rank_zero_only
    def _print_result(self, split: str, n_examples: int) -> None:
        r = self.results
        score = f", classifier score {r['quality/classifier_score']:.2f}" if "quality/classifier_score" in r else ""
        print(
            f"Sample quality ({split}, {self.feature_name} features): FID {r['quality/fid']:.2f}, "
            f"KID {r['quality/kid_mean']:.4f} ± {r['quality/kid_std']:.4f}, precision {r['quality/precision']:.3f}, "
            f"recall {r['quality/recall']:.3f}{score}; {self.num_samples} samples, {n_examples} examples",
            flush=True,
        )
