"""Lightning callbacks: the paper's Parzen-window evaluation, plus the figure and monitor callbacks.

:class:`ParzenEvaluation` follows the authors' ``parzen_ll.py``: 10,000 generator samples as window centres, sigma
chosen on validation images from ``logspace(-1, 0, 10)``, then the mean log-likelihood of the test images and its
standard error (numpy ``ddof=0``). It is exact on any number of DDP ranks: the centres are drawn in fixed-size noise
chunks seeded by chunk index and shared out, so they do not depend on the world size, and the test split is read
from the datamodule and sharded by rank (no DistributedSampler padding), so every test example counts exactly once.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Literal, get_args

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor

from lightning_gan._lightning import checkpoint_cadence
from lightning_gan.checks import check_positive_ints
from lightning_gan.figures import LatentInterpolation, SampleGrid
from lightning_gan.guards import check_samples
from lightning_gan.monitor import CollapseMonitor, GANProgressBar
from lightning_gan.parzen import ParzenLogLikelihood, check_min_sigma, select_sigma
from lightning_gan.sampling import datamodule_images, sampling_generator, seeded_samples

# The figure callbacks live in figures.py, the monitor and progress bar in monitor.py; importable from here too.
__all__ = [
    "CollapseMonitor",
    "GANProgressBar",
    "LatentInterpolation",
    "MatmulPrecision",
    "ParzenEvaluation",
    "SampleGrid",
]

MatmulPrecisionLevel = Literal["highest", "high", "medium"]


class MatmulPrecision(Callback):
    """Sets torch's float32 matmul precision (:func:`torch.set_float32_matmul_precision`) for a run, in every
    process, and puts the previous one back at its end.

    ``"high"`` lets CUDA use TF32 tensor cores (a 10-bit mantissa) for float32 matrix products: on an H200 the MNIST
    networks' captured update ran 1.33x faster (docs/results.md). Torch's default is ``"highest"`` (full
    float32), which the configs keep. :func:`~lightning_gan.parzen_log_likelihood` always computes at ``"highest"``.
    On a CPU it changes nothing.
    """

    def __init__(self, precision: MatmulPrecisionLevel = "high") -> None:
        if precision not in get_args(MatmulPrecisionLevel):
            raise ValueError(f"MatmulPrecision: precision must be 'highest', 'high' or 'medium', got {precision!r}.")
        self.precision = precision
        self._previous: str | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(self.precision)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore()  # a failed run never reaches ``teardown``

    def _restore(self) -> None:
        if self._previous is not None:
            torch.set_float32_matmul_precision(self._previous)
            self._previous = None


class ParzenEvaluation(Callback):
    """The paper's Parzen-window log-likelihood: sigma on validation every ``every_n_epochs``, the number on ``test``.

    Logs ``parzen/sigma`` and ``parzen/val_ll`` (mean validation LL at the chosen sigma) at validation epoch end, and
    ``parzen/test_ll``, ``parzen/test_se`` on ``test``, where it also prints a one-line result. The chosen sigma is
    saved in the callback's checkpoint state, with a fingerprint of the centres and validation images it was chosen
    on. A ``test`` run uses it for that same generator and validation split; it selects sigma on the validation split
    first when it has none, or when the generator or the split differ (a checkpoint saved between selections, another
    TFD fold), as the authors' script does for each model it evaluates. A sigma set by hand (``callback.sigma = s``)
    is used as given.

    Args:
        num_samples: generator samples used as window centres (the authors: 10,000), drawn from
            ``GAN.sampling_generator``: the generator's weight average when the GAN keeps one (``ema_decay``).
        every_n_epochs: select sigma (and log ``parzen/val_ll``) every this many validation epochs of ``fit``;
            ``validate`` always does.
        val_size: validation images used to choose sigma (the authors: the first 1,000 of MNIST's validation split;
            ``None``: the whole split, as for TFD's valid fold).
        sigmas: the sigma grid; default ``logspace(-1, 0, 10)``.
        test_size: evaluate only the first ``test_size`` test images (default: all).
        seed: seed of the centres' noise; the same seed gives the same centres on any number of ranks.
        chunk_size: noise vectors per seeded chunk (a fixed unit of work: changing it changes the centres).

    Raises:
        ValueError: for ``num_samples``, ``every_n_epochs``, ``val_size``, ``test_size`` or ``chunk_size`` < 1, or
            a sigma grid that is empty or has a non-positive value.
    """

    def __init__(
        self,
        num_samples: int = 10_000,
        every_n_epochs: int = 1,
        val_size: int | None = 1_000,
        sigmas: list[float] | None = None,
        test_size: int | None = None,
        seed: int = 1234,
        chunk_size: int = 500,
    ) -> None:
        counts = {"num_samples": num_samples, "every_n_epochs": every_n_epochs, "val_size": val_size}
        counts |= {"chunk_size": chunk_size, "test_size": test_size}
        check_positive_ints(counts, optional=("val_size", "test_size"))
        if sigmas is not None and (len(sigmas) == 0 or not all(math.isfinite(s) and s > 0 for s in sigmas)):
            raise ValueError(f"Expected `sigmas` to be a non-empty list of positive numbers, but got {sigmas!r}.")
        if sigmas is not None:
            check_min_sigma("sigmas", sigmas)  # refused here, not after the first epoch's training
        self.num_samples = num_samples
        self.every_n_epochs = every_n_epochs
        self.val_size = val_size
        self.sigmas = sigmas
        self.test_size = test_size
        self.seed = seed
        self.chunk_size = chunk_size
        self.sigma = None
        self._cut_warned: set[str] = set()

    @property
    def sigma(self) -> float | None:
        """The bandwidth used on ``test``: the latest one selected, one restored from a checkpoint, or one set."""
        return self._sigma

    @sigma.setter
    def sigma(self, value: float | None) -> None:
        self._sigma = value
        self._chosen_for: str | None = None  # the fingerprint of what it was selected on; None: set by hand

    def _fingerprint(self, centres: Tensor, valid: Tensor) -> str:
        """Identifies the generator's samples, the validation images and the grid that a selection saw."""
        digest = hashlib.blake2b(repr(self.sigmas).encode(), digest_size=16)
        for tensor in (centres, valid):
            digest.update(repr((tuple(tensor.shape), tensor.dtype)).encode())
            digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    # ------------------------------------------------------------------ centres, the same for any world size
    @torch.no_grad()
    def centres(self, trainer: Trainer, pl_module: LightningModule) -> Tensor:
        """``num_samples`` generator samples ``(M, D)``: chunk ``c`` from noise seeded ``seed + c``, made on rank
        ``c % world_size`` and gathered, so the result is the same on 1 process or N ranks."""
        world, rank = trainer.world_size, trainer.global_rank
        n_chunks = math.ceil(self.num_samples / self.chunk_size)
        generator, device = sampling_generator(pl_module), pl_module.device

        def sample(n: int, seed: int) -> Tensor:  # seeded noise leaves the training noise stream untouched
            return seeded_samples(generator, n, seed, device).flatten(1)

        chunks = [sample(self.chunk_size, self.seed + c) for c in range(rank, n_chunks, world)]
        dim = chunks[0].shape[1] if chunks else sample(1, self.seed).shape[1]  # a rank with no chunk
        per_rank = math.ceil(n_chunks / world)
        local = torch.zeros(per_rank, self.chunk_size, dim, device=pl_module.device)
        if chunks:
            local[: len(chunks)] = torch.stack(chunks)
        gathered = pl_module.all_gather(local) if world > 1 else local.unsqueeze(0)  # (W, per_rank, chunk, D)
        ordered = [gathered[c % world, c // world] for c in range(n_chunks)]
        centres = torch.cat(ordered)[: self.num_samples]
        check_samples(centres, trainer.global_step)  # every rank holds them all: all raise together
        return centres

    # ------------------------------------------------------------------ data
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Refuse, before any training, a datamodule without the images this callback will read, and a checkpoint
        callback that would look for ``parzen/*`` in epochs without it."""
        for split in ("val", "test") if stage == "test" else ("val",):
            datamodule_images(trainer.datamodule, split, "ParzenEvaluation")
        if stage == "fit":
            for checkpoint in trainer.checkpoint_callbacks:
                self._check_cadence(checkpoint)

    def _check_cadence(self, checkpoint: ModelCheckpoint) -> None:
        if not str(checkpoint.monitor).startswith("parzen/"):
            return
        every_n_train_steps, every_n_epochs, train_time_interval = checkpoint_cadence(checkpoint)
        if every_n_train_steps or train_time_interval or every_n_epochs % self.every_n_epochs:
            raise ValueError(
                f"ModelCheckpoint(monitor={checkpoint.monitor!r}) would look for it in epochs where ParzenEvaluation "
                f"does not log it (every {self.every_n_epochs} epochs): give the checkpoint `every_n_epochs` "
                f"{self.every_n_epochs} (or a multiple), and no `every_n_train_steps` or `train_time_interval`."
            )

    def _images(self, trainer: Trainer, split: str, limit: int | None) -> Tensor:
        images = datamodule_images(trainer.datamodule, split, "ParzenEvaluation")
        if limit is not None and limit > len(images) and split not in self._cut_warned:
            self._cut_warned.add(split)  # once per split, not at every selection
            rank_zero_warn(
                f"ParzenEvaluation: {split}_size={limit} is larger than the {split} split ({len(images)} images): "
                f"using all {len(images)}. Set {split}_size to at most {len(images)} (or null: the whole split)."
            )
        return images[:limit] if limit is not None else images

    # ------------------------------------------------------------------ sigma on validation
    def select(self, trainer: Trainer, pl_module: LightningModule, centres: Tensor | None = None) -> float:
        """Choose sigma on the first ``val_size`` validation images; every rank computes the same grid."""
        centres = self.centres(trainer, pl_module) if centres is None else centres
        valid = self._validation_images(trainer, centres.device)
        sigma, mean_ll = select_sigma(valid, centres, self.sigmas)
        self.sigma = float(sigma)
        self._chosen_for = self._fingerprint(centres, valid)
        self.val_ll = float(mean_ll.max())
        return self.sigma

    def _validation_images(self, trainer: Trainer, device: torch.device) -> Tensor:
        return self._images(trainer, "val", self.val_size).flatten(1).to(device)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn == "fit" and (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return  # `validate` of a checkpoint always reports it
        self.select(trainer, pl_module)
        # identical on every rank: sync_dist's mean leaves them as they are (and spares Lightning's DDP warning)
        pl_module.log("parzen/sigma", self.sigma, sync_dist=True)
        pl_module.log("parzen/val_ll", self.val_ll, prog_bar=True, sync_dist=True)

    # ------------------------------------------------------------------ the number, on test
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        centres = self.centres(trainer, pl_module)
        if self.sigma is None or (
            self._chosen_for is not None
            and self._chosen_for != self._fingerprint(centres, self._validation_images(trainer, centres.device))
        ):
            self.select(trainer, pl_module, centres)
        test = self._images(trainer, "test", self.test_size)
        metric = ParzenLogLikelihood(centres, self.sigma).to(pl_module.device)
        shard = test[trainer.global_rank :: trainer.world_size]  # each example on exactly one rank
        for start in range(0, len(shard), 1000):
            metric.update(shard[start : start + 1000].to(pl_module.device))
        mean, se = metric.compute()  # torchmetrics sums the states over ranks
        self.test_ll, self.test_se = float(mean), float(se)
        pl_module.log_dict(
            {"parzen/test_ll": self.test_ll, "parzen/test_se": self.test_se, "parzen/sigma": self.sigma},
            sync_dist=True,  # identical on every rank (see above)
        )
        dataset = getattr(trainer.datamodule, "dataset_name", None)
        self._print_result(f"{dataset} test" if isinstance(dataset, str) else "test", len(test))

    @rank_zero_only
    def _print_result(self, split: str, n_examples: int) -> None:
        print(
            f"Parzen log-likelihood ({split}): {self.test_ll:.1f} ± {self.test_se:.1f} nats, sigma {self.sigma:.4f}, "
            f"{self.num_samples} samples, {n_examples} examples",
            flush=True,
        )

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {"sigma": self.sigma, "chosen_for": self._chosen_for}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sigma = state_dict.get("sigma")
        # saved before fingerprints: what its sigma was chosen on is unknown, so `test` chooses it again
        self._chosen_for = state_dict.get("chosen_for", "unknown")
