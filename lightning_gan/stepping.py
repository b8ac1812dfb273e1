"""Stepping a GAN's schedulers by hand, as manual optimization asks: the authors' per-update decay and per-epoch
momentum ramp by type, and any other scheduler of an overridden ``configure_optimizers`` as Lightning's automatic
optimization would (through the module's ``lr_scheduler_step``), counting each optimizer's own updates for
``interval: "step"``."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from lightning.pytorch import LightningModule
from lightning.pytorch.core.optimizer import LRSchedulerConfig
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from lightning_gan.schedules import ExponentialDecay, MomentumRamp

StepHook = Callable[[Any, Any], None]  # LightningModule.lr_scheduler_step(scheduler, metric)


class SchedulerStepper:
    """Steps the schedulers in ``configs`` (a trainer's ``lr_scheduler_configs``) of the discriminator's and the
    generator's optimizer, ``optimizers``; ``step_hook``: the module's ``lr_scheduler_step``."""

    def __init__(self, configs: list[LRSchedulerConfig], optimizers: list[Optimizer], step_hook: StepHook) -> None:
        self.configs, self.step_hook = configs, step_hook
        # per optimizer: (scheduler, frequency, step) for those stepped after every frequency-th of its updates
        self.per_update = [self._per_update(optimizer) for optimizer in optimizers]

    @classmethod
    def start(cls, module: LightningModule) -> SchedulerStepper:
        """The stepper of ``module``'s trainer when training starts: checked, and its per-epoch schedulers caught up
        with the epoch (after a resume from the last batch's checkpoint, no ``on_train_epoch_start`` comes)."""
        trainer = module.trainer
        stepper = cls(trainer.lr_scheduler_configs, trainer.optimizers, module.lr_scheduler_step)
        stepper.check(is_overridden("lr_scheduler_step", module, LightningModule))
        stepper.catch_up(trainer.current_epoch)
        return stepper

    def of_type(self, kind: type, optimizer: Optimizer | None = None) -> list[Any]:
        """The schedulers of type ``kind`` (of ``optimizer`` only, if given)."""
        return [
            config.scheduler
            for config in self.configs
            if isinstance(config.scheduler, kind) and optimizer in (None, config.scheduler.optimizer)
        ]

    def others(self, interval: str | None = None) -> list[LRSchedulerConfig]:
        """The configs of schedulers besides the authors' (with this ``interval``, if given)."""
        return [
            config
            for config in self.configs
            if interval in (None, config.interval)
            and not isinstance(config.scheduler, (ExponentialDecay, MomentumRamp))
        ]

    @property
    def only_decays(self) -> bool:
        """Whether the authors' decay is the only per-update scheduler (it changes no CUDA-graph constant)."""
        return all(
            isinstance(scheduler, ExponentialDecay) for entries in self.per_update for scheduler, _, _ in entries
        )

    def check(self, step_hook_overridden: bool) -> None:
        """Refuse other schedulers that the authors' decay would undo, and a ``ReduceLROnPlateau`` that nothing gives
        its metric (Lightning's manual optimization drops the scheduler dict's ``monitor``)."""
        others = [config.scheduler for config in self.others()]
        decayed = [decay.optimizer for decay in self.of_type(ExponentialDecay)]
        if any(other.optimizer is optimizer for other in others for optimizer in decayed):
            raise ValueError(
                "`lr_decay` (the authors' decay) sets the learning rate from its initial value at every update, which "
                "would undo the other schedulers that `configure_optimizers` returns: set `lr_decay: 1` "
                "(--model.init_args.lr_decay=1) to schedule the learning rate with your own."
            )
        if any(isinstance(other, ReduceLROnPlateau) for other in others) and not step_hook_overridden:
            raise ValueError(
                "A ReduceLROnPlateau scheduler needs the value of a metric, but under manual optimization Lightning "
                "drops the scheduler dict's `monitor`: override `lr_scheduler_step(self, scheduler, metric)` to call "
                "`scheduler.step(self.trainer.callback_metrics['val/d_loss'])` (or the metric you watch) for it and "
                '`super().lr_scheduler_step(scheduler, metric)` for the others, and give it `"interval": "epoch"`, '
                "so that validation has run."
            )

    def _per_update(self, optimizer: Optimizer) -> list[tuple[Any, int, Callable[[], Any]]]:
        # the authors' decay by its own `step`, on the hot path without the user's hook
        schedulers = [(decay, 1, decay.step) for decay in self.of_type(ExponentialDecay, optimizer)]
        schedulers += [
            (config.scheduler, config.frequency, partial(self.step_hook, config.scheduler, None))
            for config in self.others("step")
            if config.scheduler.optimizer is optimizer
        ]
        return schedulers

    def after_update(self, index: int, updates: int) -> None:
        """Step optimizer ``index``'s per-update schedulers after its ``updates``-th update."""
        for _, frequency, step in self.per_update[index]:
            if updates % frequency == 0:
                step()

    def after_step(self, step: int, k: int, discriminator: bool = True, generator: bool = True) -> None:
        """After training step ``step`` (0-based; a generator update every ``k``), step the per-update schedulers of
        the ``discriminator``'s and the ``generator``'s optimizer, if they were updated."""
        if discriminator:
            self.after_update(0, step + 1)
        if generator:
            self.after_update(1, (step + 1) // k)

    def catch_up(self, epoch: int) -> None:
        """Bring the per-epoch schedulers to the start of (0-based) ``epoch``: a checkpoint saved at the end of
        validation, or of an epoch's last batch, precedes the epoch end that steps them."""
        for ramp in self.of_type(MomentumRamp):
            while ramp.last_epoch < epoch:
                ramp.step()
        for config in self.others("epoch"):
            if isinstance(config.scheduler, LRScheduler) and not isinstance(config.scheduler, ReduceLROnPlateau):
                while config.scheduler.last_epoch < epoch // config.frequency:
                    self.step_hook(config.scheduler, None)

    def end_epoch(self, epoch: int, restarting: bool) -> None:
        """Step the per-epoch schedulers at the end of (0-based) ``epoch``; ``restarting``: a resume repeating the end
        of the saved epoch, whose metrics are gone (a ``ReduceLROnPlateau`` is left alone then, as Lightning does)."""
        for ramp in self.of_type(MomentumRamp):
            ramp.step()
        for config in self.others("epoch"):
            if isinstance(config.scheduler, ReduceLROnPlateau) and restarting:
                continue
            if (epoch + 1) % config.frequency == 0:
                self.step_hook(config.scheduler, None)
