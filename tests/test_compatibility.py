"""Checkpoints written by lightning-gan 0.1.0 load, test and resume, and the resumed run trains as 0.1.0 did.

``fixtures/mnist_0.1.0.ckpt`` and ``fixtures/mnist_fast_0.1.0.ckpt`` were written by 0.1.0 (commit 0d93fc0): the
`lightning-gan fit` of ``configs/mnist.yaml`` (4 steps) and ``configs/mnist_fast.yaml`` (10 steps, with the
generator's weight average), with the tests' tiny networks, on the synthetic MNIST of ``conftest.write_fake_mnist``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from conftest import TINY_NETS

from lightning_gan import GAN
from lightning_gan.cli import build_cli

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RESUMED_ON = ("AVX2", "AVX512")  # CPU kernel sets the digests were recorded with; both gave these
RESUMED = {  # SHA-256 of the resumed run's state dict, recorded on 0.1.0
    "mnist": "de9e643d17e39873244a58aba67041eb36f542b38f62bb4a6dd6b9978214e0a6",
    "mnist_fast": "462e9cc6248fe6d78a582b03719c8277847e914f1bcdf6bab79b0eee565133a9",
}


def state_digest(gan: GAN) -> str:
    sha = hashlib.sha256()
    for name, tensor in gan.state_dict().items():
        sha.update(name.encode())
        sha.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return sha.hexdigest()


def cli_args(name: str, subcommand: str, data_dir: Path, root: Path, *extra: str) -> list[str]:
    return [
        subcommand, "--config", str(CONFIGS / f"{name}.yaml"), f"--data.init_args.data_dir={data_dir}",
        f"--trainer.default_root_dir={root}", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        "--trainer.accelerator=cpu", f"--ckpt_path={FIXTURES / f'{name}_0.1.0.ckpt'}", *TINY_NETS, *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("name", ["mnist", "mnist_fast"])
def test_an_old_checkpoint_loads_with_its_weights(name: str) -> None:
    path = FIXTURES / f"{name}_0.1.0.ckpt"
    saved = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    gan = GAN.load_from_checkpoint(path)
    assert gan.state_dict().keys() == saved.keys()
    for key, value in gan.state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0)
    assert gan.sample(3).shape == (3, 1, 28, 28)
    averaged = name == "mnist_fast"
    assert (gan.sampling_generator is gan.generator_ema) == averaged


@pytest.mark.parametrize("name", ["mnist", "mnist_fast"])
def test_an_old_checkpoint_is_tested_and_resumed_through_the_cli(name: str, mnist_root: Path, tmp_path: Path) -> None:
    tested = build_cli(cli_args(name, "test", mnist_root, tmp_path / "test", "--trainer.limit_test_batches=2"))
    assert "parzen/test_ll" in tested.trainer.callback_metrics
    start = torch.load(FIXTURES / f"{name}_0.1.0.ckpt", map_location="cpu", weights_only=True)["global_step"]
    resumed = build_cli(
        cli_args(name, "fit", mnist_root, tmp_path / "fit", f"--trainer.max_steps={start + 10}",
                 "--trainer.limit_val_batches=0", "--seed_everything=0")
    )  # fmt: skip
    assert resumed.trainer.global_step == start + 10
    if torch.backends.cpu.get_cpu_capability() in RESUMED_ON:  # other CPU kernels may round differently
        assert state_digest(resumed.model) == RESUMED[name]
