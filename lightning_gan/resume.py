"""Exact resume and safe interruption: what Lightning's own checkpoints leave out, added for lightning-gan.

Lightning (2.6) checkpoints the weights, optimizer and scheduler states and the loops' progress, but not

* the random number generators: :func:`rng_state` / :func:`set_rng_state` capture torch's (CPU, and the CUDA device
  in use), Python's and NumPy's; :class:`~lightning_gan.GAN` saves every rank's in each checkpoint and restores its
  own on resume;
* the position inside an epoch: a plain ``DataLoader`` restarts with a new order when a run resumes mid-epoch.
  :class:`ResumableDataLoader` (what :class:`~lightning_gan.GANDataModule` returns) shuffles with
  :class:`EpochRandomSampler`, one reproducible permutation per epoch, and implements ``state_dict`` /
  ``load_state_dict``, which Lightning saves and restores, to skip the batches already consumed;
* atomic files: Lightning writes through ``fsspec``, whose temporary file lives in the system's temp folder, so on
  another file system the final "move" is a copy that can be cut half-way. :class:`AtomicCheckpointIO` writes to a
  temporary file in the checkpoint's own folder, ``fsync`` s it and renames it over the target (``os.replace``);
* a checkpoint when a run is stopped: :class:`InterruptCheckpoint` saves one on SIGTERM or a first Ctrl-C, at a step
  boundary, and checks before training that the checkpoint folder can be written.

The ``lightning-gan`` command adds :class:`AtomicCheckpointIO` and :class:`InterruptCheckpoint` by default
(:func:`with_safe_checkpointing`); with the Python API, pass them to the ``Trainer``.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import tempfile
import threading
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, RandomSampler
from typing_extensions import override

from lightning_gan.figures import run_dir

__all__ = [
    "AtomicCheckpointIO",
    "EpochRandomSampler",
    "InterruptCheckpoint",
    "ResumableDataLoader",
    "rng_state",
    "set_rng_state",
    "with_safe_checkpointing",
]


# ---------------------------------------------------------------------------------------------------- random state
def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """This process's random state: torch CPU, torch CUDA (for ``device``, when it is a CUDA device), Python, NumPy.

    Only tensors and plain Python values, so that ``torch.load(..., weights_only=True)`` can read it back.
    """
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Mapping[str, Any], device: torch.device | None = None) -> None:
    """Restore a state from :func:`rng_state` (the CUDA part only when ``device`` is a CUDA device)."""
    torch.set_rng_state(state["torch"].cpu())
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state(
        ("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"])
    )
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


# ---------------------------------------------------------------------------------------------------- data order
class EpochRandomSampler(RandomSampler):
    """A random permutation per epoch, drawn from ``seed + epoch`` (as ``DistributedSampler`` does), so that the order
    of any epoch can be drawn again, e.g. by a run resumed in the middle of it.

    Lightning calls :meth:`set_epoch` before every epoch; :class:`ResumableDataLoader` advances the epoch by itself
    after a complete pass where nobody did.

    Args:
        data_source: the dataset (sized).
        seed: base seed; ``None`` takes ``torch.initial_seed()`` at the first iteration: the seed given to
            ``seed_everything`` (or torch's fixed default), which a resumed GAN run also restores with the random
            state. Nothing is drawn from the global generator, so the order never shifts the training noise.
    """

    def __init__(self, data_source: Any, seed: int | None = None) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the permutation of ``epoch`` from the next iteration on."""
        self.epoch = epoch

    @override
    def __iter__(self) -> Iterator[int]:
        if self.seed is None:
            self.seed = torch.initial_seed()
        generator = torch.Generator().manual_seed((self.seed + self.epoch) % 2**64)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


class _ResumedBatches:
    """A loader's batch sampler (or sampler) that first drops the batches a resumed epoch had already consumed: only
    indices are dropped, no data is loaded for them."""

    def __init__(self, loader: ResumableDataLoader, sampler: Any) -> None:
        self.loader, self.sampler = loader, sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.sampler)
        for _ in range(self.loader._skip):
            next(iterator, None)
        return iterator


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose place in the epoch survives a checkpoint: Lightning saves :meth:`state_dict` (epoch,
    batches consumed, shuffling seed) with the loop state and calls :meth:`load_state_dict` on resume, so that a run
    resumed mid-epoch sees exactly the batches the uninterrupted run would have seen.

    ``shuffle=True`` shuffles with :class:`EpochRandomSampler`. Under DDP, Lightning swaps the sampler for a
    ``DistributedSampler`` (seeded, ``set_epoch``), and the skipping works the same. The loader draws nothing from
    the global random generators (it owns the ``generator`` used for worker seeds, seeded per epoch), so iterating
    it leaves the training noise stream untouched. Iteration starts lazily, at the first batch, after Lightning's
    ``set_epoch``.

    Args:
        dataset, batch_size, sampler, generator, **kwargs: as for ``DataLoader``.
        shuffle: shuffle each epoch with :class:`EpochRandomSampler`.
        seed: that sampler's base seed (``None``: ``torch.initial_seed()`` at the first batch, see there).
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int | None = 1,
        shuffle: bool | None = None,
        sampler: Any = None,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> None:
        if shuffle and sampler is not None:
            raise ValueError("ResumableDataLoader: `sampler` and `shuffle=True` exclude each other; pass one of them.")
        if shuffle:
            sampler = EpochRandomSampler(dataset, seed)
        self._owns_generator = generator is None
        super().__init__(
            dataset, batch_size=batch_size, sampler=sampler, generator=generator or torch.Generator(), **kwargs
        )
        self._epoch: int | None = None  # epoch of the pass in progress (None: no pass yet)
        self._consumed = 0  # batches handed out in that pass (Lightning does not prefetch sized loaders)
        self._skip = 0  # batches the pass in progress started by dropping
        self._pending: tuple[int | None, int] | None = None  # (epoch, batches) from load_state_dict

    @property
    def _index_sampler(self) -> Any:  # type: ignore[override]
        return _ResumedBatches(self, super()._index_sampler)

    def _sampler_epoch(self) -> int | None:
        epoch = getattr(self.sampler, "epoch", None)
        return epoch if isinstance(epoch, int) else None

    def _set_sampler_epoch(self, epoch: int) -> None:
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        epoch = self._sampler_epoch()
        if self._pending is None and epoch is not None and epoch == self._epoch and self._consumed >= len(self):
            # a complete pass, and nobody called set_epoch since: a new epoch (Lightning always calls it)
            epoch += 1
            self._set_sampler_epoch(epoch)
        self._skip = 0
        if self._pending is not None:
            pending_epoch, batches = self._pending
            self._pending = None
            if epoch is None or pending_epoch == epoch:  # else Lightning has moved on to the next epoch
                self._skip = batches
        self._epoch, self._consumed = epoch, self._skip
        if self._owns_generator:
            self.generator.manual_seed((int(getattr(self.sampler, "seed", None) or 0) + (epoch or 0)) % 2**64)
        for batch in super().__iter__():
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The place in the epoch: ``epoch``, ``batches`` consumed in it, and the shuffling ``seed``."""
        if self._pending is not None:
            epoch, batches = self._pending
        else:
            epoch = self._epoch if self._epoch is not None else self._sampler_epoch()
            batches = self._consumed
        return {"epoch": epoch, "batches": batches, "seed": getattr(self.sampler, "seed", None)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`: the next pass skips the batches that epoch had consumed."""
        epoch, batches = state_dict.get("epoch"), int(state_dict.get("batches", 0))
        if state_dict.get("seed") is not None and hasattr(self.sampler, "seed"):
            self.sampler.seed = state_dict["seed"]
        if epoch is not None and batches >= len(self):  # that epoch was finished
            epoch, batches = epoch + 1, 0
        if epoch is not None:
            self._set_sampler_epoch(epoch)
        self._pending = (epoch, batches)
        self._epoch, self._consumed = None, 0


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
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(temporary, "xb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
        _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    if os.name != "posix":  # Windows cannot open a folder; its rename is durable enough
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# ---------------------------------------------------------------------------------------------------- interruption
class InterruptCheckpoint(Callback):
    """Stop cleanly on SIGTERM or Ctrl-C and save a checkpoint that resumes exactly; check the folder beforehand.

    * Before training (``setup``), the checkpoint folder must be writable: otherwise a clear error, before any step
      and before anything is written (rather than a crash at the end of the first epoch).
    * SIGTERM (cluster pre-emption, ``kill``): Lightning finishes the current step and stops; this callback then
      saves ``<dirpath>/<filename>.ckpt``. The same for a first Ctrl-C (SIGINT), which this callback turns into the
      same clean stop; a second Ctrl-C stops at once, without a checkpoint (its state could be half-way through a
      step). Under DDP, a signal on any rank stops every rank at the same step: the ranks agree on it every
      ``sync_every_n_steps`` steps (one tiny all-reduce then), so they save one consistent checkpoint together.
    * Nothing is saved for other exceptions (e.g. :class:`~lightning_gan.module.NonFiniteError`): the checkpoints
      already written are kept as they are.

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
        if sync_every_n_steps < 1:
            raise ValueError(f"Expected `sync_every_n_steps` >= 1, but got {sync_every_n_steps}.")
        self.sync_every_n_steps = sync_every_n_steps
        self._stop_requested = False
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.filename = filename
        self._trainer: Trainer | None = None
        self._previous_handler: Any = None
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

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._trainer, self._ctrl_c_seen = trainer, False
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._on_ctrl_c)

    def _on_ctrl_c(self, signum: int, frame: FrameType | None) -> None:
        if self._ctrl_c_seen or self._trainer is None:
            raise KeyboardInterrupt
        self._ctrl_c_seen = True
        rank_zero_info(
            "\nCtrl-C: stopping after the current step and saving a checkpoint to resume from. "
            "Press Ctrl-C again to stop at once, without a checkpoint."
        )
        # Lightning's own SIGTERM flag: checked (and, under DDP, broadcast from rank 0) after every step
        connector = getattr(self._trainer, "_signal_connector", None)
        if connector is not None and hasattr(connector, "received_sigterm"):
            connector.received_sigterm = True
        else:  # a Lightning without that flag: let its SIGTERM handler do the same
            os.kill(os.getpid(), signal.SIGTERM)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.world_size == 1:
            return
        # Lightning stops a rank as soon as *its* flag is set, at the end of this batch: a rank stopping alone would
        # then wait forever in the checkpoint's collectives. Hold the flag back until all ranks agree.
        connector = trainer._signal_connector
        if connector.received_sigterm:
            self._stop_requested, connector.received_sigterm = True, False
        if trainer.global_step % self.sync_every_n_steps == 0:
            flag = torch.tensor(float(self._stop_requested), device=pl_module.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if flag.item() > 0:
                connector.received_sigterm = True

    def _restore_handler(self) -> None:
        if self._previous_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_handler)
        self._previous_handler, self._trainer = None, None

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_handler()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore_handler()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_handler()
        if not isinstance(exception, SIGTERMException) or trainer.sanity_checking:
            return
        folder = self._folder(trainer)
        if folder is None:
            rank_zero_warn(
                "Training was stopped by a signal, but no checkpoint was saved: checkpointing is off "
                "(enable_checkpointing=False) and InterruptCheckpoint has no `dirpath`."
            )
            return
        path = folder / f"{self.filename}.ckpt"
        trainer.save_checkpoint(path)
        rank_zero_info(
            f"Training stopped at epoch {trainer.current_epoch}, global step {trainer.global_step}; saved {path}. "
            f"Resume with `--ckpt_path {path}` (lightning-gan fit) or `trainer.fit(..., ckpt_path=...)`."
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
    if trainer_config.get("enable_checkpointing") is not False:
        callbacks = kwargs["callbacks"] if "callbacks" in kwargs else trainer_config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        if not any(isinstance(callback, InterruptCheckpoint) for callback in callbacks):
            kwargs["callbacks"] = [*callbacks, InterruptCheckpoint()]
    return kwargs
