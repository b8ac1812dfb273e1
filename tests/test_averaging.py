"""The generator's weight average (``GAN(ema_decay=...)``): the average by hand, training untouched, sampling and
figures from it, exact resume, checkpoints with and without it, and the fast path's bookkeeping."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import quiet_trainer, tiny_nets
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gan import GAN, MLPGenerator, SampleGrid
from lightning_gan.averaging import average_weight

BATCHES = 6


def make_gan(generator: nn.Module | None = None, **kwargs: Any) -> GAN:
    """Adam with a large step, so that the weights (and their average) move visibly in a few batches."""
    seed_everything(0, verbose=False)
    adam = partial(torch.optim.Adam, lr=0.05)
    options = {"generator_optimizer": adam, "discriminator_optimizer": adam, "lr_decay": 1.0, "momentum_final": None}
    tiny_generator, discriminator = tiny_nets()
    return GAN(generator or tiny_generator, discriminator, **{**options, **kwargs})


def loader() -> DataLoader:
    data = torch.rand(BATCHES * 4, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(data), batch_size=4)


def fit(gan: GAN, root: Path, epochs: int = 1, ckpt_path: Path | None = None, callbacks: list | None = None) -> None:
    seed_everything(0, verbose=False)
    checkpoints = [ModelCheckpoint(dirpath=root / "checkpoints", save_top_k=-1)]
    trainer = quiet_trainer(max_epochs=epochs, default_root_dir=root, callbacks=[*(callbacks or []), *checkpoints])
    trainer.fit(gan, loader(), ckpt_path=ckpt_path)


def generator_params(gan: GAN, name: str = "generator") -> list[Tensor]:
    return [p.detach().clone() for p in getattr(gan, name).parameters()]


class RecordGenerator(Callback):
    """The generator's parameters after every batch that updated it."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.states = [generator_params(pl_module)]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        current = generator_params(pl_module)
        if any(not torch.equal(a, b) for a, b in zip(current, self.states[-1], strict=True)):
            self.states.append(current)


def test_the_weights_make_a_bias_corrected_average() -> None:
    assert average_weight(0.999, 1) == pytest.approx(1.0)  # the first step replaces the initial weights
    assert average_weight(0.999, 2) == pytest.approx(0.001 / (1 - 0.999**2))
    assert average_weight(0.999, 10**6) == pytest.approx(0.001)
    # unrolled, iterate i of n carries decay ** (n - i), normalised to sum 1: nothing is left of the initial weights
    decay, n, remaining = 0.9, 30, 1.0
    shares = []
    for step in range(1, n + 1):
        weight = average_weight(decay, step)
        shares = [share * (1 - weight) for share in shares] + [weight]
        remaining *= 1 - weight
    assert remaining == 0.0
    expected = torch.tensor([decay ** (n - i) for i in range(1, n + 1)], dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(shares, dtype=torch.float64), expected / expected.sum())


class NormalisedNoiseGenerator(MLPGenerator):
    """A generator with buffers: batch norm of the noise, whose running statistics change in training."""

    def __init__(self) -> None:
        super().__init__(
            noise_dim=4,
            hidden_sizes=(8,),
            hidden_activations=("relu",),
            out_shape=(1, 2, 2),
            output_bias_from_data=False,
        )
        self.norm = nn.BatchNorm1d(4)

    def forward(self, z: Tensor) -> Tensor:
        return super().forward(self.norm(z))


@pytest.mark.parametrize(
    ("schedule", "k", "decay"),
    [("simultaneous", 1, 0.5), ("alternating", 2, 0.5), ("simultaneous", 1, 0.2)],
)
def test_the_average_follows_every_generator_update(tmp_path: Path, schedule: str, k: int, decay: float) -> None:
    record = RecordGenerator()
    gan = make_gan(schedule=schedule, k=k, ema_decay=decay, generator=NormalisedNoiseGenerator())
    fit(gan, tmp_path, callbacks=[record])
    updates = record.states[1:]
    assert len(updates) == gan.generator_updates == BATCHES // k
    expected = record.states[0]  # the average starts as the generator
    for n, state in enumerate(updates, start=1):
        weight = average_weight(decay, n)
        expected = [a + weight * (p - a) for a, p in zip(expected, state, strict=True)]
    for average, by_hand in zip(generator_params(gan, "generator_ema"), expected, strict=True):
        torch.testing.assert_close(average, by_hand)
    assert not any(p.requires_grad for p in gan.generator_ema.parameters())
    # buffers are the generator's own
    assert gan.generator.norm.num_batches_tracked > 0
    for name, buffer in gan.generator.named_buffers():
        torch.testing.assert_close(gan.generator_ema.get_buffer(name), buffer, rtol=0, atol=0)


def test_a_second_fit_goes_on_averaging(tmp_path: Path) -> None:
    first, second = RecordGenerator(), RecordGenerator()
    gan = make_gan(ema_decay=0.5, generator=NormalisedNoiseGenerator())
    fit(gan, tmp_path / "first", callbacks=[first])
    fit(gan, tmp_path / "second", callbacks=[second])  # a new Trainer: its global_step starts at 0 again
    expected = first.states[0]
    for n, state in enumerate(first.states[1:] + second.states[1:], start=1):
        expected = [a + average_weight(0.5, n) * (p - a) for a, p in zip(expected, state, strict=True)]
    for average, by_hand in zip(generator_params(gan, "generator_ema"), expected, strict=True):
        torch.testing.assert_close(average, by_hand)
    saved = torch.load(tmp_path / "second" / "checkpoints" / f"epoch=0-step={BATCHES}.ckpt", weights_only=True)
    assert saved["lightning_gan"]["ema_updates"] == 2 * BATCHES


def test_the_average_leaves_training_untouched(tmp_path: Path) -> None:
    plain, averaged = make_gan(), make_gan(ema_decay=0.9)
    fit(plain, tmp_path / "plain")
    fit(averaged, tmp_path / "averaged")
    assert set(averaged.state_dict()) - set(plain.state_dict()) == {
        f"generator_ema.{key}" for key in plain.generator.state_dict()
    }
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(averaged.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert not torch.equal(averaged.generator_ema.output_layer.weight, averaged.generator.output_layer.weight)


def test_samples_and_figures_come_from_the_average() -> None:
    gan = make_gan(ema_decay=0.9)
    with torch.no_grad():
        gan.generator_ema.output_layer.bias.add_(1.0)  # an average visibly apart from the generator
    assert gan.sampling_generator is gan.generator_ema
    torch.manual_seed(1)
    samples = gan.sample(8)
    torch.manual_seed(1)
    z = gan.generator.sample_noise(8, gan.device)
    torch.testing.assert_close(samples, gan.generator_ema(z), rtol=0, atol=0)
    assert not torch.allclose(samples, gan.generator(z))

    grid = SampleGrid(num_samples=4, nrow=2, nearest_neighbours=False)
    from_average = grid.make_grid(gan)
    gan.generator_ema.load_state_dict(gan.generator.state_dict())
    assert not torch.equal(grid.make_grid(gan), from_average)  # the grid changed with the average alone

    plain = make_gan()
    assert plain.generator_ema is None and plain.sampling_generator is plain.generator


def test_resume_restores_the_average_exactly(tmp_path: Path) -> None:
    straight = make_gan(ema_decay=0.9)
    fit(straight, tmp_path / "straight", epochs=2)
    checkpoint = tmp_path / "straight" / "checkpoints" / f"epoch=0-step={BATCHES}.ckpt"
    resumed = make_gan(ema_decay=0.9)
    fit(resumed, tmp_path / "resumed", epochs=2, ckpt_path=checkpoint)
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_checkpoints_with_and_without_the_average_load_both_ways(tmp_path: Path) -> None:
    fit(make_gan(), tmp_path / "plain")
    plain_path = tmp_path / "plain" / "checkpoints" / f"epoch=0-step={BATCHES}.ckpt"
    saved = torch.load(plain_path, weights_only=True)["state_dict"]
    networks = {"generator": tiny_nets()[0], "discriminator": tiny_nets()[1]}
    averaged = GAN.load_from_checkpoint(plain_path, **networks, ema_decay=0.9)
    for key, value in averaged.generator_ema.state_dict().items():  # the average starts from the generator
        torch.testing.assert_close(value, saved[f"generator.{key}"], rtol=0, atol=0)

    fit(make_gan(ema_decay=0.9), tmp_path / "averaged")
    averaged_path = tmp_path / "averaged" / "checkpoints" / f"epoch=0-step={BATCHES}.ckpt"
    plain = GAN.load_from_checkpoint(averaged_path, **networks, ema_decay=None)
    assert plain.generator_ema is None and not any(key.startswith("generator_ema") for key in plain.state_dict())


def test_half_precision_weights_are_refused_before_training() -> None:
    trainer = quiet_trainer(precision="bf16-true", max_steps=1, enable_checkpointing=False)
    with pytest.raises(ValueError, match=r"torch.bfloat16 here, in which an update of 0.001 of the difference rounds"):
        trainer.fit(make_gan(ema_decay=0.999), loader())
    assert trainer.global_step == 0


@pytest.mark.parametrize("decay", [0.0, 1.0, 1.5, -0.1])
def test_a_decay_outside_zero_one_is_rejected(decay: float) -> None:
    with pytest.raises(ValueError, match=r"`ema_decay` in \(0, 1\)"):
        make_gan(ema_decay=decay)


@pytest.mark.usefixtures("fast_path_on_cpu")
@pytest.mark.parametrize(("schedule", "k"), [("simultaneous", 1), ("alternating", 2)])
def test_the_fast_path_keeps_the_same_average(tmp_path: Path, schedule, k) -> None:
    eager = make_gan(schedule=schedule, k=k, ema_decay=0.8)
    fit(eager, tmp_path / "eager", epochs=2)
    graphed = make_gan(schedule=schedule, k=k, ema_decay=0.8, cuda_graph=True)
    fit(graphed, tmp_path / "graphed", epochs=2)
    assert graphed.graph_runner is not None
    for average, expected in zip(generator_params(graphed, "generator_ema"), generator_params(eager, "generator_ema")):
        torch.testing.assert_close(average, expected, rtol=1e-5, atol=1e-6)  # fused optimizer steps round differently
