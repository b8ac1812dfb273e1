"""``GANDataModule``: the paper's datasets with the authors' splits, held in memory as float tensors."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_gan.checks import check_positive_int
from lightning_gan.datasets import (
    TFD_FOLDS,
    Split,
    Splits,
    global_contrast_normalize,
    load_cifar10,
    load_mnist,
    load_tfd,
)
from lightning_gan.resume import ResumableDataLoader

Preprocessing = Literal["scale", "gcn"]
TFDTrainSet = Literal["unlabeled", "train", "full_train"]
_LOADERS = {"mnist": load_mnist, "tfd": load_tfd, "cifar10": load_cifar10}
_DATASET_NAMES = {"mnist": "MNIST", "tfd": "TFD", "cifar10": "CIFAR-10"}


class InMemoryTensors(TensorDataset):
    """A ``TensorDataset`` that fetches a whole batch with one indexing op per tensor (the DataLoader's
    ``__getitems__`` protocol), on the tensors' own device: no per-example collation, and data kept on the GPU
    needs no host-to-device copy (only the batch's indices travel).

    Indices ``(B,)`` give tensors ``(B, ...)``; a stack of batches' indices ``(S, B)`` (a list of lists, or a tensor)
    gives tensors ``(S, B, ...)``."""

    def __getitems__(self, indices: list[int] | list[list[int]] | Tensor) -> list[Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long).to(self.tensors[0].device, non_blocking=True)
        if index.dim() == 1:
            return [t.index_select(0, index) for t in self.tensors]
        return [t.index_select(0, index.flatten()).view(*index.shape, *t.shape[1:]) for t in self.tensors]


def _whole_batch(batch: list[Tensor]) -> list[Tensor]:
    """Collate for :class:`InMemoryTensors`, whose ``__getitems__`` already returns the batch."""
    return batch


class GANDataModule(LightningDataModule):
    """MNIST, TFD or CIFAR-10 with the paper's splits; batches are ``(images (B, C, H, W), labels (B,))``, or stacks
    of them ``(images (S, B, C, H, W), labels (S, B))`` in training with ``steps_per_batch=S``.

    Args:
        dataset: ``"mnist"`` (train[0:50000] / train[50000:60000] / official test, ``(1, 28, 28)``),
            ``"cifar10"`` (train[0:40000] / train[40000:50000] / official test, ``(3, 32, 32)``) or ``"tfd"`` (one
            fold: ``tfd_train_set`` rows / ``valid`` rows / ``test`` rows, ``(1, s, s)``); any name for a subclass
            that loads its own data (:meth:`load_splits`).
        data_dir: folder holding the dataset: ``MNIST/raw/`` (IDX files), ``cifar-10-batches-py/`` (python
            batches) or ``TFD_48x48.mat`` / ``TFD_96x96.mat`` (obtained from the TFD owners).
        batch_size: examples per batch on each device (the authors: 100; 128 for the convolutional CIFAR-10 model).
        num_workers: DataLoader worker processes (the data is in memory: 0 is usually fastest).
        download: download missing MNIST or CIFAR-10 files where the internet is reachable (TFD cannot be).
        preprocessing: ``"scale"``: pixels in [0, 1]; ``"gcn"``: the authors' global contrast normalisation of
            each image (subtract its mean, divide by its L2 norm, times 55), as for CIFAR-10.
        fold: TFD fold, 0-4.
        tfd_train_set: TFD rows to train on: ``unlabeled`` (the authors), ``train`` or ``full_train`` (train+valid).
        tfd_image_size: 48 or 96 (reads ``TFD_48x48.mat`` or ``TFD_96x96.mat``).
        device_resident: keep every split on the training device (e.g. the GPU) from ``setup`` on: batches are
            gathered there, with no host-to-device copy per step. Needs ``num_workers=0``.
        steps_per_batch: training batches stacked into one ``(steps_per_batch, batch_size, C, H, W)`` batch, which
            :class:`~lightning_gan.GAN` trains on as that many steps of ``batch_size`` examples, in order: the same
            training, with Lightning's per-batch cost (a large part of a step at GPU speed) paid once per stack. The
            batches left over at the end of an epoch (fewer than a stack) are left out: choose a divisor of the
            batches per epoch (MNIST: 500 at batch size 100). Validation and test batches are not stacked.

    Raises:
        ValueError: for an unknown dataset or preprocessing, a non-positive batch size or ``steps_per_batch``, or bad
            TFD arguments.
    """

    def __init__(
        self,
        dataset: str = "mnist",
        data_dir: str | Path = "data",
        batch_size: int = 100,
        num_workers: int = 0,
        download: bool = True,
        preprocessing: Preprocessing = "scale",
        fold: int = 0,
        tfd_train_set: TFDTrainSet = "unlabeled",
        tfd_image_size: Literal[48, 96] = 48,
        device_resident: bool = False,
        steps_per_batch: int = 1,
    ) -> None:
        super().__init__()
        if dataset not in _LOADERS and not self._loads_own_data:
            raise ValueError(
                f"Unknown dataset {dataset!r}; expected one of {sorted(_LOADERS)}. Set `data.dataset` accordingly."
            )
        check_positive_int("batch_size", batch_size)
        check_positive_int("steps_per_batch", steps_per_batch)
        if num_workers < 0:
            raise ValueError(f"Expected `num_workers` >= 0, but got {num_workers}.")
        if preprocessing not in ("scale", "gcn"):
            raise ValueError(f"Expected `preprocessing` to be 'scale' or 'gcn', but got {preprocessing!r}.")
        if not isinstance(fold, int) or not 0 <= fold < TFD_FOLDS:
            raise ValueError(f"Expected `fold` in 0-{TFD_FOLDS - 1} (TFD has {TFD_FOLDS} folds), but got {fold!r}.")
        if tfd_train_set not in ("unlabeled", "train", "full_train"):
            raise ValueError(
                f"Expected `tfd_train_set` to be 'unlabeled', 'train' or 'full_train', but got {tfd_train_set!r}."
            )
        if device_resident and num_workers > 0:
            raise ValueError(
                f"`device_resident=True` keeps the data on the accelerator, where DataLoader workers cannot read it; "
                f"set `num_workers` to 0 (got {num_workers})."
            )
        if tfd_image_size not in (48, 96):
            raise ValueError(f"Expected `tfd_image_size` to be 48 or 96, but got {tfd_image_size!r}.")
        self.save_hyperparameters()
        self.hparams["data_dir"] = str(data_dir)  # a Path would stop `torch.load(weights_only=True)` of checkpoints
        self.dataset = dataset
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.download = download
        self.preprocessing = preprocessing
        self.fold, self.tfd_train_set, self.tfd_image_size = fold, tfd_train_set, tfd_image_size
        self.device_resident = device_resident
        self.steps_per_batch = steps_per_batch
        self.splits: Splits | None = None

    def prepare_data(self) -> None:
        # Runs on one process per node before `setup`: downloads (if allowed) and validates the files. The splits are
        # kept, so that this process does not read them twice; the others read them in `setup`.
        if self.splits is None:
            self.splits = self.load_splits()

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self.splits = self.load_splits()
        if self.device_resident and self.trainer is not None:
            device = self.trainer.strategy.root_device
            self.splits = Splits(
                *(
                    Split(s.images.to(device), s.labels.to(device))
                    for s in (self.splits.train, self.splits.val, self.splits.test)
                )
            )

    def load_splits(self) -> Splits:
        """The train, validation and test splits, read from ``data_dir`` (downloaded first if allowed), in data space.

        Override to train on your own data: return ``Splits(Split(images, labels), ...)`` (``lightning_gan.datasets``)
        with float images ``(N, C, H, W)``; batching, stacking, ``device_resident``, :meth:`pixel_mean` and the
        callbacks work on them unchanged (``dataset`` is then free to name them)."""
        if self.dataset == "tfd":
            splits = load_tfd(self.data_dir, self.fold, self.tfd_train_set, self.tfd_image_size)
        else:
            splits = _LOADERS[self.dataset](self.data_dir, download=self.download)
        if self.preprocessing == "gcn":
            splits = Splits(
                *(Split(global_contrast_normalize(s.images), s.labels) for s in (splits.train, splits.val, splits.test))
            )
        return splits

    def _split(self, name: str) -> Split:
        if self.splits is None:
            self.setup()
        return getattr(self.splits, name)

    @property
    def _loads_own_data(self) -> bool:
        return type(self).load_splits is not GANDataModule.load_splits

    @property
    def dataset_name(self) -> str:
        """The data's name in results: the paper's dataset, or the class of a subclass that loads its own."""
        return type(self).__name__ if self._loads_own_data else _DATASET_NAMES[self.dataset]

    def pixel_mean(self) -> Tensor:
        """Per-pixel mean of the training split ``(C, H, W)``, e.g. to start a generator's output bias."""
        return self._split("train").images.mean(dim=0)

    def to_display(self, images: Tensor) -> Tensor:
        """Map images ``(B, C, H, W)`` from data space to [0, 1] for display.

        Pixels are clamped to [0, 1]. GCN cannot be inverted (each image's mean and norm are gone), so GCN images
        are shown as the authors' CIFAR-10 viewer did: each divided by its largest absolute value, then mapped from
        [-1, 1] to [0, 1].
        """
        if self.preprocessing == "gcn":
            peak = images.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8)  # (B, 1, 1, 1)
            return (images / peak + 1) / 2
        return images.clamp(0, 1)

    def _dataloader(self, split: str, stack_batches: int = 1) -> DataLoader:
        data = self._split(split)
        # resumable mid-epoch (exact order after a checkpoint), and draws nothing from the global random generators
        return ResumableDataLoader(
            InMemoryTensors(data.images, data.labels),
            collate_fn=_whole_batch,
            batch_size=self.batch_size,
            shuffle=split == "train",
            drop_last=split == "train",
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            stack_batches=stack_batches,
            index_device=data.images.device if self.device_resident else None,  # only the indices travel, once a pass
        )

    def train_dataloader(self) -> DataLoader:
        loader = self._dataloader("train", self.steps_per_batch)
        ranks = self.trainer.world_size if self.trainer is not None else 1
        images = len(self._split("train").images)
        batches = -(-images // ranks) // self.batch_size  # per rank, as DDP shards it
        if batches < self.steps_per_batch:
            per_rank = f", {-(-images // ranks)} per process," if ranks > 1 else ""
            need = f"{self.steps_per_batch} batches (`steps_per_batch`) of " if self.steps_per_batch > 1 else ""
            raise ValueError(
                f"The training split has {images} images{per_rank} too few for {need}`batch_size={self.batch_size}`: "
                "an epoch would make no training step. Lower them."
            )
        if batches % self.steps_per_batch:
            rank_zero_warn(
                f"`steps_per_batch={self.steps_per_batch}` does not divide the {batches} training batches of an epoch: "
                f"the last {batches % self.steps_per_batch} are left out of every epoch. Choose a divisor of {batches}."
            )
        interval = self.trainer.log_every_n_steps if self.trainer is not None else 0
        if self.steps_per_batch > 1 and len(loader) < interval <= len(loader) * self.steps_per_batch:
            # Lightning compares `log_every_n_steps` with an epoch's batches, which are stacks here: not its steps
            warnings.filterwarnings(
                "ignore",
                r"The number of training batches \(\d+\) is smaller than the logging interval"
                + re.escape(f" Trainer(log_every_n_steps={interval})."),
            )
        return loader

    def val_dataloader(self) -> DataLoader:
        return self._dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self._dataloader("test")
