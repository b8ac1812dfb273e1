"""Watching a run: a monitor for the "Helvetica scenario", and the progress bar.

* :class:`CollapseMonitor`: the balance of the game (mean D(x), D(G(z))) and the diversity of the samples, with one
  warning when the generator looks collapsed.
* :class:`GANProgressBar`: Lightning's rich progress bar showing the losses and the latest Parzen estimate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_gan._lightning import should_update_logs
from lightning_gan.checks import check_positive_int
from lightning_gan.guards import check_samples
from lightning_gan.nets import eval_forward
from lightning_gan.parzen import nearest_neighbours, pairwise_sq_dists_chunks
from lightning_gan.sampling import datamodule_images, seeded_noise

__all__ = ["CollapseMonitor", "GANProgressBar"]


def _spread(x: Tensor) -> tuple[float, float]:
    """Mean distance between distinct rows of ``x`` (n, D), n >= 2, and the median distance from a row to its nearest
    other row, with the chunked distance engine."""
    total, nearest = 0.0, torch.full((x.shape[0],), float("inf"), dtype=torch.float64, device=x.device)
    for rows, cols, d2 in pairwise_sq_dists_chunks(x, x):
        i = torch.arange(rows.start, rows.stop, device=x.device)[:, None]
        j = torch.arange(cols.start, cols.stop, device=x.device)[None, :]
        d = d2.double().sqrt()
        total += float(d.masked_fill(i == j, 0).sum())
        nearest[rows] = torch.minimum(nearest[rows], d.masked_fill(i == j, float("inf")).amin(1))
    return total / (x.shape[0] * (x.shape[0] - 1)), float(nearest.median())


class CollapseMonitor(Callback):
    """The balance of the game and the diversity of the samples, checked at the end of validation epochs.

    Logs, from ``num_samples`` samples of a fixed noise batch and as many fixed validation images (D and G in eval
    mode, distances in data space; G is the generator that trains, not its weight average: the monitor watches the
    game):

    * ``monitor/d_real`` and ``monitor/d_fake``: mean D(x) and D(G(z)) (both 1/2 at the game's equilibrium);
    * ``monitor/distinct_neighbours``: distinct nearest training images (among ``num_reference`` fixed ones) of the
      samples, over ``num_samples``: about 1 for data-like samples (noisy samples share a few neighbours too);
    * ``monitor/relative_distance``: mean pairwise distance of the samples over that of training images;
    * ``monitor/relative_nn_distance``: median distance from a sample to its nearest other sample, over the same for
      training images: near 0 when many z give (nearly) the same x, even if there are a few such modes.

    Both relative distances are about 1 for data-like samples and 0 for a generator with one output. Warns once when
    one of them is below its threshold at ``patience`` checks in a row: the generator collapsing many z to one x, the
    paper's "Helvetica scenario" (early in training many samples are near-duplicates for a while: on MNIST with
    configs/quickstart.yaml, ``relative_nn_distance`` was .08 after the first epoch and .32 after the second, so one
    check alone would warn too early). Under DDP every rank computes the same numbers from the same seeds.

    Args:
        num_samples: samples (and validation images) per check, >= 2.
        num_reference: training images searched for nearest neighbours (a fixed random subset).
        every_n_epochs: check after every this many validation epochs (never during the sanity check).
        min_relative_distance: warn below this ``relative_distance`` (0 switches it off).
        min_relative_nn_distance: warn below this ``relative_nn_distance`` (0 switches it off).
        patience: consecutive checks below a threshold before the warning.
        seed: seed of the fixed noise and of the fixed image subsets.

    Raises:
        ValueError: for bad sizes or thresholds, or (at setup) a datamodule without ``splits.train/val.images``.
    """

    def __init__(
        self,
        num_samples: int = 1000,
        num_reference: int = 10000,
        every_n_epochs: int = 1,
        min_relative_distance: float = 0.2,
        min_relative_nn_distance: float = 0.1,
        patience: int = 2,
        seed: int = 0,
    ) -> None:
        if not isinstance(num_samples, int) or num_samples < 2:
            raise ValueError(f"Expected `num_samples` to be an integer >= 2, but got {num_samples!r}.")
        check_positive_int("num_reference", num_reference)
        check_positive_int("every_n_epochs", every_n_epochs)
        check_positive_int("patience", patience)
        for name, value in (
            ("min_relative_distance", min_relative_distance),
            ("min_relative_nn_distance", min_relative_nn_distance),
        ):
            if not 0 <= value <= 1:
                raise ValueError(f"Expected `{name}` in [0, 1] (0 switches that check off), but got {value!r}.")
        self.num_samples, self.num_reference, self.every_n_epochs = num_samples, num_reference, every_n_epochs
        self.min_relative_distance, self.min_relative_nn_distance = min_relative_distance, min_relative_nn_distance
        self.patience, self.seed = patience, seed
        self.noise: Tensor | None = None
        self.warned, self.collapsed_checks = False, 0
        self._reference: Tensor | None = None  # (num_reference, D) training images
        self._real: Tensor | None = None  # (num_samples, C, H, W) validation images
        self._data_spread: tuple[float, float] | None = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"noise": self.noise, "warned": self.warned, "collapsed_checks": self.collapsed_checks}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.noise, self.warned = state_dict.get("noise"), bool(state_dict.get("warned", False))
        self.collapsed_checks = int(state_dict.get("collapsed_checks", 0))

    def _subset(self, images: Tensor, n: int, offset: int) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed + offset)
        return images[torch.randperm(images.shape[0], generator=generator)[:n]]

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage not in ("fit", "validate"):
            return
        train = datamodule_images(trainer.datamodule, "train", "CollapseMonitor")
        val = datamodule_images(trainer.datamodule, "val", "CollapseMonitor")
        self._reference = self._subset(train, self.num_reference, 0).flatten(1)
        self._real = self._subset(val, self.num_samples, 1)
        self._data_spread = _spread(self._subset(train, self.num_samples, 2).flatten(1).float())

    @torch.no_grad()
    def measure(self, pl_module: LightningModule) -> dict[str, float]:
        """The numbers described above, for the module as it is now (call after ``setup``)."""
        if self._reference is None or self._real is None or self._data_spread is None:
            raise RuntimeError("CollapseMonitor.measure() needs the data: call it from a Trainer (after setup).")
        if self.noise is None or self.noise.shape[0] != self.num_samples:
            self.noise = seeded_noise(pl_module.generator, self.num_samples, self.seed)
        # moved once to the module's device (at `setup` the module may not be there yet)
        self._reference, self._real = self._reference.to(pl_module.device), self._real.to(pl_module.device)
        samples = eval_forward(pl_module.generator, self.noise, pl_module.device)
        check_samples(samples, pl_module.global_step, "CollapseMonitor")
        d_real = torch.sigmoid(eval_forward(pl_module.discriminator, self._real, pl_module.device).float()).mean()
        d_fake = torch.sigmoid(eval_forward(pl_module.discriminator, samples, pl_module.device).float()).mean()
        flat = samples.flatten(1).to(self._reference)
        _, index = nearest_neighbours(flat, self._reference)
        (mean, nn), (data_mean, data_nn) = _spread(flat), self._data_spread
        return {
            "monitor/d_real": float(d_real),
            "monitor/d_fake": float(d_fake),
            "monitor/distinct_neighbours": index.unique().numel() / self.num_samples,
            "monitor/relative_distance": mean / max(data_mean, 1e-12),
            "monitor/relative_nn_distance": nn / max(data_nn, 1e-12),
        }

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        metrics = self.measure(pl_module)
        # the same on every rank: sync_dist's mean leaves them as they are (and spares Lightning's DDP warning)
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True)
        spread, nn = metrics["monitor/relative_distance"], metrics["monitor/relative_nn_distance"]
        collapsed = spread < self.min_relative_distance or nn < self.min_relative_nn_distance
        self.collapsed_checks = self.collapsed_checks + 1 if collapsed else 0
        if not self.warned and self.collapsed_checks >= self.patience:
            self.warned = True
            found = round(metrics["monitor/distinct_neighbours"] * self.num_samples)
            rank_zero_warn(
                f"The generator looks collapsed at epoch {trainer.current_epoch}, {self.collapsed_checks} checks in a "
                f"row (the paper's 'Helvetica scenario': many z mapped to one x): its {self.num_samples} fixed "
                f"samples are {spread:.3f} times as far apart "
                f"as training images on average (threshold {self.min_relative_distance}), their nearest other "
                f"sample is {nn:.3f} times as far as a training image's (threshold {self.min_relative_nn_distance}), "
                f"and they have {found} distinct nearest training images. Look at the sample grid; if it shows few "
                "distinct images, update the discriminator more often (larger `k`), lower the generator's learning "
                "rate, or restart from an earlier checkpoint. This warning is shown once."
            )


class GANProgressBar(RichProgressBar):
    """Lightning's rich progress bar, also showing the latest values of ``metrics`` whether or not they were logged
    with ``prog_bar=True`` (by default the losses and the Parzen validation log-likelihood, once it is logged).

    Args:
        metrics: logged names to show; a leading ``train/`` is dropped from the label.
        refresh_rate: redraw every this many training batches (and at the last of the epoch). Lightning's rich bar
            redraws on every batch whatever its ``refresh_rate``, which costs more host time than a whole update on
            the GPU fast path.
        leave, theme: as for :class:`~lightning.pytorch.callbacks.RichProgressBar`.
    """

    def __init__(
        self,
        metrics: Sequence[str] = ("train/d_loss", "train/g_loss", "parzen/val_ll"),
        refresh_rate: int = 10,
        leave: bool = False,
        theme: RichProgressBarTheme | None = None,
    ) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave, theme=theme or RichProgressBarTheme())
        self.metrics = list(metrics)
        self._shown: dict[str, float] = {}

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.is_disabled:
            return
        if (batch_idx + 1) % self.refresh_rate == 0 or batch_idx + 1 == self.total_train_batches:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        # `float()` of a device tensor is a host sync on a GPU: refresh the values only on the steps whose metrics go
        # to the loggers (which sync there anyway), and show the last ones in between.
        if not self._shown or should_update_logs(trainer):
            self._shown = {
                name.removeprefix("train/"): float(value)
                for name in self.metrics
                if (value := trainer.callback_metrics.get(name)) is not None
            }
        items.update(self._shown)
        return items
