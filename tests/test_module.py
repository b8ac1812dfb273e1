"""The GAN module: losses, update counting under each schedule, step semantics, schedules, bad input, subclassing."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import OutputBiasAtStart, PlateauOnValidationLoss, quiet_trainer, tiny_nets
from lightning.pytorch import Callback, LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gan import GAN, ExponentialDecay, MaxoutDiscriminator, MLPGenerator, MomentumRamp


def tiny_gan(keep_prob: float | None = None, **kwargs) -> GAN:
    return GAN(*tiny_nets(keep_prob), **kwargs)


def loader(n_batches: int = 12, batch_size: int = 5) -> DataLoader:
    data = torch.rand(n_batches * batch_size, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(data), batch_size=batch_size)


def trainer(**kwargs) -> Trainer:
    return quiet_trainer(**{"enable_checkpointing": False, "max_epochs": 1, **kwargs})


class CountParameterChanges(Callback):
    """Counts, batch by batch, how often each network's parameters changed."""

    def __init__(self) -> None:
        self.changes = {"generator": 0, "discriminator": 0}

    def _snapshot(self, pl_module: GAN) -> dict[str, Tensor]:
        return {
            name: torch.cat([p.detach().flatten().clone() for p in getattr(pl_module, name).parameters()])
            for name in self.changes
        }

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._before = self._snapshot(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        after = self._snapshot(pl_module)
        for name in self.changes:
            self.changes[name] += int(not torch.equal(self._before[name], after[name]))


@pytest.mark.parametrize(
    ("k", "schedule", "expected_g"), [(1, "alternating", 12), (3, "alternating", 4), (1, "simultaneous", 12)]
)
def test_update_counts_follow_the_schedule(k: int, schedule: str, expected_g: int) -> None:
    counter = CountParameterChanges()
    gan = tiny_gan(k=k, schedule=schedule)
    t = trainer(callbacks=[counter])
    t.fit(gan, loader(12))
    assert counter.changes == {"discriminator": 12, "generator": expected_g}
    assert t.global_step == 12  # global_step counts batches (= discriminator updates), not optimizer steps
    assert gan.generator_updates == expected_g


def test_max_steps_counts_training_batches_for_every_k() -> None:
    counter = CountParameterChanges()
    t = trainer(callbacks=[counter], max_steps=7, max_epochs=-1)
    t.fit(tiny_gan(k=2), loader(12))
    assert t.global_step == 7
    assert counter.changes == {"discriminator": 7, "generator": 3}


def test_alternating_generator_update_uses_the_freshly_updated_discriminator() -> None:
    # with k = 1, the generator step of batch t sees D after its update on batch t: recompute it by hand
    torch.manual_seed(0)
    gan = tiny_gan(keep_prob=1.0, k=1, lr_decay=1.0, momentum_final=None)  # no dropout: deterministic D
    real = torch.rand(5, 1, 2, 2)
    g0 = {k: v.clone() for k, v in gan.generator.state_dict().items()}
    d0 = {k: v.clone() for k, v in gan.discriminator.state_dict().items()}

    torch.manual_seed(1)
    t = trainer(max_steps=1)
    t.fit(gan, DataLoader(TensorDataset(real), batch_size=5))

    torch.manual_seed(1)
    g, d = tiny_gan().generator, tiny_gan(keep_prob=1.0).discriminator
    g.load_state_dict(g0)
    d.load_state_dict(d0)
    d_opt, g_opt = (
        torch.optim.SGD(d.parameters(), lr=0.1, momentum=0.5),
        torch.optim.SGD(g.parameters(), lr=0.1, momentum=0.5),
    )
    with torch.no_grad():
        fake = g(g.sample_noise(5))
    d_loss = 0.5 * (nn.functional.softplus(-d(real)).mean() + nn.functional.softplus(d(fake)).mean())
    d_opt.zero_grad()
    d_loss.backward()
    d_opt.step()
    g_loss = nn.functional.softplus(-d(g(g.sample_noise(5)))).mean()
    g_opt.zero_grad()
    g_loss.backward()
    g_opt.step()
    for a, b in zip(gan.generator.parameters(), g.parameters()):
        torch.testing.assert_close(a, b)
    for a, b in zip(gan.discriminator.parameters(), d.parameters()):
        torch.testing.assert_close(a, b)


def test_losses_match_their_closed_forms() -> None:
    gan = tiny_gan()
    real_logits, fake_logits = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([-0.3, 1.2, 0.0])
    d_real, d_fake = torch.sigmoid(real_logits), torch.sigmoid(fake_logits)
    expected_d = 0.5 * (-torch.log(d_real).mean() - torch.log(1 - d_fake).mean())
    torch.testing.assert_close(gan.discriminator_loss(real_logits, fake_logits), expected_d)
    torch.testing.assert_close(gan.generator_loss_fn(fake_logits), -torch.log(d_fake).mean())
    minimax = tiny_gan(generator_loss="minimax")
    torch.testing.assert_close(minimax.generator_loss_fn(fake_logits), torch.log(1 - d_fake).mean())
    # stable from logits where the probability form overflows
    assert torch.isfinite(gan.discriminator_loss(torch.tensor([-200.0]), torch.tensor([200.0])))


def test_schedules_follow_the_authors_formulas() -> None:
    params = [nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.5)
    decay = ExponentialDecay(opt, decay_factor=1.000004, min_lr=1e-6)
    for _ in range(1000):
        opt.step()
        decay.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / 1.000004**1000, rel=1e-12)
    floor = ExponentialDecay(torch.optim.SGD(params, lr=0.1), decay_factor=2.0, min_lr=1e-3)
    for _ in range(20):
        floor.step()
    assert floor.optimizer.param_groups[0]["lr"] == 1e-3

    ramp = MomentumRamp(opt, final_momentum=0.7, start_epoch=1, saturate_epoch=250)
    momenta = [opt.param_groups[0]["momentum"]]
    for _ in range(300):
        ramp.step()
        momenta.append(opt.param_groups[0]["momentum"])
    # momenta[e] is the momentum during 1-based epoch e + 1
    assert momenta[0] == 0.5
    assert momenta[1] == pytest.approx(0.5 + 0.2 / 249)
    assert momenta[248] < 0.7
    assert momenta[249] == pytest.approx(0.7)
    assert momenta[299] == pytest.approx(0.7)
    state = ramp.state_dict()
    restored = MomentumRamp(torch.optim.SGD(params, lr=0.1, momentum=0.5), final_momentum=0.7)
    restored.load_state_dict(state)
    assert restored.optimizer.param_groups[0]["momentum"] == pytest.approx(0.7)


def test_gan_steps_the_schedules_per_update_and_per_epoch() -> None:
    gan = tiny_gan(k=2, momentum_final=0.7, momentum_saturate_epoch=3)
    t = trainer(max_epochs=2)
    t.fit(gan, loader(4))
    d_opt, g_opt = (o.optimizer if hasattr(o, "optimizer") else o for o in t.optimizers)
    assert d_opt.param_groups[0]["lr"] == pytest.approx(0.1 / 1.000004**8)  # 8 discriminator updates
    assert g_opt.param_groups[0]["lr"] == pytest.approx(0.1 / 1.000004**4)  # 4 generator updates
    assert d_opt.param_groups[0]["momentum"] == pytest.approx(0.7)  # epoch 3 reached after two epochs


class OwnSchedulersGAN(GAN):
    """A GAN whose ``configure_optimizers`` adds its own schedulers (``scheduler_configs``: one builder per optimizer
    index, each returning a Lightning scheduler dict), without the authors' decay and ramp."""

    def __init__(self, scheduler_configs: dict, **kwargs) -> None:
        super().__init__(*tiny_nets(), lr_decay=1.0, momentum_final=None, **kwargs)
        self.scheduler_configs = scheduler_configs

    def configure_optimizers(self):
        optimizers, _ = super().configure_optimizers()
        return optimizers, [build(optimizers[index]) for index, build in self.scheduler_configs.items()]


def test_own_schedulers_step_per_update_and_per_epoch() -> None:
    gan = OwnSchedulersGAN(
        {
            # the discriminator's lr halves every 3rd of its updates, the generator's every epoch
            0: lambda opt: {
                "scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.5),
                "interval": "step",
                "frequency": 3,
            },
            1: lambda opt: {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)},
        },
        k=2,
    )
    trainer(max_epochs=2).fit(gan, loader(6))  # 12 discriminator updates, 6 generator updates, 2 epochs
    d_opt, g_opt = gan.trainer.optimizers[0], gan.trainer.optimizers[1]
    assert d_opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**4)
    assert g_opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)


class PlateauGAN(PlateauOnValidationLoss, OwnSchedulersGAN):
    """The documented override: the plateau scheduler gets its metric, the others Lightning's default step."""


def test_a_plateau_scheduler_steps_through_an_overridden_lr_scheduler_step() -> None:
    schedulers = {
        0: lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt),
        1: lambda opt: {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.5), "interval": "step"},
    }
    with pytest.raises(ValueError, match=r"override `lr_scheduler_step\(self, scheduler, metric\)`"):
        trainer().fit(OwnSchedulersGAN(schedulers), loader(2), loader(2))
    gan = PlateauGAN(schedulers)
    gan.plateau_metrics = []
    trainer(max_epochs=3).fit(gan, loader(2), loader(2))
    assert len(gan.plateau_metrics) == 3  # once per epoch, after validation
    scheduler = gan.trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 3 and scheduler.best in gan.plateau_metrics  # given the metrics
    assert gan.trainer.optimizers[1].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**6)  # 6 generator updates


def test_own_lr_schedulers_beside_the_authors_decay_are_refused_before_training() -> None:
    class WithStepLR(GAN):
        def configure_optimizers(self):
            optimizers, schedulers = super().configure_optimizers()
            return optimizers, [*schedulers, torch.optim.lr_scheduler.StepLR(optimizers[1], 1, 0.5)]

    gan = WithStepLR(*tiny_nets())  # the default lr_decay, which would undo the StepLR at every update
    with pytest.raises(ValueError, match=r"`lr_decay` \(the authors' decay\) .* set `lr_decay: 1`"):
        trainer().fit(gan, loader(2))
    assert gan.global_step == 0
    trainer().fit(WithStepLR(*tiny_nets(), lr_decay=1.0), loader(2))


def test_evaluating_a_checkpoint_after_a_fit_keeps_the_trainer_s_step_count(tmp_path: Path) -> None:
    every_epoch = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)
    t = trainer(max_epochs=2, enable_checkpointing=True, callbacks=[every_epoch])
    t.fit(tiny_gan(), loader(4))
    t.validate(ckpt_path=tmp_path / "epoch=0-step=4.ckpt", dataloaders=loader(1), verbose=False)
    assert t.fit_loop.epoch_loop._batches_that_stepped == t.global_step == 8  # the trainer's, not the checkpoint's


class WeightDecayGAN(GAN):
    """Penalises the discriminator's squared weights, whose gradient is known: ``2 * weight * p``."""

    def __init__(self, *args, weight: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weight, self.seen = weight, []

    def discriminator_penalty(self, real: Tensor, fake: Tensor) -> Tensor:
        self.seen.append((real.clone(), fake.requires_grad))
        return self.weight * sum((p**2).sum() for p in self.discriminator.parameters())


class R1GAN(GAN):
    """Mescheder et al. (2018): the squared gradient of D at the real images (a double backward)."""

    def discriminator_penalty(self, real: Tensor, fake: Tensor) -> Tensor:
        real = real.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(self.discriminator(real).sum(), real, create_graph=True)
        return 5.0 * grad.pow(2).flatten(1).sum(1).mean()


@pytest.mark.parametrize("schedule", ["alternating", "simultaneous"])
def test_the_discriminator_penalty_joins_every_discriminator_update(schedule: str) -> None:
    def one_step(weight: float) -> WeightDecayGAN:
        torch.manual_seed(0)
        gan = WeightDecayGAN(*tiny_nets(), weight=weight, schedule=schedule)
        torch.manual_seed(1)
        trainer(max_steps=1).fit(gan, loader(1))
        return gan

    torch.manual_seed(0)
    initial = [p.detach().clone() for p in WeightDecayGAN(*tiny_nets()).discriminator.parameters()]
    plain, penalised = one_step(0.0), one_step(0.3)
    # SGD's first step moves D by lr * gradient: the penalty adds lr * 2 * weight * p to the plain move
    for before, p_plain, p_penalised in zip(
        initial, plain.discriminator.parameters(), penalised.discriminator.parameters(), strict=True
    ):
        torch.testing.assert_close(p_penalised, p_plain - 0.1 * 2 * 0.3 * before)
    if schedule == "simultaneous":  # the generator's update, from the same D parameters, is untouched
        for p_plain, p_pen in zip(plain.generator.parameters(), penalised.generator.parameters(), strict=True):
            torch.testing.assert_close(p_pen, p_plain, rtol=0, atol=0)
    ((real, fake_has_grad),) = penalised.seen
    torch.testing.assert_close(real, next(iter(loader(1)))[0], rtol=0, atol=0)
    assert not fake_has_grad

    r1 = R1GAN(*tiny_nets(), schedule=schedule)
    trainer(max_steps=3).fit(r1, loader(3))  # a penalty through a double backward trains on both schedules
    assert r1.global_step == 3 and all(torch.isfinite(p).all() for p in r1.parameters())


class VoxelGenerator(nn.Module):
    noise_dim = 4

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 8)

    def sample_noise(self, n: int, device=None) -> Tensor:
        return torch.rand(n, 4, device=device)

    def forward(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.net(z)).view(-1, 1, 2, 2, 2)


class VoxelDiscriminator(nn.Module):  # says nothing of its input's shape
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(8, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(1)


def test_five_dimensional_images_are_not_taken_for_stacks_of_steps() -> None:
    counter = CountParameterChanges()
    voxels = torch.rand(12, 1, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    t = trainer(log_every_n_steps=5, callbacks=[counter])
    t.fit(GAN(VoxelGenerator(), VoxelDiscriminator()), DataLoader(TensorDataset(voxels), batch_size=4))
    assert t.global_step == 3 and counter.changes == {"generator": 3, "discriminator": 3}


class DictBatchesGAN(GAN):
    def real_images(self, batch: dict) -> Tensor:
        return batch["image"]


def test_another_kind_of_batch_needs_real_images_overridden() -> None:
    batches = DataLoader([{"image": images} for images in torch.rand(12, 1, 2, 2).split(4)], batch_size=None)
    with pytest.raises(TypeError, match=r"got dict: override `real_images\(self, batch\)`"):
        trainer().fit(tiny_gan(), batches)
    t = trainer()
    t.fit(DictBatchesGAN(*tiny_nets()), batches)
    assert t.global_step == 3


class SwappedOptimizersGAN(GAN):
    def configure_optimizers(self):
        optimizers, schedulers = super().configure_optimizers()
        return optimizers[::-1], schedulers


class OneOptimizerGAN(GAN):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("cls", "match"),
    [
        (SwappedOptimizersGAN, "optimizer 0 holds parameters that are not the discriminator's"),
        (OneOptimizerGAN, "but it returned 1"),
    ],
)
def test_optimizers_not_discriminator_then_generator_are_refused_before_training(cls: type, match: str) -> None:
    counter = CountParameterChanges()
    with pytest.raises(ValueError, match=match):
        trainer(callbacks=[counter]).fit(cls(*tiny_nets()), loader(2))
    assert counter.changes == {"generator": 0, "discriminator": 0}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "`k` to be a positive integer"),
        ({"k": 2, "schedule": "simultaneous"}, "`k` must be 1"),
        ({"schedule": "sometimes"}, "`schedule`"),
        ({"generator_loss": "hinge"}, "`generator_loss`"),
        ({"lr_decay": 0.5}, "`lr_decay`"),
        ({"nonfinite": "bogus"}, "Expected `nonfinite` to be 'stop' or 'skip'"),
        ({"nonfinite": "skip", "cuda_graph": True}, "`nonfinite: stop` with `cuda_graph: true`"),
    ],
)
def test_bad_arguments_are_rejected_at_construction(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny_gan(**kwargs)


def test_non_positive_learning_rate_is_rejected_before_training() -> None:
    gan = tiny_gan(discriminator_optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    counter = CountParameterChanges()
    with pytest.raises(ValueError, match="positive learning rate for the discriminator"):
        trainer(callbacks=[counter]).fit(gan, loader(2))
    assert counter.changes == {"generator": 0, "discriminator": 0}


def test_momentum_ramp_needs_an_optimizer_with_momentum() -> None:
    gan = tiny_gan(generator_optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
    with pytest.raises(ValueError, match="momentum_final: null"):
        trainer().fit(gan, loader(2))
    trainer().fit(tiny_gan(generator_optimizer=lambda p: torch.optim.Adam(p), momentum_final=None), loader(2))


def test_a_generator_without_the_contract_is_rejected() -> None:
    with pytest.raises(TypeError, match="sample_noise"):
        GAN(nn.Linear(2, 2), MaxoutDiscriminator(in_shape=(1, 2, 2), units=(2,), pieces=2))


class UserGenerator(nn.Module):
    """A generator written from scratch by a user, following only the documented contract."""

    noise_dim = 3

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh())

    def sample_noise(self, n: int, device=None) -> Tensor:
        return torch.randn(n, self.noise_dim, device=device)

    def forward(self, z: Tensor) -> Tensor:
        return self.body(z).view(-1, 1, 2, 2)


class LeastSquaresGAN(GAN):
    """A subclass that swaps both losses (least-squares GAN), as the README shows."""

    calls = 0

    def discriminator_loss(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        LeastSquaresGAN.calls += 1
        return 0.5 * ((real_logits - 1) ** 2).mean() + 0.5 * (fake_logits**2).mean()

    def generator_loss_fn(self, fake_logits: Tensor) -> Tensor:
        return 0.5 * ((fake_logits - 1) ** 2).mean()


def test_user_networks_and_loss_overrides_drive_training() -> None:
    user_d = nn.Sequential(nn.Flatten(), nn.Linear(4, 1), nn.Flatten(0))
    gan = LeastSquaresGAN(UserGenerator(), user_d, k=2, lr_decay=1.0, momentum_final=None)
    counter = CountParameterChanges()
    trainer(callbacks=[counter]).fit(gan, loader(6))
    assert counter.changes == {"discriminator": 6, "generator": 3}
    assert LeastSquaresGAN.calls >= 6
    samples = gan.sample(7)
    assert samples.shape == (7, 1, 2, 2)
    assert gan.training and gan.generator.training  # sample() restores the mode


class DropoutGenerator(UserGenerator):
    """Dropout on its output, and a record of the mode of each forward call."""

    def __init__(self) -> None:
        super().__init__()
        self.dropout = nn.Dropout(0.5)
        self.modes: list[bool] = []

    def forward(self, z: Tensor) -> Tensor:
        self.modes.append(self.training)
        return self.dropout(super().forward(z))


@pytest.mark.parametrize("start_in_training", [True, False])
def test_sample_is_in_eval_mode_without_gradients(start_in_training: bool) -> None:
    gan = GAN(DropoutGenerator(), tiny_nets()[1])
    gan.train(start_in_training)
    torch.manual_seed(0)
    first = gan.sample(64)
    torch.manual_seed(0)
    second = gan.sample(64)
    assert gan.generator.modes == [False, False]
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # no dropout mask: the same noise, the same images
    assert first.shape == (64, 1, 2, 2) and not first.requires_grad and (first != 0).all()
    assert gan.generator.training == start_in_training  # the mode is restored


class Marginals(LightningDataModule):
    """Training images whose per-pixel mean is known, and a ``pixel_mean()`` as GANDataModule's."""

    def __init__(self) -> None:
        super().__init__()
        self.images = torch.tensor([[0.2, 0.5, 0.9, 0.0]]).repeat(10, 1).view(10, 1, 2, 2)

    def pixel_mean(self) -> Tensor:
        return self.images.mean(dim=0)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.images), batch_size=5)


def marginal_gan() -> GAN:
    generator = MLPGenerator(noise_dim=4, hidden_sizes=(8,), hidden_activations=("relu",), out_shape=(1, 2, 2))
    return GAN(generator, tiny_nets()[1])


def test_the_output_bias_starts_at_the_training_marginals_and_is_kept_on_resume(tmp_path: Path) -> None:
    start = OutputBiasAtStart()
    gan = marginal_gan()
    quiet_trainer(max_steps=2, callbacks=[start], default_root_dir=tmp_path).fit(gan, datamodule=Marginals())
    expected = torch.logit(torch.tensor([0.2, 0.5, 0.9, 0.0], dtype=torch.float64).clamp(1e-7, 1 - 1e-7))
    torch.testing.assert_close(start.bias, expected.float())

    (checkpoint,) = tmp_path.rglob("*.ckpt")
    resumed = OutputBiasAtStart()
    trainer = quiet_trainer(max_steps=3, callbacks=[resumed], default_root_dir=tmp_path / "resumed")
    trainer.fit(marginal_gan(), datamodule=Marginals(), ckpt_path=checkpoint)
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]["generator.net.2.bias"]  # output_layer
    torch.testing.assert_close(resumed.bias, saved, rtol=0, atol=0)  # the trained bias, not the marginals again
    assert not torch.allclose(saved, expected.float())


def test_a_later_fit_keeps_trained_or_loaded_output_biases(tmp_path: Path) -> None:
    gan = marginal_gan()
    quiet_trainer(max_steps=2, default_root_dir=tmp_path).fit(gan, datamodule=Marginals())
    trained = gan.generator.output_layer.bias.detach().clone()
    expected = torch.logit(torch.tensor([0.2, 0.5, 0.9, 0.0]).clamp(1e-7, 1 - 1e-7))
    assert not torch.allclose(trained, expected)

    again = OutputBiasAtStart()  # fine-tuning the same module: no `ckpt_path`, but trained weights
    quiet_trainer(max_steps=1, callbacks=[again], default_root_dir=tmp_path).fit(gan, datamodule=Marginals())
    torch.testing.assert_close(again.bias, trained, rtol=0, atol=0)

    loaded, start = marginal_gan(), OutputBiasAtStart()
    loaded.load_state_dict(gan.state_dict())
    quiet_trainer(max_steps=1, callbacks=[start], default_root_dir=tmp_path).fit(loaded, datamodule=Marginals())
    torch.testing.assert_close(start.bias, gan.generator.output_layer.bias.detach(), rtol=0, atol=0)


def test_the_output_bias_without_a_pixel_mean_warns_and_stays() -> None:
    gan = marginal_gan()
    initial = gan.generator.output_layer.bias.detach().clone()
    start = OutputBiasAtStart()
    with pytest.warns(UserWarning, match="has no `pixel_mean"):
        trainer(max_steps=1, callbacks=[start]).fit(gan, loader())
    torch.testing.assert_close(start.bias, initial, rtol=0, atol=0)


def test_evaluating_initial_weights_warns_and_trained_or_loaded_ones_do_not() -> None:
    gan = tiny_gan()
    with pytest.warns(UserWarning, match="validate runs on initial weights"):
        trainer(limit_val_batches=1).validate(gan, loader(), verbose=False)
    trainer(max_steps=1).fit(gan, loader())  # no warning from the sanity check before training either
    loaded = tiny_gan()
    loaded.load_state_dict(gan.state_dict())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "GAN: .* initial weights")
        trainer(limit_test_batches=1).test(gan, loader(), verbose=False)
        trainer(limit_test_batches=1).test(loaded, loader(), verbose=False)


def test_validation_logs_losses_reproducibly() -> None:
    gan = tiny_gan()
    t = trainer(limit_train_batches=2)
    metrics = t.validate(gan, loader(3), verbose=False)[0]
    assert set(metrics) == {"val/d_loss", "val/g_loss", "val/d_real", "val/d_fake"}
    assert math.isfinite(metrics["val/d_loss"])
    assert t.validate(gan, loader(3), verbose=False)[0] == metrics  # noise seeded per batch: same numbers


def test_validation_logs_the_discriminator_s_outputs_and_losses_of_its_batch() -> None:
    gan = tiny_gan(keep_prob=1.0)  # no dropout: D is deterministic
    real = next(iter(loader(1)))[0]
    metrics = trainer(limit_val_batches=1).validate(gan, loader(1), verbose=False)[0]
    with torch.no_grad():
        torch.manual_seed(0)  # batch 0, rank 0 of 1
        real_logits, fake_logits = (
            gan.discriminator(real),
            gan.discriminator(gan.generator(gan.generator.sample_noise(5))),
        )
    assert metrics["val/d_real"] == pytest.approx(torch.sigmoid(real_logits).mean().item())
    assert metrics["val/d_fake"] == pytest.approx(torch.sigmoid(fake_logits).mean().item())
    assert metrics["val/d_loss"] == pytest.approx(gan.discriminator_loss(real_logits, fake_logits).item())
    assert metrics["val/g_loss"] == pytest.approx(gan.generator_loss_fn(fake_logits).item())


def test_evaluation_noise_differs_between_ranks_and_repeats_for_each() -> None:
    gan = tiny_gan()
    noise = {}
    for rank in (0, 1):
        gan._trainer = SimpleNamespace(world_size=2, global_rank=rank)
        noise[rank] = gan._evaluation_noise(5, batch_idx=3)
        torch.testing.assert_close(gan._evaluation_noise(5, batch_idx=3), noise[rank], rtol=0, atol=0)
    assert not torch.equal(noise[0], noise[1])


class SeedTheBatch(Callback):
    """Seeds the random stream at the start of the training batch, so that a reference computation can follow it."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        torch.manual_seed(1)


@pytest.mark.parametrize("keep_prob", [None, 1.0])  # the paper's dropout, and none
def test_simultaneous_update_on_one_device_is_the_authors_single_graph(keep_prob: float | None) -> None:
    # the authors' Theano graph: one forward (one dropout mask), grad of d_obj w.r.t. D and of g_obj w.r.t. G, both
    # from D's current parameters
    torch.manual_seed(0)
    gan = tiny_gan(keep_prob=keep_prob, schedule="simultaneous", lr_decay=1.0, momentum_final=None)
    real = torch.rand(5, 1, 2, 2)
    with torch.no_grad():  # a discriminator with outputs far from 0, so that the generator's gradients are too
        for p in gan.discriminator.parameters():
            p.mul_(100)
    g, d = tiny_gan().generator, tiny_gan(keep_prob=keep_prob).discriminator
    g.load_state_dict(gan.generator.state_dict())
    d.load_state_dict(gan.discriminator.state_dict())
    before = [p.detach().clone() for p in [*d.parameters(), *g.parameters()]]

    trainer(max_steps=1, callbacks=[SeedTheBatch()]).fit(gan, DataLoader(TensorDataset(real), batch_size=5))

    torch.manual_seed(1)
    fake = g(g.sample_noise(5))
    real_logits, fake_logits = d(real), d(fake)
    d_loss = 0.5 * (nn.functional.softplus(-real_logits).mean() + nn.functional.softplus(fake_logits).mean())
    g_loss = nn.functional.softplus(-fake_logits).mean()
    d_grads = torch.autograd.grad(d_loss, list(d.parameters()), retain_graph=True)
    g_grads = torch.autograd.grad(g_loss, list(g.parameters()))
    # first SGD step: the momentum buffer is the gradient itself. Compared as updates, which are small next to the
    # weights: an update from another noise draw or dropout mask would differ by far more than rounding.
    expected = [-0.1 * grad for grad in [*d_grads, *g_grads]]
    updates = [p.detach() - p0 for p, p0 in zip([*gan.discriminator.parameters(), *gan.generator.parameters()], before)]
    assert min(update.abs().max() for update in updates) > 1e-5  # every tensor moves by far more than atol
    for update, reference in zip(updates, expected, strict=True):
        torch.testing.assert_close(update, reference, rtol=1e-4, atol=2e-7)  # 2e-7: rounding of p - p0


def test_sample_from_a_64_bit_model_draws_in_its_dtype() -> None:
    gan = GAN(*tiny_nets(), ema_decay=0.9).double()  # from the average too
    samples = gan.sample(5)
    assert samples.dtype == torch.float64 and samples.shape == (5, 1, 2, 2)


def test_attached_trainer_is_none_before_a_fit_and_the_trainer_after() -> None:
    from lightning.pytorch import LightningModule, Trainer

    from lightning_gan.module import attached_trainer

    module = LightningModule()
    assert attached_trainer(module) is None
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    module.trainer = trainer
    assert attached_trainer(module) is trainer
