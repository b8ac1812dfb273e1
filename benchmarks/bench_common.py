"""What the benchmark scripts share: the config loaded without logger or progress bar, a bare trainer, a sync."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.cli import LightningCLI

from lightning_gan import MatmulPrecision
from lightning_gan.cli import build_cli

# The folder holding MNIST/raw/ (the four IDX files): $LIGHTNING_GAN_DATA_ROOT, else the package's default `data`.
DATA_ROOT = Path(os.environ.get("LIGHTNING_GAN_DATA_ROOT", "data"))


def load_cli(config: Path, data_dir: Path, *overrides: str) -> LightningCLI:
    """The config's model and datamodule (``run=False``), with no logger and no progress bar."""
    flags = [f"--config={config}", f"--data.init_args.data_dir={data_dir}", "--trainer.logger=false"]
    # The script's own flags are in sys.argv: hide them, or LightningCLI warns that it was given both.
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        return build_cli([*flags, "--trainer.enable_progress_bar=false", *overrides], run=False)


def bench_trainer(
    accelerator: str, callbacks: list[Callback], matmul_precision: str | None = None, **limits: Any
) -> Trainer:
    """One device, no validation, logger, checkpoints, progress bar or summary; ``limits`` as for ``Trainer``;
    ``matmul_precision``: the run's float32 matmul precision (:class:`~lightning_gan.MatmulPrecision`), else torch's."""
    return Trainer(
        accelerator=accelerator,
        devices=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, *([MatmulPrecision(matmul_precision)] if matmul_precision else [])],
        default_root_dir=tempfile.mkdtemp(),
        **limits,
    )


def resolve_accelerator(name: str) -> str:
    """``"auto"`` as Lightning resolves it for one device here (``"gpu"`` with CUDA, else ``"cpu"``), else ``name``."""
    return ("gpu" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timings of asynchronous CUDA work need it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
