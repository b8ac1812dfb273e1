"""The paper's figures as Lightning callbacks.

* :class:`SampleGrid`: samples from a fixed noise batch, optionally each beside its nearest training image (Figure 2).
* :class:`LatentInterpolation`: rows of samples along straight lines between pairs of noise vectors (Figure 3).

Grids go to every attached logger that takes images (W&B, TensorBoard) and, as PNG, to ``<run dir>/<key>/``, where
the run directory is the one that holds the checkpoints. Nearest neighbours come from the package's one distance
engine, :func:`lightning_gan.parzen.nearest_neighbours`. The monitor and progress bar are in
:mod:`lightning_gan.monitor`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid, save_image
from typing_extensions import override

from lightning_gan._lightning import callback_state_key
from lightning_gan.checks import check_positive_int
from lightning_gan.files import atomic_write
from lightning_gan.guards import check_samples
from lightning_gan.nets import eval_forward
from lightning_gan.parzen import nearest_neighbours
from lightning_gan.sampling import datamodule_images, sampling_generator, seeded_noise

__all__ = ["LatentInterpolation", "SampleGrid", "nearest_training_images", "run_dir"]

_YELLOW = torch.tensor([1.0, 1.0, 0.0])


def run_dir(trainer: Trainer) -> Path:
    """The run's directory, the one that holds its ``checkpoints/``: ``<save_dir>/<name>/<version>`` of the first
    logger (for W&B ``<save_dir>/<project>/<run id>``), or ``default_root_dir`` without a logger. Rank zero's answer.
    """
    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    version = logger.version
    version = version if isinstance(version, str) else f"version_{version}"
    return Path(logger.save_dir or trainer.default_root_dir) / str(logger.name) / version


def _to_display(datamodule: Any, images: Tensor) -> Tensor:
    """Images in data space to [0, 1] on the CPU, through ``datamodule.to_display`` when there is one."""
    images = images.detach().float().cpu()
    to_display = getattr(datamodule, "to_display", None)
    return (to_display(images) if callable(to_display) else images).clamp(0, 1)


def _rgb(images: Tensor) -> Tensor:
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def nearest_training_images(samples: Tensor, train: Tensor) -> tuple[Tensor, Tensor]:
    """For each sample (n, C, H, W), its nearest training image by L2 distance in data space.

    Returns ``(neighbours (n, C, H, W), index (n,))`` with ``neighbours = train[index]``; computed on ``train``'s
    device with the package's chunked distance engine, so memory stays bounded for any training-set size.
    """
    _, index = nearest_neighbours(samples.detach().to(train.device, train.dtype).flatten(1), train.flatten(1))
    return train[index], index


class _GridCallback(Callback):
    """Renders one grid every ``every_n_epochs`` training epochs and at the end of training (rank zero only)."""

    def __init__(self, key: str, every_n_epochs: int, seed: int, dirpath: str | Path | None) -> None:
        check_positive_int("every_n_epochs", every_n_epochs)
        if not key:
            raise ValueError("Expected `key` to be a non-empty name for the figure, e.g. 'samples'.")
        self.key, self.every_n_epochs, self.seed = key, every_n_epochs, seed
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.noise: Tensor | None = None  # fixed noise, saved in and restored from checkpoints
        self._last_step: int | None = None
        self._epoch_ended_at: tuple[int, int] | None = None  # (global_step, epoch) of the latest finished epoch

    @property
    @override
    def state_key(self) -> str:
        return callback_state_key(self, key=self.key)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"noise": self.noise}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.noise = state_dict.get("noise")

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._fixed_noise(pl_module)  # on every rank; a checkpoint's noise replaces it after setup

    def _num_noise(self) -> int:
        raise NotImplementedError

    def _fixed_noise(self, pl_module: LightningModule) -> Tensor:
        if self.noise is None or self.noise.shape[0] != self._num_noise():
            self.noise = seeded_noise(pl_module.generator, self._num_noise(), self.seed)
        return self.noise

    def make_grid(self, pl_module: LightningModule, datamodule: Any = None) -> Tensor:
        """The figure now, ``(3, H, W)`` in [0, 1]; ``datamodule`` supplies ``to_display`` and training images."""
        raise NotImplementedError

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_ended_at = (trainer.global_step, trainer.current_epoch)
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._emit(trainer, pl_module, trainer.current_epoch)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._last_step != trainer.global_step:  # training stopped mid-epoch or between two grids
            # After a finished epoch Lightning has already moved `current_epoch` on: name the epoch that trained.
            ended = self._epoch_ended_at
            epoch = ended[1] if ended is not None and ended[0] == trainer.global_step else trainer.current_epoch
            self._emit(trainer, pl_module, epoch)

    def _emit(self, trainer: Trainer, pl_module: LightningModule, epoch: int) -> None:
        """Send the grid to the loggers that take images and write it as PNG; rank zero only (no collectives)."""
        self._last_step = trainer.global_step
        if not trainer.is_global_zero:
            return
        grid = self.make_grid(pl_module, trainer.datamodule)
        step = trainer.global_step
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=self.key, images=[to_pil_image(grid)], step=step, caption=[f"epoch {epoch}"])
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(self.key, grid, global_step=step)
        folder = (self.dirpath or run_dir(trainer) / self.key).expanduser()
        atomic_write(folder / f"epoch={epoch:04d}-step={step}.png", lambda file: save_image(grid, file, format="png"))


class SampleGrid(_GridCallback):
    """Samples from one fixed noise batch as a grid, optionally each beside its nearest training image (Figure 2);
    drawn from ``GAN.sampling_generator`` (the generator's weight average when the GAN keeps one).

    Args:
        num_samples: samples in the grid.
        nrow: samples per grid row.
        every_n_epochs: render after every this many training epochs (and once when training ends).
        nearest_neighbours: put beside each sample its nearest training image (L2 in data space), outlined in yellow
            as in the paper's Figure 2; the grid then has ``2 * nrow`` columns.
        seed: seed of the fixed noise (the same on every rank; saved in checkpoints).
        key: name of the figure in the loggers and of its PNG folder.
        dirpath: folder for the PNGs (default ``<run dir>/<key>``).

    Raises:
        ValueError: for non-positive sizes, or (at fit start) ``nearest_neighbours`` without training images.
    """

    def __init__(
        self,
        num_samples: int = 100,
        nrow: int = 10,
        every_n_epochs: int = 1,
        nearest_neighbours: bool = False,
        seed: int = 0,
        key: str = "samples",
        dirpath: str | Path | None = None,
    ) -> None:
        super().__init__(key, every_n_epochs, seed, dirpath)
        check_positive_int("num_samples", num_samples)
        check_positive_int("nrow", nrow)
        self.num_samples, self.nrow, self.nearest_neighbours = num_samples, nrow, nearest_neighbours

    def _num_noise(self) -> int:
        return self.num_samples

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.nearest_neighbours and stage == "fit":
            datamodule_images(trainer.datamodule, "train", "SampleGrid(nearest_neighbours=True)")

    @override
    def make_grid(self, pl_module: LightningModule, datamodule: Any = None) -> Tensor:
        samples = eval_forward(
            sampling_generator(pl_module), self._fixed_noise(pl_module), pl_module.device
        )  # (n, C, H, W)
        if not self.nearest_neighbours:
            return make_grid(_rgb(_to_display(datamodule, samples)), nrow=self.nrow, pad_value=1.0)
        check_samples(samples, pl_module.global_step, "SampleGrid's nearest neighbours")
        neighbours, _ = nearest_training_images(samples, datamodule_images(datamodule, "train", "SampleGrid"))
        framed = _rgb(_to_display(datamodule, neighbours)).clone()
        yellow = _YELLOW.view(1, 3, 1)
        framed[:, :, 0, :] = framed[:, :, -1, :] = yellow
        framed[:, :, :, 0] = framed[:, :, :, -1] = yellow
        pairs = torch.stack([_rgb(_to_display(datamodule, samples)), framed], dim=1).flatten(0, 1)  # s0, nn0, s1, ...
        return make_grid(pairs, nrow=2 * self.nrow, pad_value=1.0)


class LatentInterpolation(_GridCallback):
    """Rows of samples along straight lines ``(1 - t) z_a + t z_b`` between fixed random noise pairs (Figure 3).

    Args:
        num_rows: pairs ``(z_a, z_b)``, one grid row each.
        num_steps: images per row, ``t`` evenly spaced from 0 to 1.
        every_n_epochs, seed, key, dirpath: as for :class:`SampleGrid`.

    Raises:
        ValueError: for non-positive sizes or ``num_steps < 2``.
    """

    def __init__(
        self,
        num_rows: int = 8,
        num_steps: int = 10,
        every_n_epochs: int = 1,
        seed: int = 0,
        key: str = "interpolations",
        dirpath: str | Path | None = None,
    ) -> None:
        super().__init__(key, every_n_epochs, seed, dirpath)
        check_positive_int("num_rows", num_rows)
        if not isinstance(num_steps, int) or num_steps < 2:
            raise ValueError(
                f"Expected `num_steps` to be an integer >= 2 (both ends of a line), but got {num_steps!r}."
            )
        self.num_rows, self.num_steps = num_rows, num_steps

    def _num_noise(self) -> int:
        return 2 * self.num_rows

    @override
    def make_grid(self, pl_module: LightningModule, datamodule: Any = None) -> Tensor:
        z_a, z_b = self._fixed_noise(pl_module).chunk(2)  # (rows, *noise shape) each
        t = torch.linspace(0, 1, self.num_steps, dtype=z_a.dtype).view(1, -1, *[1] * (z_a.ndim - 1))
        z = ((1 - t) * z_a.unsqueeze(1) + t * z_b.unsqueeze(1)).flatten(0, 1)  # (rows * steps, *noise shape)
        images = eval_forward(sampling_generator(pl_module), z, pl_module.device)
        return make_grid(_rgb(_to_display(datamodule, images)), nrow=self.num_steps, pad_value=1.0)
