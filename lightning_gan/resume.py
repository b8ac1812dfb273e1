"""Exact resume: what Lightning's own checkpoints leave out, added for lightning-gan.

Lightning (2.6) checkpoints the weights, optimizer and scheduler states and the loops' progress, but not

* the random number generators: :func:`rng_state` / :func:`set_rng_state` capture torch's (CPU, and the CUDA device
  in use), Python's and NumPy's; :class:`~lightning_gan.GAN` saves every rank's in each checkpoint and restores its
  own on resume;
* the position inside an epoch: a plain ``DataLoader`` restarts with a new order when a run resumes mid-epoch.
  :class:`ResumableDataLoader` (what :class:`~lightning_gan.GANDataModule` returns) shuffles with
  :class:`EpochRandomSampler`, one reproducible permutation per epoch, and implements ``state_dict`` /
  ``load_state_dict``, which Lightning saves and restores, to skip the batches already consumed.

Atomic checkpoint files and a checkpoint when a run is stopped are in :mod:`lightning_gan.checkpointing`.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler, Sampler, SequentialSampler
from typing_extensions import override

from lightning_gan._lightning import logged_steps, set_logged_steps
from lightning_gan.checks import check_positive_int
from lightning_gan.distributed import all_gather_object

__all__ = ["EpochRandomSampler", "ResumableDataLoader", "rng_state", "set_rng_state"]

STATE_KEY = "lightning_gan"  # the checkpoint entry of save_resume_state


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


def save_resume_state(checkpoint: dict[str, Any], device: torch.device, **counts: int) -> None:
    """Add every rank's random state (all ranks take part) and the module's ``counts`` to ``checkpoint``."""
    checkpoint[STATE_KEY] = {"rng_states": all_gather_object(rng_state(device)), **counts}


def resume_state(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """What :func:`save_resume_state` added to ``checkpoint`` (empty for a checkpoint without it)."""
    return checkpoint.get(STATE_KEY) or {}


def restore_resume_state(trainer: Trainer | None, state: Mapping[str, Any], step: int, device: torch.device) -> None:
    """When fitting, restore this rank's random state (exact resume); when evaluating on a trainer that has not
    fitted, put the loggers' x-axis at the checkpoint's global ``step`` (Lightning restores no step outside a fit).
    Without a trainer, nothing."""
    if trainer is None:
        return
    if trainer.state.fn in (TrainerFn.VALIDATING, TrainerFn.TESTING) and not logged_steps(trainer):
        set_logged_steps(trainer, step)
    if trainer.state.fn == TrainerFn.FITTING and "rng_states" in state:
        restore_rng_states(state["rng_states"], trainer.world_size, trainer.global_rank, device)


def restore_rng_states(states: list[Mapping[str, Any]], world_size: int, rank: int, device: torch.device) -> None:
    """Restore rank ``rank``'s state from a checkpoint's ``states`` (one per rank), warning when the checkpoint was
    written by another number of processes."""
    if len(states) != world_size:
        rank_zero_warn(
            f"The checkpoint holds the random state of {len(states)} process(es), this run has "
            f"{world_size}: training continues correctly, but not bitwise as the original run would have."
        )
    if rank < len(states):
        set_rng_state(states[rank], device)


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
        return iter(torch.randperm(len(self.data_source), generator=generator).tolist())


class _ResumableBatchSampler(BatchSampler):
    """The batches of a :class:`ResumableDataLoader`: ``BatchSampler`` batches of ``sampler``, ``stack_batches`` at a
    time as one list of that many batches (the ones left over at the end of a pass dropped), as index tensors on
    ``index_device`` when one is given. A pass starts by dropping the first ``skip`` of them, the ones a resumed epoch
    had already consumed: only indices are dropped, no data is loaded for them.

    Under DDP, Lightning re-creates it from its constructor's arguments with its ``DistributedSampler`` as
    ``sampler`` (as it does for any ``BatchSampler`` subclass built in a ``*_dataloader`` hook).
    """

    def __init__(
        self,
        sampler: Sampler[int] | Iterable[int],
        batch_size: int,
        drop_last: bool,
        stack_batches: int = 1,
        index_device: torch.device | None = None,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.stack_batches, self.index_device = stack_batches, index_device
        self.skip = 0

    def __len__(self) -> int:
        return super().__len__() // self.stack_batches

    def __iter__(self) -> Iterator[Any]:
        batches: Iterator[Any] = super().__iter__()
        if self.stack_batches > 1:
            batches = _stacks(batches, self.stack_batches)
        batches = itertools.islice(batches, self.skip, None)
        if self.index_device is not None:
            return _indices_on(batches, self.index_device, stacked=self.stack_batches > 1)
        return batches


def _stacks(batches: Iterator[list[int]], size: int) -> Iterator[list[list[int]]]:
    """The batches ``size`` at a time, as one list of ``size`` batches; the ones left over at the end are dropped."""
    stack: list[list[int]] = []
    for batch in batches:
        stack.append(batch)
        if len(stack) == size:
            yield stack
            stack = []


def _indices_on(batches: Iterable[Any], device: torch.device, stacked: bool) -> Iterator[Tensor]:
    """Batches (or stacks of batches) of indices as tensors on ``device``, the whole pass copied there at once: one
    copy per epoch instead of one per batch, which on a GPU would also wait for the queued work to finish."""
    batches = list(batches)
    if not batches:
        return
    rows = [row for stack in batches for row in stack] if stacked else batches
    flat = torch.tensor([i for row in rows for i in row], dtype=torch.long).to(device)
    shapes = [(len(stack), len(stack[0])) for stack in batches] if stacked else [(len(b),) for b in batches]
    for indices, shape in zip(flat.split([math.prod(shape) for shape in shapes]), shapes, strict=True):
        yield indices.view(shape)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose place in the epoch survives a checkpoint: Lightning saves :meth:`state_dict` (epoch,
    batches consumed, shuffling seed) with the loop state and calls :meth:`load_state_dict` on resume, so that a run
    resumed mid-epoch sees exactly the batches the uninterrupted run would have seen.

    ``shuffle=True`` shuffles with :class:`EpochRandomSampler`. Under DDP, Lightning swaps the sampler for a
    ``DistributedSampler`` (seeded, ``set_epoch``), and the skipping works the same. The loader draws nothing from
    the global random generators (it owns the ``generator`` used for worker seeds, seeded per epoch), so iterating
    it leaves the training noise stream untouched. Iteration starts lazily, at the first batch, after Lightning's
    ``set_epoch``.

    The batches come from a batch sampler of the loader's own; ``sampler``, ``batch_size`` and ``drop_last`` read as
    for a ``DataLoader`` built from them.

    Args:
        dataset, batch_size, sampler, generator, drop_last, **kwargs: as for ``DataLoader`` (a map-style dataset,
            and batches: ``batch_size`` is not ``None``).
        shuffle: shuffle each epoch with :class:`EpochRandomSampler`.
        batch_sampler: a ``BatchSampler``, whose sampler, batch size and ``drop_last`` are taken (how Lightning
            re-creates the loader with its ``DistributedSampler``); exclusive with those three and ``shuffle``.
        seed: that sampler's base seed (``None``: ``torch.initial_seed()`` at the first batch, see there).
        stack_batches: hand out this many batches at a time: the dataset's ``__getitems__`` receives their indices
            as a list of ``stack_batches`` lists (as :class:`~lightning_gan.data.InMemoryTensors` stacks them); the
            batches left over at the end of a pass are dropped. Needs ``batch_size`` and ``drop_last=True``.
        index_device: hand the dataset its batches' indices as ``int64`` tensors on this device (``(B,)``, or
            ``(stack_batches, B)``), each pass's copied there at once: for data kept on that device.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int | None = 1,
        shuffle: bool | None = None,
        sampler: Any = None,
        batch_sampler: Any = None,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        stack_batches: int = 1,
        index_device: torch.device | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(dataset, IterableDataset):
            raise TypeError("ResumableDataLoader needs a map-style dataset (with `__getitem__` and `__len__`).")
        if batch_size is None and batch_sampler is None:
            raise ValueError("ResumableDataLoader hands out batches: pass a `batch_size` (or a `batch_sampler`).")
        if batch_sampler is not None:
            if batch_size != 1 or shuffle or sampler is not None or drop_last:
                raise ValueError(
                    "batch_sampler option is mutually exclusive with batch_size, shuffle, sampler, and drop_last"
                )
            if not isinstance(batch_sampler, BatchSampler):
                raise TypeError(
                    "ResumableDataLoader batches with a batch sampler of its own: pass a `BatchSampler` (its sampler, "
                    f"batch size and drop_last are taken) or those three, not a {type(batch_sampler).__name__}."
                )
            sampler, batch_size, drop_last = batch_sampler.sampler, batch_sampler.batch_size, batch_sampler.drop_last
        if shuffle and sampler is not None:
            raise ValueError("ResumableDataLoader: `sampler` and `shuffle=True` exclude each other; pass one of them.")
        check_positive_int("stack_batches", stack_batches)
        if stack_batches > 1 and not (batch_size and drop_last):
            raise ValueError(
                "ResumableDataLoader: `stack_batches` > 1 stacks batches of one size: pass `batch_size` and "
                "`drop_last=True`."
            )
        self.stack_batches, self.index_device = stack_batches, index_device
        if shuffle:
            sampler = EpochRandomSampler(dataset, seed)
        elif sampler is None:
            sampler = SequentialSampler(dataset)
        self._owns_generator = generator is None
        super().__init__(
            dataset,
            batch_sampler=_ResumableBatchSampler(sampler, batch_size, drop_last, stack_batches, index_device),
            generator=generator or torch.Generator(),
            **kwargs,
        )
        self._epoch: int | None = None  # epoch of the pass in progress (None: no pass yet)
        self._consumed = 0  # batches handed out in that pass (Lightning does not prefetch sized loaders)
        self._skip = 0  # batches the pass in progress started by dropping
        self._pending: tuple[int | None, int] | None = None  # (epoch, batches) from load_state_dict

    # With a batch sampler, `DataLoader.__init__` records a default sampler, no batch size and no drop_last: this
    # loader's are those of its batches (the sampler that Lightning's DistributedSampler replaces under DDP).
    @property  # type: ignore[override]
    def sampler(self) -> Any:
        """The sampler that orders the dataset: :class:`EpochRandomSampler` when shuffling, Lightning's
        ``DistributedSampler`` under DDP."""
        return self.batch_sampler.sampler

    @sampler.setter
    def sampler(self, value: Any) -> None:
        pass  # DataLoader.__init__'s record (see above)

    @property  # type: ignore[override]
    def batch_size(self) -> int:
        """Examples per batch."""
        return self.batch_sampler.batch_size

    @batch_size.setter
    def batch_size(self, value: int | None) -> None:
        pass

    @property  # type: ignore[override]
    def drop_last(self) -> bool:
        """Whether a pass leaves out its last batch when it is smaller."""
        return self.batch_sampler.drop_last

    @drop_last.setter
    def drop_last(self, value: bool) -> None:
        pass

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
        self.batch_sampler.skip = self._skip
        for batch in super().__iter__():
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The place in the epoch: ``epoch``, ``batches`` consumed in it (stacks of ``stack_batches``), the shuffling
        ``seed``, and ``stack_batches``."""
        if self._pending is not None:
            epoch, batches = self._pending
        else:
            epoch = self._epoch if self._epoch is not None else self._sampler_epoch()
            batches = self._consumed
        seed = getattr(self.sampler, "seed", None)
        return {"epoch": epoch, "batches": batches, "seed": seed, "stack_batches": self.stack_batches}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`: the next pass skips the batches that epoch had consumed.

        Raises:
            ValueError: when the state counts stacks of another size (``stack_batches``) than this loader's, for
                Lightning's own count of the epoch's batches would not fit this loader's.
        """
        epoch, batches = state_dict.get("epoch"), int(state_dict.get("batches", 0))
        saved_stack = int(state_dict.get("stack_batches", 1))
        if saved_stack != self.stack_batches:
            raise ValueError(
                f"The checkpoint's training batches are stacks of {saved_stack} steps, these are stacks of "
                f"{self.stack_batches}: resume with the datamodule's `steps_per_batch: {saved_stack}` (as saved)."
            )
        if state_dict.get("seed") is not None and hasattr(self.sampler, "seed"):
            self.sampler.seed = state_dict["seed"]
        if batches >= len(self):  # that epoch was finished
            epoch, batches = None if epoch is None else epoch + 1, 0
        if epoch is not None:
            self._set_sampler_epoch(epoch)
        self._pending = (epoch, batches)
        self._epoch, self._consumed = None, 0
