"""Safe checkpoints: atomic files and a checkpoint when a run is stopped.

* Atomic files: Lightning writes through ``fsspec``, whose temporary file lives in the system's temp folder, so on
  another file system the final "move" is a copy that can be cut half-way. :class:`AtomicCheckpointIO` writes to a
  temporary file in the checkpoint's own folder, ``fsync`` s it and renames it over the target (``os.replace``).
* A checkpoint when a run is stopped: :class:`InterruptCheckpoint` saves one on SIGTERM or a first Ctrl-C, at a step
  boundary, and checks before training that the checkpoint folder can be written.
* One run per folder: :class:`RunLock`, a lock file that the ``lightning-gan`` command holds in the run folder while
  a ``fit`` runs.

The ``lightning-gan`` command adds both by default (:func:`with_safe_checkpointing`); with the Python API, pass them
to the ``Trainer``. Exact resume (random state, position in the epoch) is in :mod:`lightning_gan.resume`.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from lightning_gan._lightning import set_sigterm_flag, sigterm_flag, sigterm_handler_before_lightning
from lightning_gan.checks import check_positive_int
from lightning_gan.errors import CTRL_C, SIGTERM, LightningGANError
from lightning_gan.figures import run_dir
from lightning_gan.files import atomic_write, dead_process_of_this_host, host_name, remove_orphaned_temporaries
from lightning_gan.slurm import REQUEUE_SIGNAL, with_slurm_environment

__all__ = [
    "LOCK_FILE",
    "AtomicCheckpointIO",
    "InterruptCheckpoint",
    "RunFolderLockedError",
    "RunLock",
    "check_writable",
    "with_safe_checkpointing",
]
LOCK_FILE = ".lightning-gan.lock"


# ---------------------------------------------------------------------------------------------------- atomic files
class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local files appear whole or not at all.

    The checkpoint is written to a hidden temporary file in the target's folder, flushed to disk (``fsync``) and
    renamed over the target with ``os.replace`` (atomic on POSIX and Windows within one file system); the folder is
    then synced too. A crash or a kill at any moment leaves either the previous file or the new one, never a
    truncated one, and no temporary file survives an exception. Remote paths (``s3://`` ...) go through Lightning's
    own writer.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        atomic_write(path, lambda file: torch.save(checkpoint, file))


# ---------------------------------------------------------------------------------------------------- interruption
class InterruptCheckpoint(Callback):
    """Stop cleanly on SIGTERM or Ctrl-C and save a checkpoint that resumes exactly; check the folder beforehand.

    * Before training (``setup``), the checkpoint folder must be writable: otherwise a clear error, before any step
      and before anything is written (rather than a crash at the end of the first epoch).
    * SIGTERM (cluster pre-emption, ``kill``): Lightning finishes the current step and stops; this callback then
      saves ``<dirpath>/<filename>.ckpt``. The same for SIGUSR1 (SLURM's ``--signal``), unless a handler (Lightning's
      auto-requeue) has it. The same for a first Ctrl-C (SIGINT), which this callback turns into the
      same clean stop; a second Ctrl-C stops at once, without a checkpoint (its state could be half-way through a
      step). Under DDP, a signal on any rank, wherever it arrives, stops every rank at the same training step: the
      ranks agree on it every ``sync_every_n_steps`` steps (one tiny all-reduce then), so they save one consistent
      checkpoint together (there this callback handles SIGTERM in place of Lightning, see :meth:`_on_sigterm`).
    * The stopped run raises Lightning's ``SIGTERMException`` (a ``SystemExit``) with the exit code 143 after SIGTERM,
      130 after Ctrl-C (a finished run exits with 0).
    * Nothing is saved for other exceptions (e.g. :class:`~lightning_gan.guards.NonFiniteError`), nor when
      ``validate`` or ``test`` is stopped: the checkpoints already written are kept as they are.

    Resume with ``lightning-gan fit ... --ckpt_path <dirpath>/<filename>.ckpt`` or ``trainer.fit(..., ckpt_path=...)``.

    Args:
        dirpath: folder of the checkpoint; ``None``: the folder of the trainer's ``ModelCheckpoint`` (nothing is
            saved without one, i.e. with ``enable_checkpointing=False``).
        filename: file name without the ``.ckpt`` extension.
        sync_every_n_steps: under DDP, how often the ranks agree on whether to stop (each time a host sync on GPUs).
    """

    def __init__(
        self, dirpath: str | Path | None = None, filename: str = "interrupted", sync_every_n_steps: int = 10
    ) -> None:
        super().__init__()
        if not filename:
            raise ValueError("Expected a non-empty `filename` for the interruption checkpoint.")
        check_positive_int("sync_every_n_steps", sync_every_n_steps)
        self.sync_every_n_steps = sync_every_n_steps
        self._stop_requested = False
        self._synced_interval = 0  # global_step // sync_every_n_steps when the ranks last agreed (or training began)
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.filename = filename
        self._trainer: Trainer | None = None
        self._previous_handler: Any = None
        self._previous_sigterm_handler: Any = None
        self._previous_requeue_handler: Any = None
        self._ctrl_c_seen = False

    def _folder(self, trainer: Trainer) -> Path | None:
        if self.dirpath is not None:
            return self.dirpath
        checkpoint = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
        if checkpoint is None:
            return None
        if checkpoint.dirpath is not None:
            return Path(checkpoint.dirpath)
        # ModelCheckpoint resolves its folder in its own `setup`, which runs after this one: the same rule
        return run_dir(trainer) / "checkpoints"

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        folder = self._folder(trainer) or Path(trainer.default_root_dir)
        if isinstance(get_filesystem(str(folder)), LocalFileSystem):  # remote folders are the storage's business
            check_writable(folder, "checkpoints")
            remove_orphaned_temporaries(folder)  # what writers killed mid-checkpoint left (about a checkpoint each)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._trainer, self._ctrl_c_seen = trainer, False
        self._synced_interval = trainer.global_step // self.sync_every_n_steps
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._on_ctrl_c)
            if trainer.world_size > 1:
                self._previous_sigterm_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
            if REQUEUE_SIGNAL is not None and signal.getsignal(REQUEUE_SIGNAL) in (signal.SIG_DFL, None):
                # SLURM's warning before the time limit (where Lightning's auto-requeue has not taken it)
                self._previous_requeue_handler = signal.signal(REQUEUE_SIGNAL, self._on_requeue_signal)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        """Under DDP, in place of Lightning's handler: note the request, for the ranks to agree on at a sync step.

        Lightning's handler sets a flag that stops this rank alone wherever the loop checks it, and broadcasts from
        inside the signal handler, a collective that deadlocks when another rank waits in one of training's. Like
        it, pass the signal on to the processes this one launched and call a handler installed before Lightning's.
        """
        trainer = self._trainer
        if trainer is None:
            return
        if not self._stop_requested:
            launcher = trainer.strategy.launcher
            if launcher is not None:
                launcher.kill(signum)
        self._stop_requested = True
        original = sigterm_handler_before_lightning(trainer)
        if original is not None:
            original(signum, frame)

    def _on_requeue_signal(self, signum: int, frame: FrameType | None) -> None:
        """SIGUSR1 (``sbatch --signal=SIGUSR1@90``): the same clean stop as SIGTERM (see :mod:`lightning_gan.slurm`)."""
        if self._trainer is not None:
            self._request_stop()

    def _on_ctrl_c(self, signum: int, frame: FrameType | None) -> None:
        if self._ctrl_c_seen or self._trainer is None:
            raise KeyboardInterrupt
        self._ctrl_c_seen = True
        rank_zero_info(
            "\nCtrl-C: stopping after the current step and saving a checkpoint to resume from. "
            "Press Ctrl-C again to stop at once, without a checkpoint."
        )
        self._request_stop()

    def _request_stop(self) -> None:
        """Stop after the current step: under DDP once the ranks agree on it (see ``on_train_batch_end``), else
        through Lightning's own SIGTERM flag, checked after every step."""
        if self._trainer.world_size > 1:
            self._stop_requested = True
        else:
            set_sigterm_flag(self._trainer, True)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.world_size == 1:
            return
        self._hold_back_signal(trainer)
        # when a multiple of the interval was reached or passed (a batch may hold several steps): alike on all ranks
        interval = trainer.global_step // self.sync_every_n_steps
        if interval != self._synced_interval:
            self._synced_interval = interval
            if trainer.strategy.reduce_boolean_decision(self._stop_requested, all=False):
                set_sigterm_flag(trainer, True)

    @override
    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, *args: Any
    ) -> None:
        # Lightning also stops a validation loop between batches, and checks again after it; the ranks then agree at
        # the next training step
        if trainer.world_size > 1 and trainer.state.fn == TrainerFn.FITTING:
            self._hold_back_signal(trainer)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.world_size > 1 and trainer.state.fn == TrainerFn.FITTING:
            self._hold_back_signal(trainer)

    def _hold_back_signal(self, trainer: Trainer) -> None:
        """Lightning stops a rank as soon as *its* flag is set, at the end of this batch: a rank stopping alone would
        then wait forever in the checkpoint's collectives. Hold the flag back until all ranks agree."""
        if sigterm_flag(trainer):
            self._stop_requested = True
            set_sigterm_flag(trainer, False)

    def _restore_handler(self) -> None:
        if threading.current_thread() is threading.main_thread():
            if self._previous_handler is not None:
                signal.signal(signal.SIGINT, self._previous_handler)
            if self._previous_sigterm_handler is not None:
                signal.signal(signal.SIGTERM, self._previous_sigterm_handler)
            if self._previous_requeue_handler is not None:
                signal.signal(REQUEUE_SIGNAL, self._previous_requeue_handler)
        self._previous_handler = self._previous_sigterm_handler = self._previous_requeue_handler = None
        self._trainer = None

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_handler()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore_handler()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_handler()
        if not isinstance(exception, SIGTERMException):
            return
        # the process then exits as a shell reports a process killed by the signal, not with 0 (a finished run)
        exception.code = CTRL_C if self._ctrl_c_seen else SIGTERM
        if trainer.sanity_checking:
            return
        if trainer.state.fn != TrainerFn.FITTING:  # `validate`/`test` have nothing to resume: keep the folder as is
            return
        folder = self._folder(trainer)
        if folder is None:
            rank_zero_warn(
                "Training was stopped by a signal, but no checkpoint was saved: checkpointing is off "
                "(enable_checkpointing=False) and InterruptCheckpoint has no `dirpath`."
            )
            return
        path = folder / f"{self.filename}.ckpt"
        trainer.save_checkpoint(path, weights_only=False)  # a full checkpoint (and no "not set" notice)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.experiment.mark_preempting()  # W&B shows the run as preempted (to resume), not finished
        rank_zero_info(
            f"Training stopped at epoch {trainer.current_epoch}, global step {trainer.global_step}; saved {path}. "
            f"Resume with `--ckpt_path {shlex.quote(str(path))}` (lightning-gan fit) or "
            "`trainer.fit(..., ckpt_path=...)`."
        )


def check_writable(folder: str | Path, what: str = "files") -> None:
    """Raise a clear ``OSError`` unless ``folder`` (or, if it does not exist yet, its nearest existing parent) is a
    folder where files can be created. Creates nothing that stays: a probe file is deleted at once.

    Raises:
        OSError: (the original subclass, e.g. ``PermissionError``, ``NotADirectoryError``) naming the folder and the
            fix.
    """
    folder = Path(folder).expanduser().absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is a file, not a folder")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise type(error)(
            f"Cannot write {what} to {folder}: {error}. Choose a writable output folder, e.g. "
            "--trainer.default_root_dir=DIR (or the logger's save_dir, or ModelCheckpoint's dirpath)."
        ) from error


# ---------------------------------------------------------------------------------------------------- run lock
class RunFolderLockedError(LightningGANError, RuntimeError):
    """Another run holds the run folder's lock."""


class RunLock:
    """An exclusive lock on a run folder: the file ``<folder>/.lightning-gan.lock``, created with ``O_CREAT|O_EXCL``
    (so of two runs started together one gets it), holding the owner's host and process id, and removed by
    :meth:`release`. A lock whose process has died on this host is taken over; folders created for the lock are
    removed again with it when they are empty."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._created: list[Path] = []  # folders made for the lock, deepest first

    def acquire(self) -> None:
        """Take the lock.

        Raises:
            RunFolderLockedError: when another live run holds it, naming that run and the fix.
        """
        missing = [folder for folder in (self.folder, *self.folder.parents) if not folder.exists()]
        self.folder.mkdir(parents=True, exist_ok=True)
        self._created = missing
        for _ in range(2):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._owner_is_dead():
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
                    continue
                owner = self._owner()
                owner = f"{owner[1]} on {owner[0]}" if owner else "unknown"
                self._remove_created()
                raise RunFolderLockedError(
                    f"{self.folder} is in use by another run (process {owner}, lock file {self.path}): wait for it to "
                    "finish or give this run a folder of its own (--trainer.default_root_dir=DIR); if no run uses it, "
                    f"delete {self.path}."
                ) from None
            with os.fdopen(descriptor, "w") as file:
                file.write(f"{host_name()} {os.getpid()}\n")
            return
        raise RunFolderLockedError(f"Could not lock {self.folder}: {self.path} keeps reappearing; delete it.")

    def release(self) -> None:
        """Remove the lock file (and the folders created for it, when empty)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in self._created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        self._created = []

    def _owner(self) -> tuple[str, int] | None:
        """The lock's ``(host, pid)``; ``None`` while it is being written, or when it is not the package's."""
        try:
            host, pid = self.path.read_text().split()
            return host, int(pid)
        except (OSError, ValueError):
            return None

    def _owner_is_dead(self) -> bool:
        if not self.path.exists():
            return True  # released meanwhile
        owner = self._owner()
        return owner is not None and dead_process_of_this_host(*owner)

    @classmethod
    def acquire_for(cls, trainer: Trainer, folder: str | Path) -> RunLock | None:
        """Rank zero takes the lock on ``folder`` (a local one; ``None`` for remote folders and the other ranks);
        every rank raises :class:`RunFolderLockedError` when it is held."""
        lock, refusal = None, None
        if trainer.is_global_zero and isinstance(get_filesystem(str(folder)), LocalFileSystem):
            lock = cls(folder)
            try:
                lock.acquire()
            except RunFolderLockedError as error:
                lock, refusal = None, str(error)
        refusal = trainer.strategy.broadcast(refusal)
        if refusal is not None:
            raise RunFolderLockedError(refusal)
        return lock


# ---------------------------------------------------------------------------------------------------- CLI defaults
def with_safe_checkpointing(trainer_config: Mapping[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Trainer keyword arguments with :class:`AtomicCheckpointIO` (unless the config has a ``CheckpointIO`` plugin)
    and :class:`InterruptCheckpoint` (unless it has one, or turns checkpointing off) added; used by the CLI.

    Args:
        trainer_config: the instantiated ``trainer`` section of the config.
        kwargs: the extra keyword arguments for the ``Trainer`` so far (``callbacks`` there replace the config's).
    """
    kwargs = dict(kwargs)
    plugins = trainer_config.get("plugins") or []
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
        kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
    if SLURMEnvironment.detect():  # Lightning's auto-requeue off (see lightning_gan.slurm)
        kwargs["plugins"] = with_slurm_environment(kwargs.get("plugins", plugins))
    if trainer_config.get("enable_checkpointing") is not False:
        callbacks = kwargs["callbacks"] if "callbacks" in kwargs else trainer_config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        if not any(isinstance(callback, InterruptCheckpoint) for callback in callbacks):
            kwargs["callbacks"] = [*callbacks, InterruptCheckpoint()]
    return kwargs
