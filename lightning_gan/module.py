"""The adversarial training procedure of Goodfellow et al. (2014) as a manual-optimization LightningModule.

Step counting: ``trainer.global_step`` (and so ``max_steps``, ``log_every_n_steps``, checkpointing every n steps)
counts *training steps*, which is the number of discriminator updates. Lightning would count every optimizer
step; generator steps are left out of the count so that the number means the same for every ``k`` and schedule.
Generator updates so far: :attr:`GAN.generator_updates`. A training batch is one step, or, stacked as
``(S, B, C, H, W)`` (``GANDataModule(steps_per_batch=S)``), S steps: then what Lightning does per batch (callbacks'
batch hooks, an integer ``val_check_interval``, ``limit_train_batches``, the progress bar) it does per stack, and
step counts checked after a batch (``max_steps``, ``log_every_n_steps``, checkpointing every n steps) must be
multiples of S.

The parts ``GAN`` holds live in modules of their own: the weight average (:mod:`lightning_gan.averaging`), the CUDA
graphs (:mod:`lightning_gan.graphed`), the non-finite guard (:mod:`lightning_gan.guards`), the schedulers
(:mod:`lightning_gan.stepping`) and stacked steps (:mod:`lightning_gan.stacking`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from lightning_gan._lightning import (
    count_optimizer_step,
    instantiated_by_cli,
    should_update_logs,
)
from lightning_gan.averaging import GeneratorAverage, fit_average_to
from lightning_gan.checks import check_positive_int
from lightning_gan.graphed import CudaGraphRunner, check_graph_fits, check_graph_safe, graph_constants
from lightning_gan.guards import NonFinite, NonFiniteGuard, check_architecture
from lightning_gan.nets import eval_forward
from lightning_gan.resume import restore_resume_state, resume_state, save_resume_state
from lightning_gan.sampling import datamodule_images, seeded_noise
from lightning_gan.schedules import ExponentialDecay, MomentumRamp
from lightning_gan.stacking import StackedSteps, stack_size
from lightning_gan.stepping import SchedulerStepper
from lightning_gan.vetting import load_vetted

Schedule = Literal["alternating", "simultaneous"]
GeneratorLoss = Literal["minimax", "non_saturating"]
Backward = Callable[..., None]  # manual_backward or Tensor.backward
Allows = Callable[[Tensor | None, Tensor | None], bool]  # whether the update from (d_loss, g_loss) is applied
Step = Callable[[LightningOptimizer], None]  # steps an optimizer
Losses = tuple[Tensor, Tensor | None, Tensor, Tensor]  # d_loss, g_loss, real_logits, fake_logits
BATCH_ERROR = (
    "GAN.real_images takes the images from a batch that is a tensor or an (images, labels) sequence, but got {}: "
    "override `real_images(self, batch)` in a subclass to return yours."
)
NOT_HPARAMS = ["generator", "discriminator", "generator_optimizer", "discriminator_optimizer"]  # code, not numbers


class GAN(LightningModule):
    """Generative adversarial nets trained by the paper's Algorithm 1, or by the authors' simultaneous update.

    Args:
        generator: a module with ``noise_dim``, ``sample_noise(n, device)`` and ``forward(z)``: images ``(n, C, H, W)``.
        discriminator: a module mapping images ``(n, C, H, W)`` to logits ``(n,)``.
        k: discriminator updates per generator update (``alternating`` only).
        schedule: ``"alternating"`` (Algorithm 1) or ``"simultaneous"`` (the authors' MNIST code: one minibatch
            and one noise draw update both networks; ``k`` must be 1).
        generator_loss: ``"non_saturating"`` descends ``-log D(G(z))``; ``"minimax"`` descends ``log(1 - D(G(z)))``.
        generator_optimizer: the generator's optimizer factory; ``None``: the paper's SGD (lr .1, momentum .5).
        discriminator_optimizer: the discriminator's optimizer factory; ``None`` as above.
        lr_decay: divide each learning rate by this after every update of its network (1 switches it off).
        min_lr: floor of the decayed learning rate.
        momentum_final: ramp each optimizer's momentum linearly to this value (``None`` switches it off).
        momentum_start_epoch: the (1-based) epoch where the ramp starts.
        momentum_saturate_epoch: the (1-based) epoch where the momentum reaches ``momentum_final``.
        nonfinite: on a NaN or infinite loss, ``"stop"`` raises :class:`~lightning_gan.guards.NonFiniteError`;
            ``"skip"`` leaves the update out and counts it in :attr:`skipped_updates`.
        cuda_graph: on a CUDA device, replay each step's update as a CUDA graph (:mod:`lightning_gan.graphed`).
        ema_decay: sample from a moving average of the generator's weights (:mod:`lightning_gan.averaging`).

    Raises:
        ValueError: for a value outside its range (``k < 1``, ``lr_decay < 1``, ...) or a combination excluded above.
        TypeError: if ``generator`` lacks ``noise_dim`` or ``sample_noise``.
    """

    def __init__(
        self, generator: nn.Module, discriminator: nn.Module, k: int = 1, schedule: Schedule = "alternating",
        generator_loss: GeneratorLoss = "non_saturating", generator_optimizer: OptimizerCallable | None = None,
        discriminator_optimizer: OptimizerCallable | None = None, lr_decay: float = 1.000004, min_lr: float = 1e-6,
        momentum_final: float | None = 0.7, momentum_start_epoch: int = 1, momentum_saturate_epoch: int = 250,
        nonfinite: NonFinite = "stop", cuda_graph: bool = False, ema_decay: float | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        check_arguments(generator, k, schedule, generator_loss, lr_decay, nonfinite, cuda_graph)
        self.save_hyperparameters(ignore=[] if instantiated_by_cli() else NOT_HPARAMS)  # see docs/architecture.md
        self.automatic_optimization = False
        self.generator, self.discriminator = generator, discriminator
        self.k, self.schedule, self.generator_loss, self.nonfinite = k, schedule, generator_loss, nonfinite
        self.generator_optimizer = generator_optimizer or paper_sgd
        self.discriminator_optimizer = discriminator_optimizer or paper_sgd
        self.lr_decay, self.min_lr, self.momentum_final = lr_decay, min_lr, momentum_final
        self.momentum_start_epoch, self.momentum_saturate_epoch = momentum_start_epoch, momentum_saturate_epoch
        self.cuda_graph, self.ema_decay = cuda_graph, ema_decay
        self.average = GeneratorAverage(generator, ema_decay) if ema_decay is not None else None
        self.generator_ema = self.average.module if self.average is not None else None
        self._guard = NonFiniteGuard(nonfinite, discriminator, generator)
        self.graph_runner: CudaGraphRunner | None = None  # while the fast path trains
        self._stepper: SchedulerStepper | None = None  # while training
        self._last_g_loss: Tensor | None = None  # logged on steps without a generator update (k > 1)
        self._loader_stacks = False  # whether the training loader stacks batches (set when training starts)
        self._fresh_weights = True  # neither trained nor loaded: a fit sets the output bias from the data
        self._one_pass = True  # whether the simultaneous update is the authors' one-pass graph: on one device
        self.register_load_state_dict_post_hook(_mark_weights_loaded)

    load_from_checkpoint = classmethod(load_vetted)  # refuses a checkpoint naming untrusted classes (vetting.py)

    def discriminator_loss(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        """The negated value function: ``0.5 * (BCE(D(x), 1) + BCE(D(G(z)), 0))`` from logits, batch mean."""
        return 0.5 * (F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean())

    def discriminator_penalty(self, real: Tensor, fake: Tensor) -> Tensor | None:
        """A term added to the discriminator's loss at each of its updates, e.g. a gradient penalty (``fake`` carries
        no gradient); ``None``: none."""
        return None

    def generator_loss_fn(self, fake_logits: Tensor) -> Tensor:
        """``-log D(G(z))`` (non-saturating) or ``log(1 - D(G(z)))`` (minimax), batch mean, from logits."""
        if self.generator_loss == "non_saturating":
            return F.softplus(-fake_logits).mean()
        return -F.softplus(fake_logits).mean()

    def real_images(self, batch: Any) -> Tensor:
        """A batch's images: the batch, or its first item (``(images, labels)``); override for other batches."""
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        if not isinstance(images, Tensor):
            raise TypeError(BATCH_ERROR.format(type(batch).__name__))
        return images

    def configure_optimizers(self) -> tuple[list[Optimizer], list[Any]]:
        """Discriminator and generator optimizers (an override returns them in this order), then their per-update
        decays and per-epoch momentum ramps; other schedulers are stepped as in :mod:`lightning_gan.stepping`."""
        nets = ("discriminator", "generator")
        optimizers = [
            make_optimizer(n, getattr(self, f"{n}_optimizer"), getattr(self, n), self.cuda_graph) for n in nets
        ]
        schedulers = [ExponentialDecay(opt, self.lr_decay, self.min_lr) for opt in optimizers if self.lr_decay != 1]
        if self.momentum_final is not None:
            ramp = (self.momentum_final, self.momentum_start_epoch, self.momentum_saturate_epoch)
            schedulers += [MomentumRamp(opt, *ramp) for opt in optimizers]
        return optimizers, schedulers

    def training_step(self, batch: Any, batch_idx: int) -> None:
        """One step on the images ``(B, C, H, W)``, or one per minibatch of a stack ``(S, B, C, H, W)``, in order."""
        real = self.real_images(batch)
        steps = (real,) if self._steps_in(real) == 1 else real.unbind(0)  # counted by StackedSteps before the batch
        log = should_update_logs(self.trainer)  # for the batch's last step
        runner = self.graph_runner  # its constants read once per batch, unless a scheduler may change one any step
        constants = graph_constants(runner.optimizers) if runner and self._stepper.only_decays else None
        for index, minibatch in enumerate(steps):
            self._training_step(minibatch, log and index == len(steps) - 1, constants)

    def _training_step(self, real: Tensor, log: bool, constants: tuple[Any, ...] | None) -> None:
        step = self.global_step
        generator_step = self.schedule == "simultaneous" or (step + 1) % self.k == 0  # after every k-th D update
        if generator_step and self.average is not None:
            self.average.set_step((step + 1) // self.k)
        if self.graph_runner is None:
            allows = partial(self._guard.allows, step, self.current_epoch)
            d_loss, g_loss, real_logits, fake_logits = self._update(
                real, generator_step, self.manual_backward, allows, partial(self._lightning_step, step)
            )
            d_real, d_fake = _mean_outputs(real_logits.detach(), fake_logits.detach()) if log else (None, None)
        else:  # the graph's statistics hold the means of D's outputs
            graphed = self.graph_runner(real, generator_step, constants, step, self.current_epoch, log)
            d_loss, g_loss, d_real, d_fake = graphed
            self._stepper.after_step(step, self.k, generator=generator_step)
        count_optimizer_step(self.trainer)
        if generator_step:
            self._last_g_loss = g_loss.detach()
        if log:
            self._log_step("train", d_loss, self._last_g_loss, d_real, d_fake)

    def _update(self, real: Tensor, generator_step: bool, backward: Backward, allows: Allows, step: Step) -> Losses:
        """One update on ``real``, eager or in a CUDA graph: gradients by ``backward``, applied where ``allows(d_loss,
        g_loss)``, by ``step``. Returns the losses (``g_loss``: ``None`` without a generator update) and the logits.
        Simultaneous: on one device the authors' graph (one pass of D on the fakes feeds both objectives); under DDP,
        which needs one backward pass, a second pass of D, frozen, for the generator: the same expected gradient."""
        d_opt, g_opt = self.optimizers()
        noise = self.generator.sample_noise(real.shape[0], self.device)
        if self.schedule == "simultaneous":
            fake = self.generator(noise)
            real_logits = self.discriminator(real)
            fake_logits = self.discriminator(fake if self._one_pass else fake.detach())
            d_loss = self._with_penalty(self.discriminator_loss(real_logits, fake_logits), real, fake)
            with self.toggled_optimizer(g_opt):
                g_loss = self.generator_loss_fn(fake_logits if self._one_pass else self.discriminator(fake))
            d_opt.zero_grad(set_to_none=True)
            g_opt.zero_grad(set_to_none=True)
            if self._one_pass:  # each network's gradient from its own objective
                backward(d_loss, inputs=[p for p in self.discriminator.parameters() if p.requires_grad],
                         retain_graph=True)  # fmt: skip
                backward(g_loss, inputs=[p for p in self.generator.parameters() if p.requires_grad])
            else:
                backward(d_loss + g_loss)
            self._step(allows(d_loss, g_loss), step, (d_opt, self.discriminator), (g_opt, self.generator))
            return d_loss, g_loss, real_logits, fake_logits
        with torch.no_grad():
            fake = self.generator(noise)
        real_logits, fake_logits = self.discriminator(real), self.discriminator(fake)
        d_loss = self._with_penalty(self.discriminator_loss(real_logits, fake_logits), real, fake)
        d_opt.zero_grad(set_to_none=True)
        backward(d_loss)
        self._step(allows(d_loss, None), step, (d_opt, self.discriminator))
        g_loss = None
        if generator_step:
            with self.toggled_optimizer(g_opt):  # the discriminator's parameters get no gradient
                noise = self.generator.sample_noise(real.shape[0], self.device)
                g_loss = self.generator_loss_fn(self.discriminator(self.generator(noise)))
            g_opt.zero_grad(set_to_none=True)
            backward(g_loss)
            self._step(allows(None, g_loss), step, (g_opt, self.generator))
        return d_loss, g_loss, real_logits, fake_logits

    def _step(self, allowed: bool, step: Step, *updates: tuple[LightningOptimizer, nn.Module]) -> None:
        """Step each ``(optimizer, network)``, then its constraints and the weight average; or drop its gradients."""
        for optimizer, network in updates:
            if not allowed:
                optimizer.zero_grad(set_to_none=True)
                continue
            step(optimizer)
            getattr(network, "apply_constraints", _no_closure)()
            if network is self.generator and self.average is not None:
                self.average.update(self.generator)

    def _lightning_step(self, step: int, optimizer: LightningOptimizer) -> None:
        """An eager step through Lightning's strategy (precision, hooks, clipping), then its schedulers."""
        with self.trainer.profiler.profile("optimizer_step"):
            self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=_no_closure)
        generator = optimizer.optimizer is self.trainer.optimizers[1]
        self._stepper.after_step(step, self.k, discriminator=not generator, generator=generator)

    def _with_penalty(self, d_loss: Tensor, real: Tensor, fake: Tensor) -> Tensor:
        penalty = self.discriminator_penalty(real, fake.detach())
        return d_loss if penalty is None else d_loss + penalty

    def _steps_in(self, batch: Any) -> int:  # see lightning_gan.stacking.stack_size
        real = batch if isinstance(batch, Tensor) else self.real_images(batch)
        return stack_size(real, getattr(self.discriminator, "in_shape", None), self._loader_stacks)

    @property
    def generator_updates(self) -> int:
        """Generator updates made so far (``global_step`` counts discriminator updates)."""
        return self.global_step // self.k

    @property
    def skipped_updates(self) -> int:
        """Updates left out for a non-finite loss (``nonfinite="skip"``); checkpointed."""
        return self._guard.skipped

    @property
    def sampling_generator(self) -> nn.Module:
        """What :meth:`sample`, the figures and the evaluations draw from: :attr:`generator_ema`, else the generator."""
        return self.generator_ema if self.generator_ema is not None else self.generator

    def sample(self, n: int) -> Tensor:
        """Draw ``n`` images ``(n, C, H, W)`` from :attr:`sampling_generator`, in eval mode, on the module's device."""
        return eval_forward(self.sampling_generator, self.sampling_generator.sample_noise(n, self.device))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        prefix = "test" if self.trainer.testing else "val"
        real = self.real_images(batch)
        fake = self.generator(self._evaluation_noise(real.shape[0], batch_idx))
        real_logits, fake_logits = self.discriminator(real), self.discriminator(fake)
        d_loss = self.discriminator_loss(real_logits, fake_logits)
        self._log_step(prefix, d_loss, self.generator_loss_fn(fake_logits), *_mean_outputs(real_logits, fake_logits))

    test_step = validation_step

    def _evaluation_noise(self, n: int, batch_idx: int) -> Tensor:
        """Seeded by the batch index and the rank: reproducible, each rank its own, training's stream untouched."""
        return seeded_noise(self.generator, n, batch_idx * self.trainer.world_size + self.global_rank, self.device)

    def _log_step(self, prefix: str, d_loss: Tensor, g_loss: Tensor | None, d_real: Tensor, d_fake: Tensor) -> None:
        """Log the losses and the discriminator's mean outputs. In training, only on the steps whose values reach the
        loggers: each ``self.log`` costs about a millisecond of host time, more than an MNIST update on a GPU."""
        on_step, values = prefix == "train", {"d_loss": d_loss, "g_loss": g_loss, "d_real": d_real, "d_fake": d_fake}
        metrics = {f"{prefix}/{name}": value.detach() for name, value in values.items() if value is not None}
        self.log_dict(metrics, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step, prog_bar=False)
        if on_step:  # "skip" reads its flag back every update anyway (see guards.py)
            skipped = self.skipped_updates if self.nonfinite == "skip" else None
            self.log_dict(optimizer_settings(self.trainer.optimizers, skipped), on_step=True, on_epoch=False)

    def setup(self, stage: str) -> None:
        if (trainer := attached_trainer(self)) is None:
            return
        if stage == "fit" and trainer.world_size > 1:  # each rank its own noise and dropout (see docs/distributed.md)
            torch.manual_seed(torch.initial_seed() + self.global_rank)
        check_image_shape(self, trainer.datamodule, getattr(self, "built_from_checkpoint", None))  # see cli
        if stage == "fit":
            StackedSteps.attach(trainer, self, self._steps_in)
            if self.cuda_graph:
                check_graph_fits(trainer.world_size, trainer.precision)
            if self._fresh_weights and getattr(self.generator, "output_bias_from_data", False):  # resumes overwrite it
                init_output_bias([self.generator, self.generator_ema], trainer.datamodule)

    def on_fit_start(self) -> None:
        check_ddp(self.trainer.strategy.model)

    def on_train_start(self) -> None:
        trainer, self._fresh_weights = self.trainer, False
        self._loader_stacks = getattr(trainer.train_dataloader, "stack_batches", 1) > 1
        check_optimizers(trainer.optimizers, self.discriminator, self.generator)
        self._stepper = SchedulerStepper.start(self)
        if self.average is not None:
            self.average.start_fit(self.generator_updates)
        self._one_pass = isinstance(trainer.strategy, SingleDeviceStrategy)  # the authors' simultaneous graph
        runner = (self._update, trainer.optimizers, self._guard, self.device, self.global_step)
        self.graph_runner = CudaGraphRunner.start(*runner) if self.cuda_graph else None

    def on_train_epoch_start(self) -> None:
        self._stepper.catch_up(self.current_epoch)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._guard.deferred(self.device) and self.global_step % max(self.trainer.log_every_n_steps, 1) == 0:
            self._guard.check_deferred(self.global_step, self.current_epoch)

    def on_train_epoch_end(self) -> None:
        self._guard.end_epoch(self.global_step, self.current_epoch)
        self._stepper.end_epoch(self.current_epoch, self.trainer.fit_loop.restarting)

    def on_validation_start(self) -> None:
        if self._fresh_weights and self.trainer.state.fn != TrainerFn.FITTING:
            warn_untrained("test" if self.trainer.testing else "validate")

    on_test_start = on_validation_start

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to save non-finite weights; add what an exact resume needs."""
        self._guard.check_before_saving(self.global_step, self.current_epoch)
        ema_updates = self.average.updates if self.average is not None else 0
        save_resume_state(checkpoint, self.device, skipped_updates=self.skipped_updates, ema_updates=ema_updates)
        if self.graph_runner is not None:
            self.graph_runner.checkpoint_as_eager(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Fit the generator average to the checkpoint and restore what :meth:`on_save_checkpoint` added."""
        state, step = resume_state(checkpoint), int(checkpoint.get("global_step", 0))
        fit_average_to(checkpoint, self.average, step // self.k)
        self._fresh_weights, self._guard.skipped = False, int(state.get("skipped_updates", 0))
        if self.graph_runner is not None:
            self.graph_runner.graphs.reset()  # restored optimizer state is new tensors, which no graph has captured
        restore_resume_state(attached_trainer(self), state, step, self.device)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``; a strict load of other networks' weights raises a ``ValueError``."""
        if strict:
            check_architecture(self.state_dict(), state_dict, getattr(attached_trainer(self), "ckpt_path", None))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


# ---------------------------------------------------------------------- defaults and checks, outside the class
def paper_sgd(params: Any) -> Optimizer:
    """The paper's optimizer: SGD with learning rate .1 and momentum .5."""
    # torch's SGD keeps buf = m * buf + g and steps lr * buf; the authors' pylearn2 rule inc = m * inc - lr * g is the
    # same update while lr is constant, and within 4e-6 (relative) under their 1.000004 per-step decay.
    return torch.optim.SGD(params, lr=0.1, momentum=0.5)


def _no_closure() -> None:
    return None


def _mark_weights_loaded(module: nn.Module, incompatible_keys: Any) -> None:
    module._fresh_weights = False


def optimizer_settings(optimizers: Sequence[Optimizer], skipped_updates: int | None) -> dict[str, float]:
    """The discriminator's and the generator's learning rate and momentum (where they have one), and the skipped
    updates (where counted), to log."""
    groups = {tag: optimizer.param_groups[0] for tag, optimizer in zip("dg", optimizers, strict=True)}
    settings = {f"train/lr_{tag}": group["lr"] for tag, group in groups.items()}
    settings |= {f"train/momentum_{tag}": group["momentum"] for tag, group in groups.items() if "momentum" in group}
    return settings if skipped_updates is None else {"train/skipped_updates": float(skipped_updates), **settings}


def _mean_outputs(real_logits: Tensor, fake_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Mean D(x) and D(G(z)) from the logits."""
    return torch.sigmoid(real_logits).mean(), torch.sigmoid(fake_logits).mean()


def check_arguments(
    generator: nn.Module,
    k: int,
    schedule: str,
    generator_loss: str,
    lr_decay: float,
    nonfinite: str,
    cuda_graph: bool,
) -> None:
    """The checks of :class:`GAN`'s arguments (see its ``Raises``)."""
    check_positive_int("k", k)
    if schedule not in ("alternating", "simultaneous"):
        raise ValueError(f"Expected `schedule` to be 'alternating' or 'simultaneous', but got {schedule!r}.")
    if schedule == "simultaneous" and k != 1:
        raise ValueError(
            f"The 'simultaneous' schedule updates both networks from one minibatch, so `k` must be 1, but got "
            f"k={k}; use schedule='alternating' for k > 1."
        )
    if generator_loss not in ("minimax", "non_saturating"):
        raise ValueError(f"Expected `generator_loss` to be 'minimax' or 'non_saturating', but got {generator_loss!r}.")
    if lr_decay < 1:
        raise ValueError(f"Expected `lr_decay` >= 1 (1 keeps the learning rate constant), but got {lr_decay}.")
    if not (hasattr(generator, "noise_dim") and callable(getattr(generator, "sample_noise", None))):
        raise TypeError(
            f"The generator {type(generator).__name__} needs an attribute `noise_dim` and a method "
            "`sample_noise(n, device)`; see lightning_gan.MLPGenerator for an example."
        )
    if cuda_graph and nonfinite == "skip":
        raise ValueError(
            "`nonfinite='skip'` decides on the host before every update, which a CUDA graph cannot wait for: use "
            "`nonfinite: stop` with `cuda_graph: true`, or `cuda_graph: false`."
        )


def make_optimizer(name: str, factory: Any, network: nn.Module, graph_safe: bool) -> Optimizer:
    """``factory(network.parameters())``, refusing a learning rate that is not positive with the key to set, and,
    where ``graph_safe``, an optimizer that cannot step inside a CUDA graph (checked on every device, so that a
    config tried on a CPU also runs on a GPU)."""
    fix = f"set `{name}_optimizer.init_args.lr` (--model.init_args.{name}_optimizer.init_args.lr) to a value > 0"
    try:
        optimizer = factory(network.parameters())
    except ValueError as err:  # torch's own check, e.g. "Invalid learning rate: -0.1"
        raise ValueError(
            f"The {name} optimizer rejected its arguments ({err}): expected a positive learning rate; {fix}."
        ) from err
    for group in optimizer.param_groups:
        if not group["lr"] > 0:
            raise ValueError(
                f"Expected a positive learning rate for the {name} optimizer, but got lr={group['lr']}; {fix}."
            )
    if graph_safe:
        check_graph_safe(optimizer, name)
    return optimizer


def check_optimizers(optimizers: Sequence[Optimizer], discriminator: nn.Module, generator: nn.Module) -> None:
    """Refuse optimizers that are not the discriminator's, then the generator's (an overridden
    ``configure_optimizers`` may return them the other way round)."""
    fix = "`configure_optimizers` must return two optimizers: the discriminator's first, then the generator's"
    if len(optimizers) != 2:
        raise ValueError(f"{fix}, but it returned {len(optimizers)}.")
    for index, (name, network) in enumerate((("discriminator", discriminator), ("generator", generator))):
        own = {id(parameter) for parameter in network.parameters()}
        held = [parameter for group in optimizers[index].param_groups for parameter in group["params"]]
        if not held or any(id(parameter) not in own for parameter in held):
            raise ValueError(f"{fix}, but optimizer {index} holds parameters that are not the {name}'s.")


def check_image_shape(gan: GAN, datamodule: Any, ckpt_path: str | None = None) -> None:
    """Refuse networks built for images of another shape than the datamodule's, naming the key to set; or, when
    the CLI built them from the settings saved in ``ckpt_path`` (``GAN.built_from_checkpoint``, set by
    :class:`~lightning_gan.ckpt_settings.CheckpointSettingsNotice`), the data to use."""
    images = datamodule_images(datamodule, "train", needed_by=None)
    if images is None:
        return
    shape = tuple(images.shape[1:])
    for name, attribute in (("discriminator", "in_shape"), ("generator", "out_shape")):
        network = getattr(gan, name)
        built_for = getattr(network, attribute, None)
        if not isinstance(built_for, Sequence) or tuple(built_for) == shape:
            continue  # a network that does not say its shape (as a sequence) is left to fail on its own
        fix = (
            f"set `model.init_args.{name}.init_args.{attribute}` to {list(shape)}"
            if attribute in inspect.signature(type(network)).parameters
            else f"choose the arguments of {type(network).__name__} that make its `{attribute}` {list(shape)}"
        )
        if ckpt_path is not None:  # its weights fit this shape only: another `in_shape` would not load them
            fix = (
                f"the checkpoint {ckpt_path} holds networks for {tuple(built_for)} images (with --ckpt_path, the "
                "networks are built from its own settings, whatever the config says): evaluate or resume it on "
                f"data of that shape (the dataset it was trained on), or train a new run for {shape} images"
            )
        raise ValueError(
            f"The {name} is built for images of shape {tuple(built_for)}, but the data's are {shape}: {fix}."
        )


def check_ddp(model: nn.Module) -> None:
    """Refuse a DDP wrapper that waits for every parameter's gradient (Lightning-AI/pytorch-lightning#20328)."""
    if isinstance(model, DistributedDataParallel) and not model.find_unused_parameters:
        raise ValueError(
            "Each backward pass of a GAN trains one network, so DDP must be told that the other's parameters get "
            'no gradient: use `strategy="ddp_find_unused_parameters_true"` (or the `ddp_spawn_`/`ddp_fork_` '
            "variant of it, or `DDPStrategy(find_unused_parameters=True)`); `lightning-gan` sets it for you."
        )


def warn_untrained(stage: str) -> None:
    rank_zero_warn(
        f"GAN: {stage} runs on initial weights, neither trained nor loaded from a checkpoint: pass one "
        f"(`lightning-gan {stage} --ckpt_path PATH`, `trainer.{stage}(..., ckpt_path=PATH)`) to measure a "
        "trained GAN."
    )


def init_output_bias(generators: list[nn.Module | None], datamodule: Any) -> None:
    """Set the ``generators``' output bias from the training data's per-pixel mean (``datamodule.pixel_mean()``)."""
    pixel_mean = getattr(datamodule, "pixel_mean", None)
    if not callable(pixel_mean):
        rank_zero_warn(
            "The generator asks for its output bias from the training data (`output_bias_from_data`), but the "
            "datamodule has no `pixel_mean()`; the bias stays at its initial value."
        )
        return
    marginals = pixel_mean()
    for generator in filter(None, generators):
        generator.init_output_bias(marginals)


def attached_trainer(module: LightningModule) -> Trainer | None:
    """The module's trainer, or ``None`` when it has none (where ``module.trainer`` raises)."""
    try:
        return module.trainer
    except RuntimeError:
        return None
