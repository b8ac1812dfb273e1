"""Every use of Lightning (and torch) internals that has no public equivalent, in one place.

Written against Lightning 2.6 and torch 2.14. Each function names what it reads or writes; a test checks that each
still works, and fails naming the function to update when a release changes it.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torch import Tensor


def instantiated_by_cli() -> bool:
    """Whether the module being built is instantiated by LightningCLI, which then hands it the parsed config as its
    hyperparameters (Lightning 2.6: ``hparams_mixin._given_hyperparameters``, set by the CLI's instantiator)."""
    return _given_hyperparameters.get() is not None


# The key under which Lightning 2.6 saves the CLI's instantiator in a module's hyperparameters (``hparams_mixin``);
# Lightning checks its value against an allowlist of its own when it loads a checkpoint (``core.saving``).
HPARAMS_INSTANTIATOR_KEY = "_instantiator"


def load_from_checkpoint_as(cls: type[LightningModule], checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
    """``LightningModule.load_from_checkpoint`` for the class ``cls``, called from a function that replaces it
    (Lightning 2.6: the method is a ``_restricted_classmethod`` descriptor, whose ``__get__`` binds it to ``cls``)."""
    return vars(LightningModule)["load_from_checkpoint"].__get__(None, cls)(checkpoint_path, *args, **kwargs)


def count_optimizer_step(trainer: Trainer) -> None:
    """Advance ``trainer.global_step`` by one under manual optimization without stepping an optimizer, as a
    ``LightningOptimizer.step()`` does (Lightning 2.6: the manual loop's ``optim_step_progress``, which
    ``global_step`` reads)."""
    progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
    progress.increment_ready()
    progress.increment_completed()


def should_update_logs(trainer: Trainer) -> bool:
    """Whether this training step's logged values reach the loggers (Lightning 2.6:
    ``trainer._logger_connector.should_update_logs``)."""
    return trainer._logger_connector.should_update_logs


def logged_steps(trainer: Trainer) -> int:
    """Lightning's count of batches that stepped: the loggers' x-axis and what ``log_every_n_steps`` counts
    (Lightning 2.6: ``fit_loop.epoch_loop._batches_that_stepped``)."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def set_logged_steps(trainer: Trainer, count: int) -> None:
    """Set the count of :func:`logged_steps`, which Lightning restores from a checkpoint only when fitting
    (Lightning 2.6: ``fit_loop.epoch_loop._batches_that_stepped``)."""
    trainer.fit_loop.epoch_loop._batches_that_stepped = count


def checkpoint_cadence(callback: ModelCheckpoint) -> tuple[int, int, Any]:
    """A ``ModelCheckpoint``'s ``(every_n_train_steps, every_n_epochs, train_time_interval)`` as it resolved them
    (Lightning 2.6: its ``_every_n_train_steps``, ``_every_n_epochs``, ``_train_time_interval``)."""
    return callback._every_n_train_steps, callback._every_n_epochs, callback._train_time_interval


def callback_state_key(callback: Callback, **key: Any) -> str:
    """A ``state_key`` for ``callback`` that tells apart instances by ``key``, as Lightning's documentation of
    ``Callback.state_key`` recommends (Lightning 2.6: ``Callback._generate_state_key``: the class name and ``key``)."""
    return callback._generate_state_key(**key)


def sigterm_flag(trainer: Trainer) -> bool:
    """Lightning's SIGTERM flag, which stops the fit loop after the current batch with a ``SIGTERMException``
    (public: ``trainer.received_sigterm``; here beside its setter, which is not)."""
    return trainer.received_sigterm


def set_sigterm_flag(trainer: Trainer, value: bool) -> None:
    """Set the flag of :func:`sigterm_flag` (Lightning 2.6: ``trainer._signal_connector.received_sigterm``)."""
    trainer._signal_connector.received_sigterm = value


def sigterm_handler_before_lightning(trainer: Trainer) -> Callable[..., Any] | None:
    """The SIGTERM handler installed before Lightning's own, if it is callable (Lightning 2.6:
    ``trainer._signal_connector._original_handlers``)."""
    handler = trainer._signal_connector._original_handlers.get(signal.SIGTERM)
    return handler if callable(handler) else None


# ---------------------------------------------------------------------------------------------- torch internals
def float_last_lrs(scheduler_state: Mapping[str, Any]) -> None:
    """Make the learning rates a scheduler's state dict last returned into floats, as an eager run saves them
    (torch 2.14: an ``LRScheduler.state_dict()`` holds them under ``"_last_lr"``); a no-op where it has none."""
    if "_last_lr" in scheduler_state:
        scheduler_state["_last_lr"] = [float(lr) for lr in scheduler_state["_last_lr"]]


def foreach_move_towards(tensors: list[Tensor], targets: list[Tensor], weight: Tensor) -> None:
    """``tensor += weight * (target - tensor)`` for each pair, in three multi-tensor kernels (one per element-wise
    operation, so each rounds as the per-tensor operations do); ``weight``: a 0-d tensor on their device. torch has
    no public multi-tensor API; written against torch 2.14's ``torch._foreach_sub``, ``_foreach_mul_`` and
    ``_foreach_add_``."""
    difference = torch._foreach_sub(targets, tensors)
    torch._foreach_mul_(difference, weight)
    torch._foreach_add_(tensors, difference)


def drop_unset_wandb_anonymous(logger: Any) -> None:
    """Leave ``anonymous`` out of the ``wandb.init`` arguments of a ``WandbLogger`` that did not set it: Lightning
    passes ``anonymous=None``, which wandb >= 0.19 answers with "The anonymous setting has no effect" on every run
    (Lightning 2.6.6: ``WandbLogger._wandb_init``)."""
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and init.get("anonymous") is None:
        init.pop("anonymous", None)


def set_subcommand_help(parser: Any, helps: Mapping[str, str]) -> None:
    """Set the one-line descriptions that a LightningCLI parser's top-level help shows for its subcommands, which
    Lightning takes from the first docstring line of each Trainer method (Lightning 2.6.6 with jsonargparse 4: the
    parser's ``_subcommands_action``, argparse's ``_choices_actions``)."""
    action = parser._subcommands_action  # None when the CLI was built with `run=False`: no subcommands
    for choice in action._choices_actions if action is not None else ():
        if choice.dest in helps:
            choice.help = helps[choice.dest]
