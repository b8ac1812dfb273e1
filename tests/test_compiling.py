"""CompileNetworks: the compiled update against the eager one (the same weights within float tolerance without
dropout, the same dropout in distribution with it), checkpoints unchanged, and its refusals before training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import quiet_trainer, tiny_nets
from lightning.pytorch import LightningModule, seed_everything
from torch.utils.data import DataLoader, TensorDataset

from lightning_gan import GAN, CompileNetworks

STEPS = 4


def tiny_gan(keep_prob: float | None = None, **kwargs) -> GAN:
    seed_everything(0, verbose=False)
    return GAN(*tiny_nets(keep_prob), lr_decay=1.0, momentum_final=None, **kwargs)


def fit(gan: GAN, callbacks: list, accelerator: str = "cpu", **kwargs) -> GAN:
    data = torch.rand(STEPS * 4, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    trainer = quiet_trainer(
        accelerator=accelerator, max_steps=STEPS, callbacks=callbacks, enable_checkpointing=False, **kwargs
    )
    seed_everything(0, verbose=False)
    trainer.fit(gan, DataLoader(TensorDataset(data), batch_size=4))
    return gan


def weights(gan: GAN) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu().clone() for name, tensor in gan.state_dict().items()}


def assert_close_weights(compiled: GAN, eager: GAN) -> None:
    got, expected = weights(compiled), weights(eager)
    assert got.keys() == expected.keys()  # compiled in place: the state dict keeps its keys
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_compiled_networks_train_the_eager_weights_without_dropout(monkeypatch: pytest.MonkeyPatch) -> None:
    eager = fit(tiny_gan(keep_prob=1.0), [])
    calls, compile_in_place = [], torch.nn.Module.compile

    def spy(network: torch.nn.Module, **kwargs) -> None:
        calls.append((network, kwargs))
        compile_in_place(network, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", spy)
    compiled = fit(tiny_gan(keep_prob=1.0), [CompileNetworks()])
    options = {"mode": "max-autotune-no-cudagraphs", "dynamic": None}
    assert calls == [(compiled.generator, options), (compiled.discriminator, options)]
    assert_close_weights(compiled, eager)
    fresh = tiny_gan(keep_prob=1.0)
    fresh.load_state_dict(compiled.state_dict())  # an uncompiled GAN loads a compiled run's weights


def test_compiled_dropout_drops_as_often_as_eager_dropout() -> None:
    _, discriminator = tiny_nets()  # the paper's keep probabilities, .8 on inputs and .5 on hidden units
    images = torch.rand(64, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    draws = 200

    def logits(network: torch.nn.Module) -> torch.Tensor:
        torch.manual_seed(0)
        with torch.no_grad():
            return torch.stack([network(images) for _ in range(draws)])  # (draws, 64): each its own masks

    eager = logits(discriminator)
    discriminator.compile(mode="default")
    compiled = logits(discriminator)
    assert not torch.equal(compiled, eager)  # the compiled kernels draw their own masks
    # per image: the mean and spread over masks agree within sampling error
    standard_error = eager.std(0) / draws**0.5
    assert ((compiled.mean(0) - eager.mean(0)).abs() < 5 * standard_error * 2**0.5).float().mean() > 0.95
    torch.testing.assert_close(compiled.std(0).mean(), eager.std(0).mean(), rtol=0.1, atol=0)


class NoNetworks(LightningModule):
    def training_step(self, batch, batch_idx):  # pragma: no cover - refused before training
        raise AssertionError

    def configure_optimizers(self):  # pragma: no cover
        raise AssertionError


def test_bad_settings_are_refused_before_training(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="`mode` must be one of"):
        CompileNetworks(mode="fast")
    with pytest.raises(TypeError, match="lacks one of them"):
        fit(NoNetworks(), [CompileNetworks()])
    gan = tiny_gan(cuda_graph=True)
    with pytest.raises(ValueError, match="captures CUDA graphs of its own"):
        fit(gan, [CompileNetworks(mode="reduce-overhead")])
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler on it
    gan = tiny_gan()
    before = weights(gan)
    with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler"):
        fit(gan, [CompileNetworks()])
    assert all(torch.equal(before[name], tensor) for name, tensor in weights(gan).items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_fast_path_on_a_gpu_trains_the_eager_weights() -> None:
    eager = fit(tiny_gan(keep_prob=1.0, cuda_graph=True), [], accelerator="cuda", devices=1)
    compiled = fit(tiny_gan(keep_prob=1.0, cuda_graph=True), [CompileNetworks()], accelerator="cuda", devices=1)
    assert_close_weights(compiled, eager)
