"""``GANDataModule``: the paper's datasets with the authors' splits, held in memory as float tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_gan.datasets import Split, Splits, load_mnist

DatasetName = Literal["mnist", "tfd", "cifar10"]
_LOADERS = {"mnist": load_mnist}


class GANDataModule(LightningDataModule):
    """MNIST, TFD or CIFAR-10 with the paper's splits; batches are ``(images (B, C, H, W), labels (B,))``.

    Args:
        dataset: ``"mnist"`` (train[0:50000] / train[50000:60000] / official test, pixels in [0, 1]).
        data_dir: folder holding the dataset in torchvision's layout (``<data_dir>/MNIST/raw/...``).
        batch_size: examples per batch on each device (the authors: 100).
        num_workers: DataLoader worker processes (the data is in memory: 0 is usually fastest).
        download: download missing files where the internet is reachable.

    Raises:
        ValueError: for an unknown dataset or a non-positive batch size.
    """

    def __init__(
        self,
        dataset: DatasetName = "mnist",
        data_dir: str | Path = "data",
        batch_size: int = 100,
        num_workers: int = 0,
        download: bool = True,
    ) -> None:
        super().__init__()
        if dataset not in _LOADERS:
            raise ValueError(
                f"Unknown dataset {dataset!r}; expected one of {sorted(_LOADERS)}. Set `data.dataset` accordingly."
            )
        if batch_size < 1:
            raise ValueError(f"Expected `batch_size` >= 1, but got {batch_size}.")
        if num_workers < 0:
            raise ValueError(f"Expected `num_workers` >= 0, but got {num_workers}.")
        self.save_hyperparameters()
        self.dataset = dataset
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.download = download
        self.splits: Splits | None = None

    def prepare_data(self) -> None:
        # Runs on one process per node before `setup`: downloads (if allowed) and validates the files.
        self._load()

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self.splits = self._load()

    def _load(self) -> Splits:
        return _LOADERS[self.dataset](self.data_dir, download=self.download)

    def _split(self, name: str) -> Split:
        if self.splits is None:
            self.setup()
        return getattr(self.splits, name)

    def pixel_mean(self) -> Tensor:
        """Per-pixel mean of the training split ``(C, H, W)``, e.g. to start a generator's output bias."""
        return self._split("train").images.mean(dim=0)

    def to_display(self, images: Tensor) -> Tensor:
        """Map images from data space to [0, 1] for display (datasets with non-pixel preprocessing override)."""
        return images.clamp(0, 1)

    def _dataloader(self, split: str) -> DataLoader:
        data = self._split(split)
        return DataLoader(
            TensorDataset(data.images, data.labels),
            batch_size=self.batch_size,
            shuffle=split == "train",
            drop_last=split == "train",
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._dataloader("train")

    def val_dataloader(self) -> DataLoader:
        return self._dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self._dataloader("test")
