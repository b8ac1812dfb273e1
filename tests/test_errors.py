"""How the command ends (lightning_gan.errors): the package's errors as one line and exit code 2, bugs with their
traceback, and an interrupted run with 143 (SIGTERM) or 130 (Ctrl-C), never 0 like a finished run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_NETS, quiet_trainer, tiny_nets
from lightning.pytorch import Callback, LightningDataModule
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import TensorDataset

from lightning_gan import GAN
from lightning_gan.checkpointing import InterruptCheckpoint
from lightning_gan.checks import check_positive_int
from lightning_gan.errors import (
    BAD_INPUT,
    CTRL_C,
    SIGTERM,
    TRACEBACK_VARIABLE,
    LightningGANError,
    is_package_error,
    run_command,
)
from lightning_gan.resume import ResumableDataLoader

REPO = Path(__file__).resolve().parents[1]


def raised(action) -> BaseException:
    try:
        action()
    except BaseException as error:
        return error
    raise AssertionError("nothing raised")


def test_only_errors_the_package_raises_on_purpose_are_bad_input() -> None:
    assert is_package_error(raised(lambda: check_positive_int("k", 0)))  # a check's ValueError
    assert is_package_error(LightningGANError("anywhere"))
    assert not is_package_error(raised(lambda: torch.zeros(2).view(3)))  # torch's RuntimeError: a bug
    assert not is_package_error(raised(lambda: {}["key"]))  # not a kind the checks raise
    assert not is_package_error(raised(lambda: int("x")))  # a ValueError from Python, not a `raise` of the package


def test_a_package_error_is_one_line_with_exit_code_2_and_the_traceback_on_request(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(TRACEBACK_VARIABLE, raising=False)
    finished = []
    with pytest.raises(SystemExit) as exit_info:
        run_command(lambda: check_positive_int("k", 0), lambda: finished.append(True))
    assert exit_info.value.code == BAD_INPUT and not finished
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"lightning-gan: error: Expected `k` to be a positive integer, but got 0. ({TRACEBACK_VARIABLE}=1 shows the "
        "traceback)"
    ]
    monkeypatch.setenv(TRACEBACK_VARIABLE, "1")
    with pytest.raises(SystemExit) as exit_info:
        run_command(lambda: check_positive_int("k", 0))
    assert exit_info.value.code == BAD_INPUT
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "check_positive_int" in err


def test_a_bug_keeps_its_traceback() -> None:
    with pytest.raises(KeyError):
        run_command(lambda: {}["key"])
    with pytest.raises(RuntimeError):
        run_command(lambda: torch.zeros(2).view(3))


def test_interruptions_exit_with_the_signal_s_code() -> None:
    def stop(code: int | None) -> None:
        stopped = SIGTERMException()
        if code is not None:
            stopped.code = code
        raise stopped

    for code, expected in ((None, SIGTERM), (CTRL_C, CTRL_C), (SIGTERM, SIGTERM)):
        with pytest.raises(SystemExit) as exit_info:
            run_command(lambda code=code: stop(code))
        assert exit_info.value.code == expected

    def ctrl_c() -> None:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        run_command(ctrl_c)
    assert exit_info.value.code == CTRL_C


class TinyData(LightningDataModule):
    def train_dataloader(self) -> ResumableDataLoader:
        images = torch.rand(40, 1, 2, 2, generator=torch.Generator().manual_seed(0))
        return ResumableDataLoader(TensorDataset(images), batch_size=4, shuffle=True, drop_last=True)


class SendSignal(Callback):
    def __init__(self, signum: int) -> None:
        self.signum = signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 2:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, SIGTERM), (signal.SIGINT, CTRL_C)])
def test_a_stopped_fit_carries_the_signal_s_exit_code(tmp_path: Path, signum: int, code: int) -> None:
    trainer = quiet_trainer(max_epochs=3, default_root_dir=tmp_path,
                            callbacks=[SendSignal(signum), InterruptCheckpoint(dirpath=tmp_path)])  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        trainer.fit(GAN(*tiny_nets()), datamodule=TinyData())
    assert exit_info.value.code == code  # Lightning's SIGTERMException had code None: exit status 0
    assert (tmp_path / "interrupted.ckpt").is_file()


STOPPER = """
import os
import signal

from lightning.pytorch import Callback


class Stop(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 2:
            os.kill(os.getpid(), signal.{name})
"""


@pytest.mark.parametrize(("name", "code"), [("SIGTERM", SIGTERM), ("SIGINT", CTRL_C)])
def test_the_command_exits_non_zero_when_stopped(tmp_path: Path, mnist_root: Path, name: str, code: int) -> None:
    (tmp_path / "stopper.py").write_text(STOPPER.format(name=name))
    args = [
        "fit", "--config", str(REPO / "configs" / "mnist.yaml"), f"--data.init_args.data_dir={mnist_root}",
        "--data.init_args.download=false", f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--trainer.max_steps=50", "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0", "--trainer.accelerator=cpu", "--trainer.callbacks+=stopper.Stop",
        *TINY_NETS,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    done = subprocess.run([sys.executable, "-m", "lightning_gan", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == code, done.stderr[-3000:]
    assert list((tmp_path / "run").rglob("interrupted.ckpt"))
