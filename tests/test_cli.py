"""The `lightning-gan` command: fit from the shipped config, --print_config round trip, --help, bad input."""

from __future__ import annotations

import importlib.metadata
import os
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_NETS, OutputBiasAtStart

from lightning_gan import GAN, MatmulPrecision
from lightning_gan.cli import build_cli, main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def fit_args(data_dir: Path, root: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", str(CONFIGS / "mnist.yaml"), f"--data.init_args.data_dir={data_dir}",
        f"--trainer.default_root_dir={root}", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        "--trainer.max_steps=4", "--trainer.limit_val_batches=2", "--trainer.accelerator=cpu", *TINY_NETS, *extra,
    ]  # fmt: skip


def test_fit_from_the_mnist_config_trains_and_writes_a_checkpoint(mnist_root: Path, tmp_path: Path) -> None:
    cli = build_cli(fit_args(mnist_root, tmp_path, "--trainer.callbacks+=conftest.OutputBiasAtStart"))
    assert cli.trainer.global_step == 4
    checkpoints = list(tmp_path.rglob("*.ckpt"))
    assert len(checkpoints) == 1
    state = torch.load(checkpoints[0], map_location="cpu", weights_only=False)
    assert state["global_step"] == 4
    # the config's numbers reached the module
    gan = cli.model
    assert gan.schedule == "simultaneous" and gan.k == 1 and gan.lr_decay == 1.000004
    assert gan.generator.noise == "uniform" and gan.generator.net[0].out_features == 16
    # the output bias came from the training marginals: the clipped logit of the training images' per-pixel mean
    (recorded,) = [c for c in cli.trainer.callbacks if isinstance(c, OutputBiasAtStart)]
    marginals = cli.datamodule.splits.train.images.double().mean(dim=0).flatten()
    expected = torch.logit(marginals.clamp(1e-7, 1 - 1e-7)).float()
    assert expected.min() < -16 < -1 < expected.max()  # blank corners (clipped), brighter centres
    torch.testing.assert_close(recorded.bias, expected, rtol=1e-5, atol=1e-5)


def test_fit_from_the_fast_mnist_config(mnist_root: Path, tmp_path: Path) -> None:
    args = fit_args(mnist_root, tmp_path)
    args[args.index(str(CONFIGS / "mnist.yaml"))] = str(CONFIGS / "mnist_fast.yaml")
    args[args.index("--trainer.max_steps=4")] = "--trainer.max_steps=10"  # one stack of 10 steps
    cli = build_cli(args)
    assert cli.trainer.global_step == 10
    gan = cli.model
    assert gan.cuda_graph and gan.schedule == "alternating" and gan.lr_decay == 1.0 and gan.momentum_final is None
    assert [type(opt) for opt in cli.trainer.optimizers] == [torch.optim.Adam, torch.optim.Adam]
    assert cli.datamodule.device_resident and cli.datamodule.steps_per_batch == 10
    # the generator's weight average is checkpointed, and a model rebuilt from the checkpoint samples from it
    assert gan.ema_decay == 0.9999
    loaded = GAN.load_from_checkpoint(next(tmp_path.rglob("*.ckpt")))
    assert loaded.sampling_generator is loaded.generator_ema
    for key, value in gan.generator_ema.state_dict().items():
        torch.testing.assert_close(loaded.generator_ema.state_dict()[key], value, rtol=0, atol=0)


def test_a_checkpoint_is_tested_validated_and_resumed_through_the_cli(
    mnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # as a user: a config file, then `test` with the same config and the checkpoint (which the CLI also re-reads)
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(
        "model:\n  init_args:\n"
        "    generator:\n      init_args: {hidden_sizes: [16, 16]}\n"
        "    discriminator:\n      init_args: {units: [8, 8]}\n"
    )
    common = [
        "--config",
        str(CONFIGS / "mnist.yaml"),
        "--config",
        str(tiny),
        f"--data.init_args.data_dir={mnist_root}",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
    ]
    build_cli(["fit", *common, "--trainer.max_steps=4", "--trainer.limit_val_batches=2"])
    ckpt = next(tmp_path.rglob("*.ckpt"))
    cli = build_cli(["test", *common, f"--ckpt_path={ckpt}", "--trainer.limit_test_batches=2"])
    assert "test/d_loss" in cli.trainer.callback_metrics
    ll = cli.trainer.callback_metrics["parzen/test_ll"].item()
    se = cli.trainer.callback_metrics["parzen/test_se"].item()
    assert f"Parzen log-likelihood (MNIST test): {ll:.1f} ± {se:.1f} nats, sigma " in capsys.readouterr().out
    # the checkpoint alone rebuilds the networks from the configuration it carries
    gan = GAN.load_from_checkpoint(ckpt)
    assert gan.generator.net[0].out_features == 16
    assert gan.sample(3).shape == (3, 1, 28, 28)
    validated = build_cli(["validate", *common, f"--ckpt_path={ckpt}", "--trainer.limit_val_batches=2"])
    assert "val/d_loss" in validated.trainer.callback_metrics
    resume = ["fit", *common, f"--ckpt_path={ckpt}", "--trainer.max_steps=6", "--trainer.limit_val_batches=0"]
    resumed = build_cli(resume)
    assert resumed.trainer.global_step == 6  # continued from step 4
    assert not torch.equal(resumed.model.generator.net[0].weight, gan.generator.net[0].weight)


def test_print_config_round_trips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "mnist.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "lightning_gan.MLPGenerator" in printed and "1.000004" in printed
    (tmp_path / "printed.yaml").write_text(printed)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "printed.yaml"), "--print_config"])
    assert capsys.readouterr().out == printed


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--model.init_args.k=0", "positive integer"),
        ("--model.init_args.generator_loss=hinge", "generator_loss"),
        ("--model.init_args.schedule=sometimes", "schedule"),
        ("--data.init_args.dataset=imagenet", "dataset"),
        ("--model.init_args.discriminator_optimizer.init_args.lr=-0.1", "positive learning rate"),
        ("--data.init_args.batch_size=60000", "too few for `batch_size=60000`"),
        (
            "--model.init_args.discriminator.init_args.in_shape=[1,32,32]",
            "set `model.init_args.discriminator.init_args.in_shape` to [1, 28, 28]",
        ),
    ],
)
def test_bad_input_fails_before_training(
    override: str, message: str, mnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises((SystemExit, ValueError)) as error:
        build_cli(fit_args(mnist_root, tmp_path, override))
    text = str(error.value) + capsys.readouterr().err
    assert message in text
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_value_a_class_refuses_is_a_usage_error_as_a_mistyped_key_is(
    mnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for override in ("--data.init_args.batch_size=0", "--data.init_args.batchsize=100"):
        with pytest.raises(SystemExit) as exit_info:
            build_cli(fit_args(mnist_root, tmp_path, override))
        assert exit_info.value.code == 2
    errors = capsys.readouterr().err
    assert errors.count("usage: ") == 2
    assert "error: Expected `batch_size` to be a positive integer, but got 0." in errors


def test_runs_without_a_logger_never_overwrite_another_runs_config(mnist_root: Path, tmp_path: Path) -> None:
    build_cli(fit_args(mnist_root, tmp_path))  # --trainer.logger=false: the run's files go to default_root_dir
    config = (tmp_path / "config.yaml").read_text()
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    with pytest.raises(RuntimeError, match="holds the config of an earlier run"):
        build_cli(fit_args(mnist_root, tmp_path, "--model.init_args.k=2", "--model.init_args.schedule=alternating"))
    build_cli(["validate", *fit_args(mnist_root, tmp_path)[1:], f"--ckpt_path={checkpoint}"])
    assert (tmp_path / "config.yaml").read_text() == config
    assert list(tmp_path.rglob("*.ckpt")) == [checkpoint]


def test_predict_is_not_offered(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_cli(["predict", "--help"])
    assert "invalid choice: 'predict'" in capsys.readouterr().err


def test_the_console_script_and_python_m_run_the_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # the installed `lightning-gan` script is cli.main (test_wandb runs `python -m lightning_gan fit` in a process)
    (script,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "lightning-gan"]
    assert script.value == "lightning_gan.cli:main" and script.load() is main
    monkeypatch.setattr(sys, "argv", ["lightning-gan", "--help"])
    monkeypatch.delitem(sys.modules, "lightning_gan.__main__", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("lightning_gan", run_name="__main__")  # as `python -m lightning_gan --help`
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lightning-gan ") and "{fit,validate,test}" in out


def test_readme_subclassing_example_runs_through_the_cli(
    mnist_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    readme = (CONFIGS.parent / "docs" / "subclassing.md").read_text()
    module_code = re.search(r"```python\n# my_gan.py\n(.*?)```", readme, re.S).group(1)
    user_yaml = re.search(r"```yaml\n# my.yaml[^\n]*\n(.*?)```", readme, re.S).group(1)
    (tmp_path / "my_gan.py").write_text(module_code)
    (tmp_path / "my.yaml").write_text(user_yaml)
    # As the console script runs: my_gan.py sits in the working directory, which is not on sys.path.
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd())])
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "my_gan", raising=False)
    args = fit_args(mnist_root, tmp_path, "--config", str(tmp_path / "my.yaml"))
    args = [a for a in args if not a.startswith("--model.init_args.generator.init_args")]
    try:
        cli = build_cli(args)
    finally:
        sys.modules.pop("my_gan", None)
    assert sys.path[-1] == str(tmp_path)  # appended: it never shadows an installed package
    assert type(cli.model).__name__ == "LeastSquaresGAN"
    assert type(cli.model.generator).__name__ == "ConvGenerator"
    assert cli.trainer.global_step == 4


def test_checkpointing_switched_off_leaves_out_the_config_s_checkpoints(mnist_root: Path, tmp_path: Path) -> None:
    cli = build_cli(fit_args(mnist_root, tmp_path, "--trainer.enable_checkpointing=false"))
    assert cli.trainer.global_step == 4 and cli.trainer.checkpoint_callbacks == []
    assert not list(tmp_path.rglob("*.ckpt"))


def test_matmul_precision_is_a_config_callback(
    mnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    callback = ["--trainer.callbacks+=lightning_gan.MatmulPrecision", "--trainer.callbacks.precision=medium"]
    cli = build_cli(fit_args(mnist_root, tmp_path, *callback)[1:], run=False)  # [1:]: no subcommand
    (precision,) = [c for c in cli.trainer.callbacks if isinstance(c, MatmulPrecision)]
    assert precision.precision == "medium"
    callback[1] = "--trainer.callbacks.precision=fast"
    with pytest.raises(SystemExit):  # a usage error naming the choices, before anything runs
        build_cli(fit_args(mnist_root, tmp_path, *callback)[1:], run=False)
    assert "Expected a typing.Literal['highest', 'high', 'medium']. Got value: fast" in capsys.readouterr().err
