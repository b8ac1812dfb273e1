"""What the CLI sets up before training: DDP's `find_unused_parameters` for the `ddp` strategies named by a string,
and W&B's set-up in a module of its own, which the CLI imports and which imports nothing of the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from test_cli import fit_args

from lightning_gan.cli import build_cli

MESSAGE = "GAN: enabling DDP `find_unused_parameters`, as each backward pass trains one network."


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn", "ddp_fork", "ddp_notebook"])
def test_a_ddp_strategy_becomes_its_find_unused_parameters_variant(
    strategy: str, mnist_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    variant = f"{strategy}_find_unused_parameters_true"
    assert StrategyRegistry[variant]["init_params"]["find_unused_parameters"] is True
    args = fit_args(mnist_root, tmp_path, f"--trainer.strategy={strategy}", "--trainer.devices=1")[1:]
    with caplog.at_level("INFO"):
        cli = build_cli(args, run=False)  # nothing is launched: the trainer is only built
    assert cli.config.trainer.strategy == variant
    assert type(cli.trainer.strategy) is StrategyRegistry[variant]["strategy"]
    assert isinstance(cli.trainer.strategy, DDPStrategy)
    assert caplog.text.count(MESSAGE) == 1


@pytest.mark.parametrize("strategy", ["auto", "ddp_spawn_find_unused_parameters_false"])
def test_other_strategies_are_left_as_configured(
    strategy: str, mnist_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    args = fit_args(mnist_root, tmp_path, f"--trainer.strategy={strategy}", "--trainer.devices=1")[1:]
    with caplog.at_level("INFO"):
        cli = build_cli(args, run=False)
    assert cli.config.trainer.strategy == strategy
    assert MESSAGE not in caplog.text


def test_wandb_set_up_does_not_import_the_cli() -> None:
    code = "import sys, lightning_gan.wandb_setup; assert 'lightning_gan.cli' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
