"""Batches that stack several training steps, ``(S, B, C, H, W)`` (``GANDataModule(steps_per_batch=S)``): what
Lightning does per batch it then does per stack, and its step counts must stay multiples of ``S``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor

from lightning_gan._lightning import checkpoint_cadence, set_logged_steps


def stack_size(images: Tensor, in_shape: Any, loader_stacks: bool) -> int:
    """The training steps in a training batch's ``images``: ``S`` for a stack ``(S, B, *image)``, else 1. A stack has
    one dimension more than the discriminator's images (its ``in_shape``); for a discriminator that does not say,
    ``loader_stacks`` (whether the training loader stacks batches) decides."""
    stacked = images.dim() == len(in_shape) + 2 if isinstance(in_shape, Sequence) else loader_stacks
    return images.shape[0] if stacked else 1


def check_step_counts(trainer: Trainer, size: int) -> None:
    """Refuse step counts that Lightning tests after each batch (``global_step % n == 0``) and that a stack of
    ``size`` steps per batch would skip over, and a ``max_steps`` inside a stack."""
    counts = {
        "trainer.log_every_n_steps": trainer.log_every_n_steps,
        "trainer.max_steps": max(trainer.max_steps, 0),
    }
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and checkpoint_cadence(callback)[0]:
            counts[f"{type(callback).__name__}.every_n_train_steps"] = checkpoint_cadence(callback)[0]
    misfits = [f"{name}={count}" for name, count in counts.items() if count % size]
    if misfits:
        raise ValueError(
            f"Batches of {size} stacked steps (`steps_per_batch`) advance `global_step` {size} at a time, so step "
            f"counts checked after a batch must be multiples of {size}, but {', '.join(misfits)}: change them or "
            "`steps_per_batch`."
        )


class StackedSteps(Callback):
    """Counts a batch that holds a stack of training steps as its steps in Lightning's count of batches (the
    loggers' x-axis and ``log_every_n_steps``), before any other callback's ``on_train_batch_start``: the GAN puts it
    first. ``steps_in(batch)``: the number of steps in a batch."""

    def __init__(self, module: LightningModule, steps_in: Callable[[Any], int]) -> None:
        self.module, self.steps_in = module, steps_in
        self.checked = 1  # the stack size whose step counts were checked for this fit

    @classmethod
    def attach(cls, trainer: Trainer, module: LightningModule, steps_in: Callable[[Any], int]) -> None:
        """Put one for ``module`` first in ``trainer``'s callbacks (callbacks that log as a batch starts see its
        count), or point the one already there at ``module``."""
        attached = next((callback for callback in trainer.callbacks if isinstance(callback, cls)), None)
        if attached is None:
            trainer.callbacks.insert(0, cls(module, steps_in))
        else:
            attached.module, attached.steps_in = module, steps_in

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.checked = 1

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if pl_module is not self.module:  # the trainer may fit another module next
            return
        size = self.steps_in(batch)
        if size == 1:
            return
        if size != self.checked:
            check_step_counts(trainer, size)
            self.checked = size
        if trainer.global_step % size:
            raise ValueError(
                f"A stack of {size} steps starts at global step {trainer.global_step}, which is no multiple of {size}: "
                "every stack must hold the same number of steps (`steps_per_batch`), and a run must resume with "
                "the number it was saved with."
            )
        set_logged_steps(
            trainer, trainer.global_step + size - 1
        )  # the batch's steps but its last, which Lightning adds
