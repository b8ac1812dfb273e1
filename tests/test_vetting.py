"""A checkpoint names only allowed classes, and an unreadable one is named in one line (lightning_gan.vetting)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_NETS
from jsonargparse import Namespace

from lightning_gan import GAN
from lightning_gan.cli import build_cli, main
from lightning_gan.vetting import (
    CorruptCheckpointError,
    UntrustedCheckpointError,
    class_paths,
    read_checkpoint,
    vet_class_paths,
)

REPO = Path(__file__).resolve().parents[1]
MARKER_MODULE = """
from pathlib import Path

Path("imported.marker").write_text("gan_helpers was imported")

from lightning_gan import MLPGenerator as Generator
"""


def fit_args(data_dir: Path, root: Path, *extra: str) -> list[str]:
    return [
        "--config", str(REPO / "configs" / "mnist.yaml"), f"--data.init_args.data_dir={data_dir}",
        "--data.init_args.download=false", f"--trainer.default_root_dir={root}", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1", "--trainer.accelerator=cpu", *TINY_NETS, *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory: pytest.TempPathFactory, mnist_root: Path) -> Path:
    """A checkpoint written by `lightning-gan fit` (its hyperparameters name the classes by class_path)."""
    root = tmp_path_factory.mktemp("fit")
    build_cli(["fit", *fit_args(mnist_root, root)])
    return next(root.rglob("*.ckpt"))


def with_generator_class(checkpoint: Path, class_path: str, to: Path) -> Path:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state["hyper_parameters"]["generator"]["class_path"] = class_path
    torch.save(state, to)
    return to


def test_the_cli_refuses_a_checkpoint_naming_a_module_beside_it_before_importing_it(
    cli_checkpoint: Path, mnist_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    # the repro: the working directory is on sys.path, a module there writes a marker on import
    (tmp_path / "gan_helpers.py").write_text(MARKER_MODULE)
    model = with_generator_class(cli_checkpoint, "gan_helpers.Generator", tmp_path / "model.ckpt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "gan_helpers", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["test", *fit_args(mnist_root, tmp_path / "run"), f"--ckpt_path={model}"])
    assert exit_info.value.code == 2
    assert not (tmp_path / "imported.marker").exists() and "gan_helpers" not in sys.modules
    err = capsys.readouterr().err
    assert f"lightning-gan: error: {model} names 'gan_helpers.Generator'" in err
    assert "--model.init_args.generator=gan_helpers.Generator" in err  # the fix, for a trusted checkpoint


def test_a_class_named_in_the_user_s_own_config_is_allowed(
    cli_checkpoint: Path, mnist_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "gan_helpers.py").write_text(MARKER_MODULE)
    model = with_generator_class(cli_checkpoint, "gan_helpers.Generator", tmp_path / "model.ckpt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "gan_helpers", raising=False)
    args = fit_args(mnist_root, tmp_path / "run", "--model.init_args.generator=gan_helpers.Generator")
    try:
        cli = build_cli(["test", *args, f"--ckpt_path={model}"])
    finally:
        sys.modules.pop("gan_helpers", None)  # imported now: later tests would find it allowed
    assert type(cli.model.generator).__name__ == "MLPGenerator"  # gan_helpers.Generator is that class
    assert (tmp_path / "imported.marker").exists()  # the user asked for it


def test_load_from_checkpoint_refuses_an_untrusted_class_without_importing_it(
    cli_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(sys.modules, "this", raising=False)
    model = with_generator_class(cli_checkpoint, "this.Anything", tmp_path / "model.ckpt")
    with pytest.raises(UntrustedCheckpointError, match=r"names 'this\.Anything'"):
        GAN.load_from_checkpoint(model)
    assert "this" not in sys.modules and "Beautiful is better than ugly" not in capsys.readouterr().out
    # the checkpoint as written loads
    gan = GAN.load_from_checkpoint(cli_checkpoint)
    assert gan.generator.net[0].out_features == 16


def test_a_callable_named_by_a_plain_string_is_vetted_too(
    cli_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # jsonargparse imports the value of a callable-typed argument given as a string
    monkeypatch.delitem(sys.modules, "this", raising=False)
    state = torch.load(cli_checkpoint, map_location="cpu", weights_only=True)
    state["hyper_parameters"]["generator_optimizer"] = "this.make_optimizer"
    torch.save(state, tmp_path / "model.ckpt")
    with pytest.raises(UntrustedCheckpointError, match=r"this\.make_optimizer"):
        GAN.load_from_checkpoint(tmp_path / "model.ckpt")
    assert "this" not in sys.modules and "Beautiful is better than ugly" not in capsys.readouterr().out


def test_the_cli_refuses_this_anything_in_a_subprocess(cli_checkpoint: Path, mnist_root: Path, tmp_path: Path) -> None:
    model = with_generator_class(cli_checkpoint, "this.Anything", tmp_path / "model.ckpt")
    args = ["test", *fit_args(mnist_root, tmp_path / "run"), f"--ckpt_path={model}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    done = subprocess.run([sys.executable, "-m", "lightning_gan", *args], cwd=tmp_path, capture_output=True, text=True,
                          env=env)  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Beautiful is better than ugly" not in done.stdout + done.stderr
    assert "names 'this.Anything'" in done.stderr


def test_the_allowlist() -> None:
    allowed = ["lightning_gan.MLPGenerator", "torch.nn.Linear", "torch.optim.Adam", "mine.Net",
               "torch.optim.lr_scheduler.StepLR", "lightning.pytorch.LightningModule"]  # fmt: skip
    vet_class_paths(allowed, "x.ckpt", trusted=["mine.Net"])  # the last one: imported, a Lightning module
    for refused in ["this.Anything", "never_imported.Generator", "os.system", "subprocess.Popen", "builtins.eval"]:
        with pytest.raises(UntrustedCheckpointError, match=refused.replace(".", r"\.")):
            vet_class_paths([refused], "x.ckpt")


def test_class_paths_are_found_at_any_depth() -> None:
    tree = {"a": {"class_path": "p.A", "init_args": {"b": [{"class_path": "p.B"}], "f": "p.f"}}, "_class_path": "p.C"}
    tree["plain"] = ["relu", "non_saturating", "1.5", "data/v1.2", 3]  # not import paths
    assert sorted(class_paths(tree)) == ["p.A", "p.B", "p.C", "p.f"]
    assert list(class_paths(Namespace(model=Namespace(class_path="p.D")))) == ["p.D"]


def test_an_unreadable_checkpoint_is_named_in_one_line(cli_checkpoint: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(cli_checkpoint.read_bytes()[:2000])
    files = {
        "empty.ckpt": b"",
        "noise.ckpt": bytes(range(256)) * 4,
        "text.ckpt": b"not a checkpoint\n",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    for path in [truncated, *(tmp_path / name for name in files)]:
        with pytest.raises(CorruptCheckpointError) as error:
            read_checkpoint(path)
        message = str(error.value)
        assert message.startswith(f"Cannot read checkpoint {path}: ") and "\n" not in message
        with pytest.raises(CorruptCheckpointError):
            GAN.load_from_checkpoint(path)
    with pytest.raises(CorruptCheckpointError, match="the file is empty"):
        read_checkpoint(tmp_path / "empty.ckpt")
