"""W&B through the CLI: what an offline run holds on disk (read back from wandb's own files), the CLI defaults, and
the fallback to offline mode without credentials (no prompt, one notice)."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import wandb
import yaml
from lightning.pytorch import Callback
from lightning.pytorch.loggers import WandbLogger
from PIL import Image
from wandb.proto import wandb_internal_pb2

from lightning_gan.cli import build_cli, main, use_wandb_offline_without_credentials, wandb_credentials_found
from lightning_gan.monitor import GANProgressBar

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
NOTICE = "W&B: no credentials found"


def quickstart_args(data_dir: Path, save_dir: Path, *extra: str) -> list[str]:
    """The shipped quickstart config with tiny networks and a few batches."""
    return [
        "fit", "--config", str(QUICKSTART), f"--data.init_args.data_dir={data_dir}",
        f"--trainer.logger.init_args.save_dir={save_dir}", "--trainer.accelerator=cpu", "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false",
        "--trainer.log_every_n_steps=1",
        "--model.init_args.generator.init_args.hidden_sizes=[16,16]",
        "--model.init_args.discriminator.init_args.units=[8,8]", *extra,
    ]  # fmt: skip


def read_wandb_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """The records of a ``run-<id>.wandb`` file: wandb's LevelDB-style log (7-byte file header, 32 KiB blocks of
    ``crc32 | length (2, little-endian) | type`` chunks; types 1 full, 2 first, 3 middle, 4 last) of protobufs."""
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer: padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if kind == 0:  # zero padding to the end of the block
            pos += block - pos % block
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def history_rows(records: list[wandb_internal_pb2.Record]) -> list[dict]:
    """Each history record as a dict; wandb stores a logged dict (e.g. an image's fields) under nested keys."""
    rows = []
    for record in (r for r in records if r.HasField("history")):
        row: dict = {}
        for item in record.history.item:
            *parents, leaf = list(item.nested_key) or [item.key]
            node = row
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = json.loads(item.value_json)
        rows.append(row)
    return rows


@pytest.fixture
def wandb_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """W&B offline, with its caches and settings in ``tmp_path`` and no credentials."""
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.setenv("HOME", str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_fit_writes_an_offline_wandb_run_with_metrics_config_images_and_checkpoints(
    mnist_root: Path, wandb_home: Path
) -> None:
    logs = wandb_home / "logs"
    main(quickstart_args(mnist_root, logs, "--trainer.logger.init_args.log_model=all"))

    (run,) = (logs / "wandb").glob("offline-run-*")
    records = read_wandb_records(next(run.glob("run-*.wandb")))
    kinds = {record.WhichOneof("record_type") for record in records}
    assert {"run", "history", "config", "exit"} <= kinds

    # metrics: the module's losses every step, the monitor's numbers, the figures
    history = history_rows(records)
    logged = set().union(*history)
    assert {"train/d_loss", "train/g_loss", "val/d_loss", "trainer/global_step"} <= logged
    assert {"monitor/d_real", "monitor/d_fake", "monitor/distinct_neighbours", "monitor/relative_distance"} <= logged
    for key in ("samples", "interpolations"):
        (image,) = [row[key] for row in history if key in row]
        assert image["_type"] == "images/separated" and image["count"] == 1
        (png,) = image["filenames"]
        assert Image.open(run / "files" / png).size == (image["width"], image["height"])
    assert next(row["samples"] for row in history if "samples" in row)["width"] == 2 + 10 * 30  # 5 pairs a row

    # the full resolved config (not only the module's hyperparameters)
    config = {
        item.key: json.loads(item.value_json) for r in records if r.HasField("config") for item in r.config.update
    }
    # one key per setting, as in the YAML with the class_path/init_args levels folded
    assert config["model"]["generator"] == {**config["model"]["generator"], "class": "lightning_gan.MLPGenerator"}
    assert config["model"]["generator"]["hidden_sizes"] == [16, 16]
    assert config["trainer"]["logger"]["class"] == "lightning.pytorch.loggers.WandbLogger"
    assert config["data"]["data_dir"] == str(mnist_root)
    assert {callback["class"].rsplit(".", 1)[-1] for callback in config["trainer"]["callbacks"]} >= {
        "SampleGrid",
        "LatentInterpolation",
        "CollapseMonitor",
    }
    assert "generator_optimizer" not in config and "_instantiator" not in config  # no second copy from Lightning

    # log_model: the checkpoint as a W&B model artifact
    artifacts = [r.artifact for r in records if r.HasField("artifact")]
    assert [a.type for a in artifacts] == ["model"]
    assert any(entry.path.endswith(".ckpt") for entry in artifacts[0].manifest.contents)

    # the same run directory on disk holds checkpoints, the config and the PNG grids
    run_id = run.name.rsplit("-", 1)[-1]
    run_dir = logs / "lightning-gan" / run_id
    assert len(list((run_dir / "checkpoints").glob("*.ckpt"))) == 1
    assert "WandbLogger" in (run_dir / "config.yaml").read_text()
    for key in ("samples", "interpolations"):
        assert [p.name for p in (run_dir / key).iterdir()] == ["epoch=0000-step=3.png"]


def test_cli_defaults_to_wandb_and_the_gan_progress_bar(mnist_root: Path, wandb_home: Path) -> None:
    config = yaml.safe_load(QUICKSTART.read_text())
    del config["trainer"]["logger"], config["trainer"]["callbacks"]  # leave both to the CLI's defaults
    (wandb_home / "plain.yaml").write_text(yaml.safe_dump(config))
    args = ["--config", str(wandb_home / "plain.yaml"), f"--data.init_args.data_dir={mnist_root}"]
    cli = build_cli(args, run=False)
    (logger,) = cli.trainer.loggers
    assert isinstance(logger, WandbLogger) and logger.name == "lightning-gan"
    assert isinstance(cli.trainer.progress_bar_callback, GANProgressBar)
    cli = build_cli([*args, "--trainer.enable_progress_bar=false", "--trainer.logger=false"], run=False)
    assert cli.trainer.progress_bar_callback is None and cli.trainer.loggers == []


def test_credentials_are_found_in_the_environment_or_netrc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_MODE", "NETRC"):
        monkeypatch.setenv(name, "x")  # recorded, so that teardown restores the original state
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    assert not wandb_credentials_found()
    (tmp_path / ".netrc").write_text("machine example.com login user password secret\n")
    assert not wandb_credentials_found()
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password " + "a" * 40 + "\n")
    assert wandb_credentials_found()
    assert not use_wandb_offline_without_credentials() and "WANDB_MODE" not in os.environ
    (tmp_path / ".netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "b" * 40)
    assert wandb_credentials_found()
    monkeypatch.delenv("WANDB_API_KEY")
    assert use_wandb_offline_without_credentials() and os.environ["WANDB_MODE"] == "offline"
    assert not use_wandb_offline_without_credentials()  # WANDB_MODE is set now: the user's choice is kept


def run_in_a_terminal(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float) -> tuple[int, str]:
    """Run ``cmd`` with stdin, stdout and stderr on a pseudo-terminal, where W&B would prompt for a login; a prompt
    blocks on input, so it shows as a timeout."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd, start_new_session=True)
    os.close(slave)
    output, deadline = b"", time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                proc.kill()
                pytest.fail(f"no exit within {timeout} s (waiting at a prompt?); output:\n{output.decode()[-3000:]}")
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(master)
    return proc.wait(timeout=30), re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "", output.decode(errors="replace"))


def test_without_credentials_the_cli_goes_offline_with_one_notice_and_no_prompt(
    mnist_root: Path, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k not in ("NETRC", "XDG_CACHE_HOME")}
    env.update(HOME=str(tmp_path), TERM="xterm")
    # one training step, no validation: the process's time goes to starting up and to W&B's offline run
    steps = ["--trainer.max_steps=1", "--trainer.limit_val_batches=0"]
    cmd = [sys.executable, "-m", "lightning_gan", *quickstart_args(mnist_root, Path("logs"), *steps)]
    returncode, output = run_in_a_terminal(cmd, env, tmp_path, timeout=180)
    assert returncode == 0, output[-3000:]
    assert "Enter your choice" not in output and "API key" not in output
    assert output.count(NOTICE) == 1, output[-3000:]
    notice = output[output.index(NOTICE) :]
    synced = Path(re.search(r"`wandb sync (\S+)`", notice).group(1))
    assert synced.parent == (tmp_path / "logs" / "wandb").resolve() and synced.name.startswith("offline-run-")
    assert len(list(synced.glob("run-*.wandb"))) == 1


def test_a_resume_and_a_test_of_its_checkpoints_log_to_the_run_of_the_fit(mnist_root: Path, wandb_home: Path) -> None:
    logs = wandb_home / "logs"
    main(quickstart_args(mnist_root, logs))
    (first,) = (logs / "wandb").glob("offline-run-*")
    run_id = first.name.rsplit("-", 1)[-1]
    run_dir = logs / "lightning-gan" / run_id
    main([*quickstart_args(mnist_root, logs, "--trainer.max_epochs=2"), f"--ckpt_path={run_dir / 'checkpoints'}"
          "/epoch=0-step=3.ckpt"])  # fmt: skip
    assert [path.name for path in (logs / "lightning-gan").iterdir()] == [run_id]  # one folder: the fit's
    assert (run_dir / "checkpoints" / "epoch=1-step=6.ckpt").is_file()
    config = (run_dir / "config.yaml").read_text()

    test = [
        "test",
        *quickstart_args(mnist_root, logs)[1:],
        f"--ckpt_path={run_dir / 'checkpoints'}/epoch=1-step=6.ckpt",
    ]
    main(test)
    assert (run_dir / "config.yaml").read_text() == config  # the test leaves the fit's config alone
    runs = sorted((logs / "wandb").glob("offline-run-*"))  # named by their start time
    assert [run.name.rsplit("-", 1)[-1] for run in runs] == [run_id] * 3  # the resume's and the test's: the same run
    history = history_rows(read_wandb_records(next(runs[2].glob("run-*.wandb"))))
    (row,) = [row for row in history if "parzen/test_ll" in row]
    assert row["trainer/global_step"] == 6  # at the checkpoint's step


def test_a_bad_wandb_project_name_is_a_usage_error(mnist_root: Path, wandb_home: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(quickstart_args(mnist_root, wandb_home / "logs", "--trainer.logger.init_args.project=my/project"))
    assert exit_info.value.code == 2
    assert "Invalid project name 'my/project'" in capsys.readouterr().err
    assert not (wandb_home / "logs").exists()


def test_a_run_stopped_by_sigterm_is_marked_preempted_in_wandb(mnist_root: Path, wandb_home: Path) -> None:
    logs = wandb_home / "logs"
    with pytest.raises(SystemExit):  # Lightning exits after the interruption checkpoint
        main(quickstart_args(mnist_root, logs, "--trainer.max_epochs=3", "--trainer.callbacks+=test_wandb.SigtermAt2"))
    wandb.finish(exit_code=1)  # as wandb's exit hook does when the process ends
    wandb.teardown()
    (run,) = (logs / "wandb").glob("offline-run-*")
    records = read_wandb_records(next(run.glob("run-*.wandb")))
    assert any(record.HasField("preempting") for record in records)
    assert (logs / "lightning-gan" / run.name.rsplit("-", 1)[-1] / "checkpoints" / "interrupted.ckpt").is_file()


class SigtermAt2(Callback):
    """Sends this process SIGTERM after the second training step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
