"""The adversarial training procedure of Goodfellow et al. (2014) as a manual-optimization LightningModule.

Step counting: ``trainer.global_step`` (and so ``max_steps``, ``log_every_n_steps``, checkpointing every n steps)
counts *training steps*, which is the number of discriminator updates. Lightning would count every optimizer
step; generator steps are left out of the count so that the number means the same for every ``k`` and schedule.
Generator updates so far: :attr:`GAN.generator_updates`. A training batch is one step, or, stacked as
``(S, B, C, H, W)`` (``GANDataModule(steps_per_batch=S)``), S steps: then what Lightning does per batch (callbacks'
batch hooks, an integer ``val_check_interval``, ``limit_train_batches``, the progress bar) it does per stack, and
step counts checked after a batch (``max_steps``, ``log_every_n_steps``, checkpointing every n steps) must be
multiples of S.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.core.optimizer import LightningOptimizer, LRSchedulerConfig
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from lightning_gan.averaging import GeneratorAveraging
from lightning_gan.graphed import CudaGraphTraining, check_graph_safe
from lightning_gan.guards import NonFinite, NonFiniteGuard, check_architecture
from lightning_gan.nets import eval_forward
from lightning_gan.resume import rng_state, set_rng_state
from lightning_gan.schedules import ExponentialDecay, MomentumRamp

Schedule = Literal["alternating", "simultaneous"]
GeneratorLoss = Literal["minimax", "non_saturating"]


def _paper_sgd(params: Any) -> Optimizer:
    # torch's SGD keeps buf = m * buf + g and steps lr * buf; the authors' pylearn2 rule inc = m * inc - lr * g is the
    # same update while lr is constant, and within 4e-6 (relative) under their 1.000004 per-step decay.
    return torch.optim.SGD(params, lr=0.1, momentum=0.5)


def _do_nothing() -> None:
    return None


def _mark_weights_loaded(module: nn.Module, incompatible_keys: Any) -> None:
    module._fresh_weights = False


class _StackedSteps(Callback):
    """Counts a batch that holds a stack of training steps (``GANDataModule(steps_per_batch=S)``) as its steps in
    Lightning's count of batches, before any other callback's ``on_train_batch_start`` (see ``GAN._count_stack``)."""

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if isinstance(pl_module, GAN):  # the trainer may fit another module next
            pl_module._count_stack(batch)


class GAN(CudaGraphTraining, GeneratorAveraging, LightningModule):
    """Generative adversarial nets trained by the paper's Algorithm 1, or by the authors' simultaneous update.

    Args:
        generator: module with attribute ``noise_dim``, method ``sample_noise(n, device)`` and ``generator(z)``
            returning images ``(n, C, H, W)`` in data space.
        discriminator: module mapping images ``(n, C, H, W)`` to logits ``(n,)``.
        k: discriminator updates per generator update (``alternating`` only).
        schedule: ``"alternating"``: every batch makes one discriminator update on fresh real data and fresh noise,
            and after every ``k``-th one the generator makes one update on fresh noise (Algorithm 1).
            ``"simultaneous"``: one noise draw and one minibatch update both networks from the same discriminator
            parameters (the authors' MNIST code; ``k`` must be 1).
        generator_loss: ``"non_saturating"`` descends ``-log D(G(z))``; ``"minimax"`` descends ``log(1 - D(G(z)))``.
        generator_optimizer: optimizer factory for the generator; ``None`` is the paper's SGD (lr .1, momentum .5).
        discriminator_optimizer: optimizer factory for the discriminator; ``None`` as above.
        lr_decay: divide each learning rate by this after every update of its network (1 switches it off).
        min_lr: floor of the decayed learning rate.
        momentum_final: ramp each optimizer's momentum linearly to this value (``None`` switches it off).
        momentum_start_epoch: (1-based) epoch where the ramp starts.
        momentum_saturate_epoch: (1-based) epoch where the momentum reaches ``momentum_final``.
        nonfinite: what a NaN or infinite loss does. ``"stop"``: raise
            :class:`~lightning_gan.guards.NonFiniteError` naming the step and the network, before the update is
            applied and before any checkpoint of it is written (on an accelerator the check is deferred to the next
            logging step or checkpoint, to spare a host sync per step; the error still names the first bad step;
            see :mod:`lightning_gan.guards`). ``"skip"``: leave that update out (the batch still counts in
            ``global_step``), count it in :attr:`skipped_updates` and log ``train/skipped_updates``; it stops all
            the same when the network's parameters are non-finite.
        cuda_graph: on a CUDA device, capture each batch's whole update as a CUDA graph and replay it (see
            :mod:`lightning_gan.graphed`): the same update, without the host launching hundreds of kernels per batch.
            Needs ``torch.optim.SGD``, ``Adam`` or ``AdamW``, one device, non-mixed precision and ``nonfinite="stop"``
            (checked on every device, a ``ValueError`` when fitting starts); callbacks' ``on_before_backward``,
            ``on_after_backward`` and ``on_before_optimizer_step`` are not called. Elsewhere (CPU) training runs the
            usual eager update, unchanged.
        ema_decay: keep an exponential moving average of the generator's weights with this decay (e.g. ``0.999``),
            as :attr:`generator_ema` (a deep copy of ``generator``), and draw from it in :meth:`sample`, the figure
            callbacks and the Parzen evaluation (see :mod:`lightning_gan.averaging`; not in the paper). Needs 32- or
            64-bit weights (``precision`` ``32-true``, ``64-true`` or a ``-mixed`` one), checked when fitting starts.
            ``None``: no average.

    Raises:
        ValueError: for ``k < 1``, an unknown schedule or loss, ``"simultaneous"`` with ``k > 1``,
            ``lr_decay < 1``, an unknown ``nonfinite``, ``cuda_graph`` with ``nonfinite="skip"``, or ``ema_decay``
            outside ``(0, 1)``.
        TypeError: if ``generator`` lacks ``noise_dim`` or ``sample_noise``.
    """

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        k: int = 1,
        schedule: Schedule = "alternating",
        generator_loss: GeneratorLoss = "non_saturating",
        generator_optimizer: OptimizerCallable | None = None,
        discriminator_optimizer: OptimizerCallable | None = None,
        lr_decay: float = 1.000004,
        min_lr: float = 1e-6,
        momentum_final: float | None = 0.7,
        momentum_start_epoch: int = 1,
        momentum_saturate_epoch: int = 250,
        nonfinite: NonFinite = "stop",
        cuda_graph: bool = False,
        ema_decay: float | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"Expected `k` to be a positive integer, but got {k!r}.")
        if schedule not in ("alternating", "simultaneous"):
            raise ValueError(f"Expected `schedule` to be 'alternating' or 'simultaneous', but got {schedule!r}.")
        if schedule == "simultaneous" and k != 1:
            raise ValueError(
                f"The 'simultaneous' schedule updates both networks from one minibatch, so `k` must be 1, but got "
                f"k={k}; use schedule='alternating' for k > 1."
            )
        if generator_loss not in ("minimax", "non_saturating"):
            raise ValueError(
                f"Expected `generator_loss` to be 'minimax' or 'non_saturating', but got {generator_loss!r}."
            )
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
        # From LightningCLI the hyperparameters are the parsed config, networks included, so that `lightning-gan test
        # --ckpt_path` (which re-reads them) and `GAN.load_from_checkpoint(path)` rebuild the networks. From plain
        # Python, the networks (in the checkpoint as weights) and the optimizer factories (code, e.g. a partial, which
        # `torch.load(weights_only=True)` refuses to unpickle) are left out: pass them again when loading.
        from_cli = _given_hyperparameters.get() is not None
        code = ["generator", "discriminator", "generator_optimizer", "discriminator_optimizer"]
        self.save_hyperparameters(ignore=[] if from_cli else code)
        self.automatic_optimization = False
        self.generator = generator
        self.discriminator = discriminator
        self.k = k
        self.schedule = schedule
        self.generator_loss = generator_loss
        self.generator_optimizer = generator_optimizer or _paper_sgd
        self.discriminator_optimizer = discriminator_optimizer or _paper_sgd
        self.lr_decay, self.min_lr = lr_decay, min_lr
        self.momentum_final = momentum_final
        self.momentum_start_epoch, self.momentum_saturate_epoch = momentum_start_epoch, momentum_saturate_epoch
        self.nonfinite = nonfinite
        self._guard = NonFiniteGuard(nonfinite)  # raises ValueError for an unknown mode
        self.cuda_graph = cuda_graph
        self._last_g_loss: Tensor | None = None  # logged on steps without a generator update (k > 1)
        self._loader_stacks = False  # whether the training loader stacks batches (set when training starts)
        # Initial weights: neither trained (a fit started) nor loaded. A fit sets the generator's output bias from the
        # data only for them; validating or testing them gets a warning.
        self._fresh_weights = True
        self.register_load_state_dict_post_hook(_mark_weights_loaded)
        self._init_average(ema_decay)  # raises ValueError for a decay outside (0, 1)

    # ------------------------------------------------------------------ losses (override to change the game)
    def discriminator_loss(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        """The negated value function: ``0.5 * (BCE(D(x), 1) + BCE(D(G(z)), 0))`` from logits, batch mean."""
        return 0.5 * (F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean())

    def discriminator_penalty(self, real: Tensor, fake: Tensor) -> Tensor | None:
        """A term added to the discriminator's loss at each of its updates, from that update's real and generated
        images (``fake`` carries no gradient to the generator), e.g. a gradient penalty; ``None`` (the default):
        no term."""
        return None

    def generator_loss_fn(self, fake_logits: Tensor) -> Tensor:
        """``-log D(G(z))`` (non-saturating) or ``log(1 - D(G(z)))`` (minimax), batch mean, from logits."""
        if self.generator_loss == "non_saturating":
            return F.softplus(-fake_logits).mean()
        return -F.softplus(fake_logits).mean()

    # ------------------------------------------------------------------ optimizers and schedules
    def configure_optimizers(self) -> tuple[list[Optimizer], list[Any]]:
        """Discriminator and generator optimizers, then their per-update decays and per-epoch momentum ramps.

        An override returns the discriminator's optimizer first, then the generator's (checked when training
        starts); schedulers besides the authors' are stepped as Lightning's automatic optimization would (see
        :meth:`_other_schedulers`)."""
        optimizers = [
            self._make_optimizer("discriminator", self.discriminator_optimizer, self.discriminator),
            self._make_optimizer("generator", self.generator_optimizer, self.generator),
        ]
        if self.cuda_graph:  # checked on every device, so that a config tried on a CPU also runs on a GPU
            check_graph_safe(optimizers[0], "discriminator")
            check_graph_safe(optimizers[1], "generator")
        schedulers: list[Any] = []
        if self.lr_decay != 1:
            schedulers += [ExponentialDecay(opt, self.lr_decay, self.min_lr) for opt in optimizers]
        if self.momentum_final is not None:
            schedulers += [
                MomentumRamp(opt, self.momentum_final, self.momentum_start_epoch, self.momentum_saturate_epoch)
                for opt in optimizers
            ]
        return optimizers, schedulers

    @staticmethod
    def _make_optimizer(name: str, factory: Any, network: nn.Module) -> Optimizer:
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
        return optimizer

    def _schedulers(self, kind: type, optimizer: Optimizer | None = None) -> list[Any]:
        """This module's schedulers of type ``kind`` (of ``optimizer`` only, if given)."""
        return [
            config.scheduler
            for config in self.trainer.lr_scheduler_configs
            if isinstance(config.scheduler, kind) and optimizer in (None, config.scheduler.optimizer)
        ]

    def _other_schedulers(self, interval: str | None = None) -> list[LRSchedulerConfig]:
        """The schedulers of an overridden ``configure_optimizers`` (with this ``interval``, if given), besides the
        authors' (which are stepped by type). Manual optimization leaves every scheduler to the module: ``GAN`` steps
        them as Lightning's automatic optimization would, through :meth:`lr_scheduler_step`, counting each
        optimizer's own updates for ``interval: "step"``."""
        return [
            config
            for config in self.trainer.lr_scheduler_configs
            if interval in (None, config.interval)
            and not isinstance(config.scheduler, (ExponentialDecay, MomentumRamp))
        ]

    def _check_other_schedulers(self) -> None:
        """Refuse other schedulers that the authors' decay would undo, and a ``ReduceLROnPlateau`` that nothing gives
        its metric (Lightning's manual optimization drops the scheduler dict's ``monitor``)."""
        others = [config.scheduler for config in self._other_schedulers()]
        decayed = [decay.optimizer for decay in self._schedulers(ExponentialDecay)]
        if any(other.optimizer is optimizer for other in others for optimizer in decayed):
            raise ValueError(
                "`lr_decay` (the authors' decay) sets the learning rate from its initial value at every update, which "
                "would undo the other schedulers that `configure_optimizers` returns: set `lr_decay: 1` "
                "(--model.init_args.lr_decay=1) to schedule the learning rate with your own."
            )
        if any(isinstance(other, ReduceLROnPlateau) for other in others) and not is_overridden(
            "lr_scheduler_step", self, LightningModule
        ):
            raise ValueError(
                "A ReduceLROnPlateau scheduler needs the value of a metric, but under manual optimization Lightning "
                "drops the scheduler dict's `monitor`: override `lr_scheduler_step(self, scheduler, metric)` to call "
                "`scheduler.step(self.trainer.callback_metrics['val/d_loss'])` (or the metric you watch) for it and "
                '`super().lr_scheduler_step(scheduler, metric)` for the others, and give it `"interval": "epoch"`, '
                "so that validation has run."
            )

    def _per_update_schedulers(self, optimizer: Optimizer) -> list[tuple[Any, int, Callable[[], Any]]]:
        """``(scheduler, frequency, step)`` for the schedulers stepped after every ``frequency``-th update of
        ``optimizer``: the authors' decay (its own ``step``, on the hot path without the user's hook), and any other
        with ``interval: "step"`` (through :meth:`lr_scheduler_step`)."""
        schedulers = [(decay, 1, decay.step) for decay in self._schedulers(ExponentialDecay, optimizer)]
        schedulers += [
            (config.scheduler, config.frequency, partial(self.lr_scheduler_step, config.scheduler, None))
            for config in self._other_schedulers("step")
            if config.scheduler.optimizer is optimizer
        ]
        return schedulers

    @staticmethod
    def _step_per_update(schedulers: list[tuple[Any, int, Callable[[], Any]]], updates: int) -> None:
        """Step ``schedulers`` (:meth:`_per_update_schedulers`) after their optimizer's ``updates``-th update."""
        for _, frequency, step in schedulers:
            if updates % frequency == 0:
                step()

    def _check_optimizers(self) -> None:
        """Refuse optimizers that are not the discriminator's, then the generator's (an overridden
        ``configure_optimizers`` may return them the other way round)."""
        fix = "`configure_optimizers` must return two optimizers: the discriminator's first, then the generator's"
        if len(self.trainer.optimizers) != 2:
            raise ValueError(f"{fix}, but it returned {len(self.trainer.optimizers)}.")
        for index, (name, network) in enumerate((("discriminator", self.discriminator), ("generator", self.generator))):
            own = {id(parameter) for parameter in network.parameters()}
            held = [parameter for group in self._optimizer(index).param_groups for parameter in group["params"]]
            if not held or any(id(parameter) not in own for parameter in held):
                raise ValueError(f"{fix}, but optimizer {index} holds parameters that are not the {name}'s.")

    # ------------------------------------------------------------------ fit-time setup
    def setup(self, stage: str) -> None:
        trainer = self._trainer
        if trainer is None:
            return
        if isinstance(trainer.strategy, DDPStrategy) and not trainer.strategy._ddp_kwargs.get(
            "find_unused_parameters", False
        ):
            # Each backward pass trains one network, so the other's parameters get no gradient in it; DDP must be
            # told, or it waits for them (Lightning-AI/pytorch-lightning#20328).
            trainer.strategy._ddp_kwargs["find_unused_parameters"] = True
            rank_zero_info("GAN: enabling DDP `find_unused_parameters`, as each backward pass trains one network.")
        if stage == "fit" and trainer.world_size > 1:
            # seed_everything gives every rank the same seed: offset it, so that ranks draw different noise and
            # dropout masks (the weights stay identical: DDP broadcasts rank 0's and averages gradients). Here, not
            # in on_train_start, so that a resumed run's restored random state (on_load_checkpoint) is kept.
            torch.manual_seed(torch.initial_seed() + self.global_rank)
        self._check_image_shape(trainer.datamodule)
        if stage == "fit" and not any(isinstance(callback, _StackedSteps) for callback in trainer.callbacks):
            trainer.callbacks.insert(0, _StackedSteps())  # first: callbacks that log as a batch starts see its count
        if stage == "fit" and self.cuda_graph:
            self._check_cuda_graph_fits()
        # A resumed run's weights are restored after setup: for it, this bias is overwritten.
        if stage == "fit" and self._fresh_weights and getattr(self.generator, "output_bias_from_data", False):
            self._init_output_bias_from_data()

    def _check_image_shape(self, datamodule: Any) -> None:
        """Refuse networks built for images of another shape than the datamodule's, naming the key to set."""
        images = getattr(getattr(getattr(datamodule, "splits", None), "train", None), "images", None)
        if not isinstance(images, Tensor):
            return
        shape = tuple(images.shape[1:])
        for name, attribute in (("discriminator", "in_shape"), ("generator", "out_shape")):
            network = getattr(self, name)
            built_for = getattr(network, attribute, None)
            if not isinstance(built_for, Sequence) or tuple(built_for) == shape:
                continue  # a network that does not say its shape (as a sequence) is left to fail on its own
            fix = (
                f"set `model.init_args.{name}.init_args.{attribute}` to {list(shape)}"
                if attribute in inspect.signature(type(network)).parameters
                else f"choose the arguments of {type(network).__name__} that make its `{attribute}` {list(shape)}"
            )
            raise ValueError(
                f"The {name} is built for images of shape {tuple(built_for)}, but the data's are {shape}: {fix}."
            )

    def _init_output_bias_from_data(self) -> None:
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        pixel_mean = getattr(datamodule, "pixel_mean", None)
        if not callable(pixel_mean):
            rank_zero_warn(
                "The generator asks for its output bias from the training data (`output_bias_from_data`), but the "
                "datamodule has no `pixel_mean()`; the bias stays at its initial value."
            )
            return
        marginals = pixel_mean()
        self.generator.init_output_bias(marginals)
        if self.generator_ema is not None:
            self.generator_ema.init_output_bias(marginals)

    @property
    def _one_pass(self) -> bool:
        """Whether the simultaneous update is the authors' one-pass graph: on a single device (see
        :meth:`_simultaneous_losses`)."""
        return self._trainer is None or isinstance(self._trainer.strategy, SingleDeviceStrategy)

    def on_fit_start(self) -> None:
        self._check_average_precision()

    def on_train_start(self) -> None:
        self._fresh_weights = False
        self._checked_stack = 1  # the stack size whose step counts were checked, for this trainer: none yet
        self._loader_stacks = getattr(self.trainer.train_dataloader, "stack_batches", 1) > 1
        self._check_optimizers()
        self._check_other_schedulers()
        self._catch_up_epoch_schedules()
        self._continue_average(self.generator_updates)
        self._d_decay = self._per_update_schedulers(self._optimizer(0))
        self._g_decay = self._per_update_schedulers(self._optimizer(1))
        self._start_cuda_graphs()

    def _optimizer(self, index: int) -> Optimizer:
        optimizer = self.trainer.optimizers[index]
        return optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer

    # ------------------------------------------------------------------ training
    @property
    def generator_updates(self) -> int:
        """Generator updates made so far (``global_step`` counts discriminator updates)."""
        return self.global_step // self.k

    def real_images(self, batch: Any) -> Tensor:
        """The images of a training, validation or test batch: the batch itself, or the first item of an
        ``(images, labels)`` sequence. Override to read another kind of batch (e.g. a dict)."""
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        if not isinstance(images, Tensor):
            raise TypeError(
                f"GAN.real_images takes the images from a batch that is a tensor or an (images, labels) sequence, "
                f"but got {type(batch).__name__}: override `real_images(self, batch)` in a subclass to return yours."
            )
        return images

    def _stack_size(self, real: Tensor) -> int:
        """The training steps in a training batch's images: ``S`` for a stack ``(S, B, *image)``
        (``GANDataModule(steps_per_batch=S)``), else 1. A stack has one dimension more than the discriminator's
        images (its ``in_shape``); for a discriminator that does not say, the loader says (``stack_batches``)."""
        in_shape = getattr(self.discriminator, "in_shape", None)
        stacked = real.dim() == len(in_shape) + 2 if isinstance(in_shape, Sequence) else self._loader_stacks
        return real.shape[0] if stacked else 1

    def _update(
        self,
        optimizer: LightningOptimizer,
        network: nn.Module,
        decays: list[tuple[Any, int, Callable[[], Any]]],
        counted: bool,
    ) -> None:
        if counted:
            optimizer.step()
        else:
            # Stepping without Lightning's step hooks keeps generator updates out of `global_step`.
            before, after = optimizer._on_before_step, optimizer._on_after_step
            optimizer._on_before_step = optimizer._on_after_step = _do_nothing
            try:
                optimizer.step()
            finally:
                optimizer._on_before_step, optimizer._on_after_step = before, after
        self._constrain(network)
        if network is self.generator and self.generator_ema is not None:
            self._set_average_weight(self.generator_updates)
            self._average_generator()
        self._step_per_update(decays, self.generator_updates if network is self.generator else self.global_step)

    @staticmethod
    def _constrain(network: nn.Module) -> None:
        apply_constraints = getattr(network, "apply_constraints", None)
        if callable(apply_constraints):
            apply_constraints()

    def _simultaneous_losses(self, real: Tensor, g_opt: LightningOptimizer) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Both objectives from one noise draw and the same discriminator parameters.

        On one device, the authors' graph exactly: one discriminator pass on the fake batch (one dropout mask) feeds
        both objectives, and :meth:`_simultaneous_backward` takes each network's gradient from its own objective.
        Under DDP, which needs one backward pass per step, the generator's pass through D is a second forward with D's
        parameters frozen (its own dropout mask): the same expected gradient, and one backward gives each network
        exactly its own."""
        fake = self.generator(self.generator.sample_noise(real.shape[0], self.device))
        real_logits = self.discriminator(real)
        if self._one_pass:
            fake_logits = self.discriminator(fake)
            d_loss = self._with_penalty(self.discriminator_loss(real_logits, fake_logits), real, fake)
            return d_loss, self.generator_loss_fn(fake_logits), real_logits, fake_logits
        fake_logits = self.discriminator(fake.detach())
        d_loss = self._with_penalty(self.discriminator_loss(real_logits, fake_logits), real, fake)
        with self.toggled_optimizer(g_opt):
            g_loss = self.generator_loss_fn(self.discriminator(fake))
        return d_loss, g_loss, real_logits, fake_logits

    def _simultaneous_backward(self, d_loss: Tensor, g_loss: Tensor, backward: Any) -> None:
        """Each network's gradient from its own objective, through ``backward`` (``manual_backward`` or a tensor's)."""
        if self._one_pass:
            backward(d_loss, inputs=[p for p in self.discriminator.parameters() if p.requires_grad], retain_graph=True)
            backward(g_loss, inputs=[p for p in self.generator.parameters() if p.requires_grad])
        else:
            backward(d_loss + g_loss)

    def _discriminator_objective(self, real: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Discriminator loss on ``real`` and fresh samples, and the two batches' logits."""
        with torch.no_grad():
            fake = self.generator(self.generator.sample_noise(real.shape[0], self.device))
        real_logits = self.discriminator(real)
        fake_logits = self.discriminator(fake)
        return (
            self._with_penalty(self.discriminator_loss(real_logits, fake_logits), real, fake),
            real_logits,
            fake_logits,
        )

    def _with_penalty(self, d_loss: Tensor, real: Tensor, fake: Tensor) -> Tensor:
        penalty = self.discriminator_penalty(real, fake.detach())
        return d_loss if penalty is None else d_loss + penalty

    def _generator_objective(self, g_opt: LightningOptimizer, n: int) -> Tensor:
        """Generator loss on fresh noise; the discriminator's parameters get no gradient from it."""
        with self.toggled_optimizer(g_opt):
            fake_logits = self.discriminator(self.generator(self.generator.sample_noise(n, self.device)))
        return self.generator_loss_fn(fake_logits)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        """One training step on the batch's images ``(B, C, H, W)``, or one per minibatch, in order, of a stack of
        them ``(S, B, C, H, W)`` (``GANDataModule(steps_per_batch=S)``)."""
        real = self.real_images(batch)
        steps = (real,) if self._stack_size(real) == 1 else real.unbind(0)  # counted by _StackedSteps before the batch
        log = self.trainer._logger_connector.should_update_logs  # for the batch's last step
        step = self._batch_graphed_step() if self._graphs is not None else self._eager_training_step
        for index, minibatch in enumerate(steps):
            step(minibatch, log and index == len(steps) - 1)

    def _count_stack(self, batch: Any) -> None:
        """For a stack of steps: check its size against the run's step counts, and make Lightning's count of
        batches (the loggers' x-axis and ``log_every_n_steps``) count steps."""
        size = self._stack_size(self.real_images(batch))
        if size == 1:
            return
        if size != self._checked_stack:
            self._check_stack(size)
        if self.global_step % size:
            raise ValueError(
                f"A stack of {size} steps starts at global step {self.global_step}, which is no multiple of {size}: "
                "every stack must hold the same number of steps (`steps_per_batch`), and a run must resume with "
                "the number it was saved with."
            )
        # the batch's steps but its last, which Lightning adds after it
        self.trainer.fit_loop.epoch_loop._batches_that_stepped = self.global_step + size - 1

    def _check_stack(self, size: int) -> None:
        """Refuse step counts that Lightning tests after each batch (``global_step % n == 0``) and that a stack of
        ``size`` steps per batch would skip over, and a ``max_steps`` inside a stack."""
        trainer = self.trainer
        counts = {
            "trainer.log_every_n_steps": trainer.log_every_n_steps,
            "trainer.max_steps": max(trainer.max_steps, 0),
        }
        for callback in trainer.callbacks:
            count = getattr(callback, "_every_n_train_steps", None)  # ModelCheckpoint's
            if count:
                counts[f"{type(callback).__name__}.every_n_train_steps"] = count
        misfits = [f"{name}={count}" for name, count in counts.items() if count % size]
        if misfits:
            raise ValueError(
                f"Batches of {size} stacked steps (`steps_per_batch`) advance `global_step` {size} at a time, so step "
                f"counts checked after a batch must be multiples of {size}, but {', '.join(misfits)}: change them or "
                "`steps_per_batch`."
            )
        self._checked_stack = size

    def _eager_training_step(self, real: Tensor, log: bool) -> None:
        d_opt, g_opt = self.optimizers()
        n, step = real.shape[0], self.global_step
        if self.schedule == "simultaneous":
            d_loss, g_loss, real_logits, fake_logits = self._simultaneous_losses(real, g_opt)
            d_opt.zero_grad(set_to_none=True)
            g_opt.zero_grad(set_to_none=True)
            self._simultaneous_backward(d_loss, g_loss, self.manual_backward)
            if self._guard.allows(self, step, d_loss, g_loss):
                self._update(d_opt, self.discriminator, self._d_decay, counted=True)
                self._update(g_opt, self.generator, self._g_decay, counted=False)
            else:
                self._skip_update(d_opt, counted=True)
                self._skip_update(g_opt, counted=False)
        else:
            d_loss, real_logits, fake_logits = self._discriminator_objective(real)
            d_opt.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            if self._guard.allows(self, step, d_loss, None):
                self._update(d_opt, self.discriminator, self._d_decay, counted=True)
            else:
                self._skip_update(d_opt, counted=True)
            g_loss = None
            if self.global_step % self.k == 0:
                g_loss = self._generator_objective(g_opt, n)
                g_opt.zero_grad(set_to_none=True)
                self.manual_backward(g_loss)
                if self._guard.allows(self, step, None, g_loss):
                    self._update(g_opt, self.generator, self._g_decay, counted=False)
                else:
                    self._skip_update(g_opt, counted=False)
        if g_loss is not None:
            self._last_g_loss = g_loss.detach()
        if log:
            d_real, d_fake = self._mean_outputs(real_logits.detach(), fake_logits.detach())
            self._log_step("train", d_loss, self._last_g_loss, d_real, d_fake)

    def on_train_epoch_start(self) -> None:
        self._catch_up_epoch_schedules()

    def _catch_up_epoch_schedules(self) -> None:
        # A checkpoint saved at the end of validation, or of an epoch's last batch, precedes on_train_epoch_end: on
        # resume, catch up the ramp and the other per-epoch schedulers (after the last batch's checkpoint Lightning
        # starts the next epoch without on_train_epoch_start, hence also in on_train_start).
        for ramp in self._schedulers(MomentumRamp):
            while ramp.last_epoch < self.current_epoch:
                ramp.step()
        for config in self._other_schedulers("epoch"):
            if isinstance(config.scheduler, LRScheduler) and not isinstance(config.scheduler, ReduceLROnPlateau):
                while config.scheduler.last_epoch < self.current_epoch // config.frequency:
                    self.lr_scheduler_step(config.scheduler, None)

    def on_train_epoch_end(self) -> None:
        self._guard.check_deferred(self)
        for ramp in self._schedulers(MomentumRamp):
            ramp.step()
        for config in self._other_schedulers("epoch"):
            if isinstance(config.scheduler, ReduceLROnPlateau) and self.trainer.fit_loop.restarting:
                continue  # a resume repeating the end of the saved epoch, whose metrics are gone (as Lightning does)
            if (self.current_epoch + 1) % config.frequency == 0:
                self.lr_scheduler_step(config.scheduler, None)

    @property
    def skipped_updates(self) -> int:
        """Updates left out for a non-finite loss (``nonfinite="skip"``); checkpointed."""
        return self._guard.skipped

    @staticmethod
    def _count_step(optimizer: LightningOptimizer) -> None:
        """Advance ``global_step`` by one, as a discriminator ``optimizer.step()`` through Lightning does."""
        optimizer._on_before_step()
        optimizer._on_after_step()

    def _skip_update(self, optimizer: LightningOptimizer, counted: bool) -> None:
        """Leave an update out; a counted (discriminator) one still advances ``global_step``, as a batch was used."""
        optimizer.zero_grad(set_to_none=True)
        if counted:
            self._count_step(optimizer)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._guard.deferred(self) and self.global_step % max(self.trainer.log_every_n_steps, 1) == 0:
            self._guard.check_deferred(self)

    @staticmethod
    def _mean_outputs(real_logits: Tensor, fake_logits: Tensor) -> tuple[Tensor, Tensor]:
        """Mean D(x) and D(G(z)) from the logits."""
        return torch.sigmoid(real_logits).mean(), torch.sigmoid(fake_logits).mean()

    def _log_step(self, prefix: str, d_loss: Tensor, g_loss: Tensor | None, d_real: Tensor, d_fake: Tensor) -> None:
        """Log the losses and the discriminator's mean outputs (in training, ``g_loss`` is the latest generator
        update's). Training metrics are logged only on the steps whose values reach the loggers (all they would see):
        each ``self.log`` costs Lightning about a millisecond of host time, more than a whole MNIST update on a GPU."""
        on_step = prefix == "train"
        metrics = {f"{prefix}/d_loss": d_loss.detach(), f"{prefix}/d_real": d_real, f"{prefix}/d_fake": d_fake}
        if g_loss is not None:
            metrics[f"{prefix}/g_loss"] = g_loss.detach()
        self.log_dict(metrics, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step, prog_bar=False)
        if on_step and self.nonfinite == "skip":  # "skip" reads its flag back every update anyway (see guards.py)
            self.log("train/skipped_updates", float(self.skipped_updates), on_step=True, on_epoch=False)
        if on_step:
            d_opt, g_opt = self._optimizer(0), self._optimizer(1)
            self.log_dict(
                {
                    "train/lr_d": d_opt.param_groups[0]["lr"],
                    "train/lr_g": g_opt.param_groups[0]["lr"],
                    **{
                        f"train/momentum_{tag}": opt.param_groups[0]["momentum"]
                        for tag, opt in (("d", d_opt), ("g", g_opt))
                        if "momentum" in opt.param_groups[0]
                    },
                },
                on_step=True,
                on_epoch=False,
            )

    # ------------------------------------------------------------------ checkpoints: exact resume, no broken files
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to save non-finite weights; add every rank's random state and the skipped-update count."""
        self._guard.check_before_saving(self)
        states = [rng_state(self.device)]
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1 and torch.distributed.is_initialized():
            states = [None] * trainer.world_size
            torch.distributed.all_gather_object(states, rng_state(self.device))
        checkpoint["lightning_gan"] = {
            "rng_states": states,
            "skipped_updates": self.skipped_updates,
            "ema_updates": self._ema_updates,
        }
        self._checkpoint_as_eager(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Fit the generator average to the checkpoint; when fitting, restore this rank's random state (exact
        resume). The networks are checked against its weights when they load (:meth:`load_state_dict`)."""
        self._fit_average_to(checkpoint, int(checkpoint.get("global_step", 0)) // self.k)
        self._fresh_weights = False
        if self._graphs is not None:
            self._graphs.reset()  # restored optimizer state is new tensors, which no graph has captured
        state = checkpoint.get("lightning_gan") or {}
        self._guard.skipped = int(state.get("skipped_updates", 0))
        trainer = self._trainer
        loop = trainer.fit_loop.epoch_loop if trainer is not None else None
        if (
            loop is not None
            and trainer.state.fn in (TrainerFn.VALIDATING, TrainerFn.TESTING)
            and not loop._batches_that_stepped
        ):
            # the loggers' x-axis: the evaluated checkpoint's step (Lightning restores no step outside a fit), for a
            # trainer that has not fitted (one that has keeps counting its own steps)
            loop._batches_that_stepped = int(checkpoint.get("global_step", 0))
        if trainer is None or trainer.state.fn != TrainerFn.FITTING or "rng_states" not in state:
            return
        states = state["rng_states"]
        if len(states) != trainer.world_size:
            rank_zero_warn(
                f"The checkpoint holds the random state of {len(states)} process(es), this run has "
                f"{trainer.world_size}: training continues correctly, but not bitwise as the original run would have."
            )
        if self.global_rank < len(states):
            set_rng_state(states[self.global_rank], self.device)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``; a strict load of other networks' weights raises a ``ValueError`` that
        names them and the fix (Lightning loads strictly unless ``strict_loading`` or ``strict=False`` say not)."""
        if strict:
            check_architecture(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ------------------------------------------------------------------ evaluation
    def _evaluation_step(self, batch: Any, batch_idx: int, prefix: str) -> None:
        real = self.real_images(batch)
        fake = self.generator(self._evaluation_noise(real.shape[0], batch_idx))
        real_logits, fake_logits = self.discriminator(real), self.discriminator(fake)
        d_loss = self.discriminator_loss(real_logits, fake_logits)
        d_real, d_fake = self._mean_outputs(real_logits, fake_logits)
        self._log_step(prefix, d_loss, self.generator_loss_fn(fake_logits), d_real, d_fake)

    def _evaluation_noise(self, n: int, batch_idx: int) -> Tensor:
        """The noise of an evaluation batch: seeded by the batch index and the rank, so that the numbers are
        reproducible, every rank draws its own, and training's random stream is left untouched."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(batch_idx * self.trainer.world_size + self.global_rank)
            return self.generator.sample_noise(n, self.device)

    def on_validation_start(self) -> None:
        self._warn_if_untrained("validate")

    def on_test_start(self) -> None:
        self._warn_if_untrained("test")

    def _warn_if_untrained(self, stage: str) -> None:
        if self._fresh_weights and self.trainer.state.fn != TrainerFn.FITTING:
            rank_zero_warn(
                f"GAN: {stage} runs on initial weights, neither trained nor loaded from a checkpoint: pass one "
                f"(`lightning-gan {stage} --ckpt_path PATH`, `trainer.{stage}(..., ckpt_path=PATH)`) to measure a "
                "trained GAN."
            )

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluation_step(batch, batch_idx, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluation_step(batch, batch_idx, "test")

    def sample(self, n: int) -> Tensor:
        """Draw ``n`` images ``(n, C, H, W)`` from :attr:`sampling_generator` (the generator, or its weight average),
        in eval mode, on the module's device."""
        generator = self.sampling_generator
        return eval_forward(generator, generator.sample_noise(n, self.device))
