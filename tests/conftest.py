"""Shared fixtures: MNIST written in its real on-disk format, and the location of the real data."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer

from lightning_gan import GAN, MaxoutDiscriminator, MLPGenerator
from lightning_gan.datasets import MNIST_FILES
from lightning_gan.graphed import CudaGraphRunner

REAL_DATA_ROOT = Path(
    os.environ.get("LIGHTNING_GAN_DATA_ROOT", Path(__file__).resolve().parents[2] / "shared" / "datasets")
)

# CLI flags that shrink configs/mnist.yaml's networks so that a CLI test trains in a second.
TINY_NETS = [
    "--model.init_args.generator.init_args.hidden_sizes=[16,16]",
    "--model.init_args.discriminator.init_args.units=[8,8]",
]


class OutputBiasAtStart(Callback):
    """Keeps a copy of the generator's output bias as training starts (after setup, before the first update)."""

    def on_train_start(self, trainer: Trainer, pl_module: GAN) -> None:
        self.bias = pl_module.generator.output_layer.bias.detach().clone()


class PlateauOnValidationLoss:
    """The README's ``lr_scheduler_step`` override, as a mixin for a ``GAN``: a ``ReduceLROnPlateau`` steps on
    ``val/d_loss`` (recorded in ``plateau_metrics``), every other scheduler as Lightning steps it."""

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            value = float(self.trainer.callback_metrics["val/d_loss"])
            self.__dict__.setdefault("plateau_metrics", []).append(value)
            scheduler.step(value)
        else:
            super().lr_scheduler_step(scheduler, metric)  # type: ignore[misc]


def tiny_nets(keep_prob: float | None = None) -> tuple[MLPGenerator, MaxoutDiscriminator]:
    """The paper's network types at toy size, for (1, 2, 2) images; dropout keep probabilities .8/.5 as the paper's,
    or ``keep_prob`` for input and hidden units alike (1.0: no dropout)."""
    generator = MLPGenerator(
        noise_dim=4, hidden_sizes=(8,), hidden_activations=("relu",), out_shape=(1, 2, 2), output_bias_from_data=False
    )
    keep = {} if keep_prob is None else {"input_keep_prob": keep_prob, "hidden_keep_prob": keep_prob}
    discriminator = MaxoutDiscriminator(in_shape=(1, 2, 2), units=(6,), pieces=2, **keep)
    return generator, discriminator


def quiet_trainer(**kwargs: Any) -> Trainer:
    """A CPU ``Trainer`` without logger, progress bar or model summary; ``kwargs`` add to or override these."""
    defaults = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    return Trainer(**{**defaults, **kwargs})


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    """Write ``array`` (uint8) as an IDX file: big-endian magic, one big-endian int32 per dimension, raw bytes."""
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_fake_mnist(root: Path, seed: int = 0) -> Path:
    """Write the four MNIST IDX files (full size, smooth random blobs) under ``root/MNIST/raw``; return ``root``."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28]
    for name, (magic, shape) in MNIST_FILES.items():
        if len(shape) == 1:
            data = rng.integers(0, 10, size=shape, dtype=np.uint8)
        else:
            # Gaussian blobs at 256 positions, drawn at random: varied images, pixels in [0, 255]
            centres = rng.uniform(8, 20, size=(256, 2, 1, 1))
            blobs = (255 * np.exp(-((yy - centres[:, 0]) ** 2 + (xx - centres[:, 1]) ** 2) / 18.0)).astype(np.uint8)
            data = blobs[rng.integers(0, len(blobs), size=shape[0])]
        write_idx(raw / name, data, magic)
    return root


@pytest.fixture(autouse=True)
def _restore_environ_and_sys_path() -> Iterator[None]:
    """Leave ``os.environ`` and ``sys.path`` as each test found them: ``seed_everything`` sets ``PL_GLOBAL_SEED`` and
    ``PL_SEED_WORKERS``, DDP runs ``MASTER_ADDR``/``MASTER_PORT``, the CLI and the benchmark scripts extend
    ``sys.path``; none of it may reach the next test."""
    environ, path_list, path = dict(os.environ), sys.path, list(sys.path)
    yield
    pytests_own = {"PYTEST_CURRENT_TEST"}  # pytest updates it between a test's phases
    for key in set(os.environ) - set(environ) - pytests_own:
        del os.environ[key]
    for key, value in environ.items():
        if key not in pytests_own and os.environ.get(key) != value:
            os.environ[key] = value
    sys.path = path_list  # the same list object, in case a test replaced it
    sys.path[:] = path


@pytest.fixture(autouse=True)
def _no_live_wandb_run() -> Iterator[None]:
    """Finish a W&B run that a test left live (a CLI built in-process runs without ``main``'s finish): the next
    test's ``WandbLogger`` would otherwise log into it, in the other test's folder."""
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding ``MNIST/raw`` with synthetic data in the real IDX format."""
    return write_fake_mnist(tmp_path_factory.mktemp("mnist"))


@pytest.fixture
def real_mnist_root() -> Path:
    """The folder holding the real ``MNIST/raw`` files; skips the test when it is absent."""
    if not (REAL_DATA_ROOT / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.skip(f"real MNIST not found under {REAL_DATA_ROOT} (set LIGHTNING_GAN_DATA_ROOT)")
    return REAL_DATA_ROOT


@pytest.fixture
def fast_path_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the fast path's bookkeeping on the CPU; its update is then made eagerly (no capture off CUDA)."""
    monkeypatch.setattr(CudaGraphRunner, "requires_cuda", False)
