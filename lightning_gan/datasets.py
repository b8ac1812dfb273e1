"""Readers for the paper's datasets: on-disk files to float tensors ``(N, C, H, W)`` with the authors' splits.

Each reader checks its files before handing them to the library that parses them, so that a missing, truncated or
corrupt file gets one clear error naming the file and the fix, raised before any training starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torchvision.datasets import MNIST


@dataclass
class Split:
    """Images ``(N, C, H, W)`` in data space and integer labels ``(N,)`` (-1 where a dataset has none)."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: slice) -> Split:
        return Split(self.images[index], self.labels[index])


@dataclass
class Splits:
    """The train, validation and test splits of one dataset."""

    train: Split
    val: Split
    test: Split


# ---------------------------------------------------------------------------------------------------------- MNIST
MNIST_FILES = {
    "train-images-idx3-ubyte": (2051, (60000, 28, 28)),
    "train-labels-idx1-ubyte": (2049, (60000,)),
    "t10k-images-idx3-ubyte": (2051, (10000, 28, 28)),
    "t10k-labels-idx1-ubyte": (2049, (10000,)),
}
MNIST_TRAIN_SIZE = 50000  # the authors: train = train[0:50000], valid = train[50000:60000]


def check_idx_file(path: Path, magic: int, shape: tuple[int, ...]) -> None:
    """Check an IDX file's magic number, dimensions and size (uint8 data) against what MNIST has.

    Raises:
        ValueError: naming the file and what is wrong with it.
    """
    fix = "delete it and download MNIST again (GANDataModule(download=True)), or copy the original file"
    with open(path, "rb") as f:
        header = f.read(4 + 4 * len(shape))
    if len(header) < 4 + 4 * len(shape):
        raise ValueError(f"{path} is truncated: it is shorter than an IDX header; {fix}.")
    found_magic = int.from_bytes(header[:4], "big")
    if found_magic != magic:
        raise ValueError(f"{path} has IDX magic number {found_magic}, expected {magic}: it is not this file; {fix}.")
    dims = tuple(int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(len(shape)))
    if dims != shape:
        raise ValueError(f"{path} holds an array of shape {dims}, expected {shape}; {fix}.")
    expected_size = len(header) + int(torch.tensor(shape).prod())
    size = os.path.getsize(path)
    if size != expected_size:
        raise ValueError(f"{path} is {size} bytes, expected {expected_size} (truncated or corrupt); {fix}.")


def load_mnist(root: str | Path, download: bool = True) -> Splits:
    """MNIST through torchvision, pixels scaled to [0, 1], with the authors' 50,000 / 10,000 / 10,000 split.

    Args:
        root: folder holding ``MNIST/raw/`` (torchvision's layout); downloaded there if missing and ``download``.
        download: try torchvision's download when files are missing.

    Raises:
        FileNotFoundError: when the files are missing and cannot be downloaded, naming the folder and the files.
        ValueError: when a file is truncated or corrupt.
    """
    raw = Path(root) / "MNIST" / "raw"
    missing = [name for name in MNIST_FILES if not (raw / name).is_file()]
    if missing and download:
        try:
            MNIST(str(root), train=True, download=True)
            MNIST(str(root), train=False, download=True)
        except Exception as err:  # torchvision raises RuntimeError or URLError subclasses when offline
            raise FileNotFoundError(_mnist_missing_message(raw, missing, f"the download failed: {err}")) from err
        missing = [name for name in MNIST_FILES if not (raw / name).is_file()]
    if missing:
        raise FileNotFoundError(_mnist_missing_message(raw, missing, "download=False"))
    for name, (magic, shape) in MNIST_FILES.items():
        check_idx_file(raw / name, magic, shape)

    def read(train: bool) -> Split:
        dataset = MNIST(str(root), train=train, download=False)
        return Split(dataset.data.unsqueeze(1).float().div_(255), dataset.targets.long())

    train = read(train=True)
    return Splits(train=train[:MNIST_TRAIN_SIZE], val=train[MNIST_TRAIN_SIZE:], test=read(train=False))


def _mnist_missing_message(raw: Path, missing: list[str], reason: str) -> str:
    return (
        f"MNIST not found in {raw.resolve()} ({reason}). Expected the four original IDX files "
        f"{', '.join(MNIST_FILES)}; missing: {', '.join(missing)}. Put them in that folder (uncompressed), or set "
        f"`data_dir` (--data.data_dir) to the folder that holds MNIST/raw/, or allow the download on a machine "
        "with internet access."
    )
