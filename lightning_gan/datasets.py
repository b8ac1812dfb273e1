"""Readers for the paper's datasets: on-disk files to float tensors ``(N, C, H, W)`` with the authors' splits.

Each reader checks its files before handing them to the library that parses them, so that a missing, truncated or
corrupt file gets one clear error naming the file and the fix, raised before any training starts.
"""

from __future__ import annotations

import importlib
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
import scipy.io
import torch
from torch import Tensor
from torchvision.datasets import CIFAR10, MNIST


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


def _ensure_files(
    folder: Path,
    names: list[str],
    download: Callable[[], object] | None,
    message: Callable[[Path, list[str], str], str],
) -> None:
    """Fetch missing files with ``download`` (if given); if any is still missing, raise FileNotFoundError."""
    missing = [name for name in names if not (folder / name).is_file()]
    if missing and download is not None:
        created = [path for path in (folder, *folder.absolute().parents) if not path.exists()]  # deepest first
        try:
            download()
        except Exception as err:  # torchvision raises RuntimeError or URLError subclasses when offline
            for path in created:  # the empty folders a failed download leaves (data/MNIST/raw)
                if path.is_dir() and not any(path.iterdir()):
                    path.rmdir()
            raise FileNotFoundError(message(folder, missing, f"the download failed: {err}")) from err
        missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(message(folder, missing, "download=False"))


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
    if not raw.is_dir() and (Path(root) / next(iter(MNIST_FILES))).is_file():  # before a download makes folders there
        folder = Path(root).resolve()
        fix = (
            f"set `data_dir` (--data.data_dir) to {folder.parent.parent}"
            if folder.name == "raw" and folder.parent.name == "MNIST"
            else f"move the files into {folder / 'MNIST' / 'raw'}"
        )
        raise FileNotFoundError(
            f"MNIST's IDX files are in {folder} itself, but `data_dir` is the folder that holds MNIST/raw/ "
            f"(torchvision's layout): {fix}."
        )

    def fetch() -> None:
        MNIST(str(root), train=True, download=True)
        MNIST(str(root), train=False, download=True)

    _ensure_files(raw, list(MNIST_FILES), fetch if download else None, _mnist_missing_message)
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


# ---------------------------------------------------------------------------------------------------------- GCN
def global_contrast_normalize(images: Tensor, scale: float = 55.0, min_divisor: float = 1e-8) -> Tensor:
    """The authors' (pylearn2's) global contrast normalisation of each example ``(N, ...)`` over all its values.

    .. math:: \\tilde x = \\text{scale} \\cdot \\frac{x - \\bar x}{\\lVert x - \\bar x \\rVert_2}

    Where ``||x - mean|| / scale`` is below ``min_divisor`` the example is only centred (pylearn2 replaces such a
    divisor by 1). Returns a new float tensor of the input's shape.
    """
    flat = images.reshape(images.shape[0], -1)
    flat = flat if flat.is_floating_point() else flat.float()
    centred = flat - flat.mean(dim=1, keepdim=True)
    divisor = centred.norm(dim=1, keepdim=True) / scale
    divisor = torch.where(divisor < min_divisor, torch.ones_like(divisor), divisor)
    return centred.div_(divisor).view(images.shape)


# ---------------------------------------------------------------------------------------------------------- CIFAR-10
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_BATCH_ROWS = 10000
CIFAR10_TRAIN_SIZE = 40000  # the authors: train = train[0:40000], valid = train[40000:50000]
_CIFAR10_FIX = (
    "replace it with the file from the original cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html), "
    "or delete the folder and let GANDataModule(download=True) fetch it again"
)
_PICKLE_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}
_NUMPY_PICKLE_GLOBALS = {("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer")}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles containers and numpy arrays only: a CIFAR-10 batch needs no more, and other globals can run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PICKLE_GLOBALS:
            return super().find_class(module, name)
        package, _, submodule = module.rpartition(".")
        if package in ("numpy.core", "numpy._core") and (submodule, name) in _NUMPY_PICKLE_GLOBALS:
            try:  # numpy >= 2 (and 1.26's shim) names its core `numpy._core`; older pickles say `numpy.core`
                return getattr(importlib.import_module(f"numpy._core.{submodule}"), name)
            except ImportError:
                return getattr(importlib.import_module(f"numpy.core.{submodule}"), name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not part of a CIFAR-10 batch")


def read_cifar10_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one python-pickle CIFAR-10 batch: ``data`` uint8 ``(10000, 3072)`` and ``labels`` int64 ``(10000,)``.

    Raises:
        ValueError: naming the file when it is truncated, corrupt or not a CIFAR-10 batch.
    """
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="latin1").load()
    except Exception as err:  # a damaged pickle fails in many ways: EOFError, UnpicklingError, ValueError, ...
        raise ValueError(
            f"{path} is truncated or corrupt: it could not be unpickled ({type(err).__name__}: {err}); {_CIFAR10_FIX}."
        ) from err
    if not isinstance(batch, dict):
        raise ValueError(f"{path} holds a {type(batch).__name__}, not a CIFAR-10 batch dict; {_CIFAR10_FIX}.")
    batch = {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in batch.items()}
    data, labels = batch.get("data"), np.asarray(batch.get("labels", []))
    shape = (CIFAR10_BATCH_ROWS, 3 * 32 * 32)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape != shape:
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path} holds `data` {found}, expected uint8 {shape} (truncated or corrupt); {_CIFAR10_FIX}.")
    if labels.shape != shape[:1] or not np.issubdtype(labels.dtype, np.integer) or not np.isin(labels, range(10)).all():
        raise ValueError(
            f"{path} holds `labels` of shape {labels.shape} and dtype {labels.dtype}, expected {shape[0]} integers "
            f"in 0-9 (truncated or corrupt); {_CIFAR10_FIX}."
        )
    return data, labels.astype(np.int64)


def load_cifar10(root: str | Path, download: bool = True) -> Splits:
    """CIFAR-10, pixels scaled to [0, 1], with the authors' 40,000 / 10,000 / 10,000 split; images ``(3, 32, 32)``.

    Reads any folder in the official python-pickle layout, ``<root>/cifar-10-batches-py/data_batch_1..5`` and
    ``test_batch`` (``batches.meta`` is not needed), itself: torchvision's md5 check guards its download only.

    Args:
        root: folder holding ``cifar-10-batches-py/``; downloaded there if missing and ``download``.
        download: try torchvision's download when files are missing.

    Raises:
        FileNotFoundError: when files are missing and cannot be downloaded, naming the folder and the files.
        ValueError: when a batch is truncated or corrupt.
    """
    folder = Path(root) / CIFAR10_FOLDER
    names = [*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE]
    fetch = (lambda: CIFAR10(str(root), train=True, download=True)) if download else None
    _ensure_files(folder, names, fetch, _cifar10_missing_message)
    data, labels = zip(*(read_cifar10_batch(folder / name) for name in names), strict=True)
    images = torch.from_numpy(np.concatenate(data)).view(-1, 3, 32, 32).float().div_(255)  # (60000, 3, 32, 32)
    every = Split(images, torch.from_numpy(np.concatenate(labels)))
    n_train = len(CIFAR10_TRAIN_FILES) * CIFAR10_BATCH_ROWS
    return Splits(train=every[:CIFAR10_TRAIN_SIZE], val=every[CIFAR10_TRAIN_SIZE:n_train], test=every[n_train:])


def _cifar10_missing_message(folder: Path, missing: list[str], reason: str) -> str:
    return (
        f"CIFAR-10 not found in {folder.resolve()} ({reason}). Expected the python version's batches "
        f"{', '.join([*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE])}; missing: {', '.join(missing)}. Extract "
        "cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) there, or set `data_dir` "
        "(--data.data_dir) to the folder that holds cifar-10-batches-py/, or allow the download on a machine with "
        "internet access."
    )


# ---------------------------------------------------------------------------------------------------------- TFD
TFDSet = Literal["unlabeled", "train", "valid", "test", "full_train"]
TFD_SETS: dict[str, tuple[int, ...]] = {  # codes in the `folds` column (pylearn2's TFD mapper)
    "unlabeled": (0,),
    "train": (1,),
    "valid": (2,),
    "test": (3,),
    "full_train": (1, 2),
}
TFD_FOLDS = 5
TFD_KEYS = ("images", "folds", "labs_ex")
_TFD_FIX = "use the original TFD_48x48.mat or TFD_96x96.mat obtained from the TFD owners"


def read_tfd_mat(path: str | Path) -> dict[str, np.ndarray]:
    """Read ``images``, ``folds`` and ``labs_ex`` of a TFD ``.mat`` file, in MATLAB's axis order.

    MATLAB v5 files are read with :func:`scipy.io.loadmat`, v7.3 (HDF5) ones with h5py.

    Raises:
        ValueError: naming the file when it cannot be read or lacks a variable.
    """
    try:
        if h5py.is_hdf5(path):
            with h5py.File(path, "r") as f:
                # MATLAB stores arrays column-major: HDF5 holds each one with its axes reversed.
                arrays = {key: np.asarray(f[key]).T for key in TFD_KEYS if key in f}
        else:
            arrays = scipy.io.loadmat(path, variable_names=TFD_KEYS)
    except Exception as err:  # scipy and h5py raise ValueError, OSError, TypeError, ... on damaged files
        raise ValueError(
            f"{path} could not be read as a MATLAB .mat file, it is truncated or corrupt "
            f"({type(err).__name__}: {err}); {_TFD_FIX}."
        ) from err
    missing = [key for key in TFD_KEYS if key not in arrays]
    if missing:
        raise ValueError(
            f"{path} has no variable {', '.join(missing)}; a TFD file holds images (N, s, s), folds (N, 5) and "
            f"labs_ex (N, 1); {_TFD_FIX}."
        )
    return {key: arrays[key] for key in TFD_KEYS}


def load_tfd(
    root: str | Path, fold: int = 0, train_set: TFDSet = "unlabeled", image_size: Literal[48, 96] = 48
) -> Splits:
    """The Toronto Face Database as the authors read it (pylearn2's TFD): one fold, pixels scaled to [0, 1].

    Train is the fold's ``train_set`` rows (the authors: ``unlabeled``, code 0), validation its ``valid`` rows (2),
    test its ``test`` rows (3); images ``(1, s, s)``; labels ``labs_ex - 1`` (7 expressions), -1 for unlabeled rows.

    Args:
        root: folder holding ``TFD_48x48.mat`` or ``TFD_96x96.mat`` (TFD cannot be downloaded).
        fold: which of the five official folds (0-4).
        train_set: ``unlabeled`` (0), ``train`` (1), ``valid`` (2), ``test`` (3) or ``full_train`` (1 or 2).
        image_size: 48 or 96 (which file is read).

    Raises:
        FileNotFoundError: when the file is missing, saying where it looked and how to obtain it.
        ValueError: for a bad argument, or a file without the expected variables and shapes.
    """
    if not isinstance(fold, int) or not 0 <= fold < TFD_FOLDS:
        raise ValueError(f"Expected `fold` in 0-{TFD_FOLDS - 1} (TFD has {TFD_FOLDS} folds), but got {fold!r}.")
    if train_set not in TFD_SETS:
        raise ValueError(f"Expected `train_set` to be one of {sorted(TFD_SETS)}, but got {train_set!r}.")
    if image_size not in (48, 96):
        raise ValueError(f"Expected `image_size` 48 or 96 (TFD_48x48.mat or TFD_96x96.mat), but got {image_size!r}.")
    path = Path(root) / f"TFD_{image_size}x{image_size}.mat"
    if not path.is_file():
        raise FileNotFoundError(
            f"TFD not found: looked for {path.resolve()}. The Toronto Face Database cannot be downloaded; obtain "
            f"{path.name} from its owners (J. Susskind, A. Anderson and G. Hinton, University of Toronto), put it in "
            f"that folder, or set `data_dir` (--data.data_dir) to the folder that holds it."
        )
    arrays = read_tfd_mat(path)
    images, folds, labels = arrays["images"], arrays["folds"], arrays["labs_ex"]
    if images.ndim != 3 or images.shape[1:] != (image_size, image_size):
        raise ValueError(f"{path} holds `images` of shape {images.shape}, expected (N, {image_size}, {image_size}).")
    n = images.shape[0]
    if folds.shape != (n, TFD_FOLDS) or labels.size != n:
        raise ValueError(
            f"{path} holds `folds` of shape {folds.shape} and `labs_ex` of shape {labels.shape}, expected "
            f"({n}, {TFD_FOLDS}) and ({n}, 1) for its {n} images; {_TFD_FIX}."
        )
    labels = labels.reshape(n)

    def select(name: str) -> Split:
        rows = np.isin(folds[:, fold], TFD_SETS[name])
        if not rows.any():
            raise ValueError(f"{path} has no {name!r} rows in fold {fold} (code {TFD_SETS[name]}); {_TFD_FIX}.")
        x = torch.from_numpy(np.ascontiguousarray(images[rows])).unsqueeze(1).float().div_(255)  # (N, 1, s, s)
        y = np.full(len(x), -1) if name == "unlabeled" else labels[rows].astype(np.int64) - 1
        return Split(x, torch.as_tensor(y, dtype=torch.long))

    return Splits(train=select(train_set), val=select("valid"), test=select("test"))
