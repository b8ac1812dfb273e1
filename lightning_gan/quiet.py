"""Known start-up noise of a ``lightning-gan`` run, removed where it is caused or, when it comes from a dependency
and says nothing about this run, filtered with the reason beside each filter."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger

from lightning_gan._lightning import drop_unset_wandb_anonymous


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


# An advertisement, printed by Lightning 2.6 on every run without its own LitLogger: nothing to act on.
_TIPS = _DropMessages("try installing [litlogger]")


def quiet_known_warnings(resuming: bool) -> None:
    """Filter the dependency warnings that every run would print; with ``resuming``, also the checkpoint folder's."""
    # Lightning 2.6's own pytree helper uses torch's deprecated `LeafSpec` check: a note for Lightning, not for users.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    if resuming:  # a resume writes into the folder of the run it resumes, which holds that run's checkpoints
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _TIPS not in rank_zero.filters:
        rank_zero.addFilter(_TIPS)


def quiet_wandb_loggers(loggers: list[Any]) -> None:
    """Before a W&B run starts: create its ``save_dir`` (W&B warns "git root ... does not exist" while it looks for a
    git repository there) and leave out the ``anonymous`` argument it was not given."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            if logger.save_dir:
                Path(logger.save_dir).mkdir(parents=True, exist_ok=True)
            drop_unset_wandb_anonymous(logger)
