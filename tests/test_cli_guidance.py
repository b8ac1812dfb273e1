"""What the `lightning-gan` command tells a newcomer: usage errors for the single-optimizer flags, whole help lines,
the summary that ends a fit (and `--test_after_fit`), the Parzen LL on `validate`, and no known warning noise."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from lightning_gan import datasets
from lightning_gan.cli import build_cli, main
from lightning_gan.cli_checks import SUBCOMMAND_HELP

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"

# Each line that a run printed on stderr before it was silenced at its cause or filtered (lightning_gan/quiet.py).
KNOWN_NOISE = (
    "anonymous setting has no effect",
    "git root",
    "LeafSpec",
    "litlogger",
    "`weights_only` was not set",
    "exists and is not empty",
)


@pytest.mark.parametrize("flag", ["--optimizer=SGD", "--optimizer", "--lr_scheduler.class_path=StepLR"])
def test_single_optimizer_flags_are_a_one_line_usage_error(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(QUICKSTART), flag])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lightning-gan: error: --")
    assert "--model.init_args.generator_optimizer" in err and "--model.init_args.discriminator_optimizer" in err


def test_top_level_help_describes_each_subcommand_whole(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["--help"])
    assert exit_info.value.code == 0
    words = " ".join(capsys.readouterr().out.split())
    for name, text in SUBCOMMAND_HELP.items():
        assert text.endswith(".") and f"{name} {text}" in words


def test_fit_help_has_no_single_optimizer_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_cli(["fit", "--help"])
    out = capsys.readouterr().out
    assert "--test_after_fit" in out
    assert "--optimizer" not in out and "--lr_scheduler" not in out


def _row(out: str, name: str) -> str:
    (line,) = [line for line in out.splitlines() if line.startswith(f"{name}:")]
    return line.split(":", 1)[1].strip()


def test_fit_tests_its_best_checkpoint_and_ends_with_a_summary_without_known_noise(
    mnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "wandb home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    env.update(HOME=str(home), WANDB_CONFIG_DIR=str(home / "config"), WANDB_CACHE_DIR=str(home / "cache"))
    env.update(WANDB_DATA_DIR=str(home / "data"), PYTHONPATH=str(REPO), PYTHONWARNINGS="default")
    logs = tmp_path / "my logs"  # a space: the printed commands quote their paths
    tiny = [
        "--config", str(QUICKSTART), f"--data.init_args.data_dir={mnist_root}",
        f"--trainer.logger.init_args.save_dir={logs}", "--trainer.accelerator=cpu", "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false",
        "--model.init_args.generator.init_args.hidden_sizes=[16,16]",
        "--model.init_args.discriminator.init_args.units=[8,8]",
    ]  # fmt: skip
    fit = [sys.executable, "-m", "lightning_gan", "fit", *tiny, "--test_after_fit=true"]
    done = subprocess.run(fit, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    noise = [line for line in done.stderr.splitlines() if any(n in line for n in KNOWN_NOISE)]
    assert noise == []
    out = done.stdout
    summary = out[out.index("── lightning-gan fit finished") :]
    assert out.index("Parzen log-likelihood (MNIST test): ") < out.index(summary)  # tested, then summarised
    (run,) = (logs / "lightning-gan").iterdir()
    assert _row(summary, "run folder") == str(run)
    assert Path(_row(summary, "latest checkpoint")) == run / "checkpoints" / "epoch=1-step=6.ckpt"
    assert Path(_row(summary, "best checkpoint")).name == "best-epoch=1-step=6.ckpt"
    assert Path(_row(summary, "latest samples")).parent == run / "samples"
    assert _row(summary, "Parzen LL, validation").endswith("nats (best checkpoint)")
    assert " ± " in _row(summary, "Parzen LL, test")
    test_command = _row(summary, "test it")
    assert f"--config {shlex.quote(str(run / 'config.yaml'))}" in test_command and "'" in test_command
    assert shlex.split(_row(summary, "resume it"))[-1] == str(run / "checkpoints" / "epoch=1-step=6.ckpt")

    # the printed `test` command runs as printed, and logs into the fit's W&B run; so does `validate`
    monkeypatch.chdir(tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WANDB_MODE", "offline")
    capsys.readouterr()
    args = shlex.split(test_command)
    assert args[:2] == ["lightning-gan", "test"]
    main(args[1:])
    assert "Parzen log-likelihood (MNIST test): " in capsys.readouterr().out
    validated = build_cli(["validate", *args[2:]])
    assert "parzen/val_ll" in validated.trainer.callback_metrics
    assert "parzen/val_ll" in capsys.readouterr().out
    # the printed resume command goes on in the run's folder, without the "exists and is not empty" warning
    resume = shlex.split(_row(summary, "resume it"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = build_cli([*resume[1:], "--trainer.max_epochs=3"])
    assert resumed.trainer.current_epoch == 3
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]
    runs = sorted((logs / "wandb").glob("offline-run-*"))
    assert {path.name.rsplit("-", 1)[-1] for path in runs} == {run.name}  # fit, test, validate, resume: one W&B run


def test_a_failed_download_leaves_no_empty_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline_mnist(root: str, train: bool, download: bool) -> None:
        (Path(root) / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)  # as torchvision does before fetching
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(datasets, "MNIST", offline_mnist)
    with pytest.raises(FileNotFoundError, match="the download failed"):
        datasets.load_mnist(tmp_path / "data")
    assert list(tmp_path.iterdir()) == []
