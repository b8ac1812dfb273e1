"""Two "machines" on this one: two ``torchrun`` agents (``--nnodes 2 --nproc_per_node 1``) meeting through c10d
rendezvous on localhost, each starting one CPU rank (gloo). ``lightning-gan fit`` with ``--trainer.num_nodes 2``
trains on them; ``lightning-gan test`` on both gives the Parzen test log-likelihood that one process gives."""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from test_reliability import time_limit

from lightning_gan.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="needs torchrun (installed with torch)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def write_config(folder: Path, data_dir: Path) -> Path:
    """A tiny MNIST run: small networks, 4 steps, a quick Parzen evaluation, CSV metrics (full precision)."""
    config = folder / "tiny.yaml"
    config.write_text(
        textwrap.dedent(f"""\
            seed_everything: 0
            trainer:
              accelerator: cpu
              max_steps: 4
              limit_val_batches: 1
              limit_test_batches: 1
              num_sanity_val_steps: 0
              enable_progress_bar: false
              enable_model_summary: false
              logger:
                class_path: lightning.pytorch.loggers.CSVLogger
                init_args: {{save_dir: "{folder}/logs", name: run}}
              callbacks:
                - class_path: lightning_gan.ParzenEvaluation
                  init_args: {{num_samples: 300, val_size: 60, test_size: 101, chunk_size: 100}}
                - class_path: lightning.pytorch.callbacks.ModelCheckpoint
                  init_args: {{dirpath: "{folder}/checkpoints", filename: last}}
            model:
              class_path: lightning_gan.GAN
              init_args:
                generator:
                  class_path: lightning_gan.MLPGenerator
                  init_args: {{noise_dim: 8, hidden_sizes: [16], hidden_activations: [relu], out_shape: [1, 28, 28]}}
                discriminator:
                  class_path: lightning_gan.MaxoutDiscriminator
                  init_args: {{in_shape: [1, 28, 28], units: [8], pieces: 2}}
            data:
              class_path: lightning_gan.GANDataModule
              init_args: {{data_dir: "{data_dir}", download: false, batch_size: 10}}
            """)
    )
    return config


def parzen_test_ll(folder: Path) -> float:
    """The last ``parzen/test_ll`` in the CSV metrics of the runs under ``folder``."""
    rows = [row for path in sorted(folder.rglob("metrics.csv")) for row in csv.DictReader(path.open())]
    return float([row for row in rows if row.get("parzen/test_ll")][-1]["parzen/test_ll"])


def test_two_nodes_train_and_give_the_parzen_ll_of_one_process(mnist_root: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, mnist_root)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    both = ["--config", str(config), "--trainer.num_nodes=2", "--trainer.devices=1", "--trainer.strategy=ddp"]
    # what `python -m lightning_gan` runs, fit then test in one start per "node" (imports take seconds)
    script = tmp_path / "fit_then_test.py"
    script.write_text(
        "from lightning_gan.cli import main\n"
        f"main(['fit', *{both!r}])\n"
        f"main(['test', *{both!r}, '--ckpt_path={ckpt}'])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "GLOO_SOCKET_IFNAME": "lo"}
    torchrun = [shutil.which("torchrun"), "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d"]
    torchrun += [f"--rdzv-endpoint=localhost:{free_port()}", "--rdzv-id=multinode-test", "--max-restarts=0"]
    with time_limit(170):  # as docs/distributed.md starts it: each "node" its own torchrun
        nodes = [
            subprocess.Popen([*torchrun, str(script)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
            for _ in range(2)
        ]  # fmt: skip
        outputs = [node.communicate()[0] for node in nodes]
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output[-3000:]

    saved = torch.load(ckpt, weights_only=True)
    assert saved["global_step"] == 4
    assert len(saved["lightning_gan"]["rng_states"]) == 2  # written by a run of two ranks, one on each "node"
    two_nodes = parzen_test_ll(tmp_path / "logs")

    (tmp_path / "logs").rename(tmp_path / "logs-two-nodes")
    build_cli(["test", "--config", str(config), "--ckpt_path", str(ckpt)])  # one process, in this one
    assert parzen_test_ll(tmp_path / "logs") == pytest.approx(two_nodes, abs=1e-4)  # as test_parzen_callback's DDP test
