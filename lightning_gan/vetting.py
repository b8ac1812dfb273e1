"""Checkpoints name only classes that are allowed, and an unreadable checkpoint is named as such.

A checkpoint holds its module's hyperparameters, and those name classes by import path (``class_path``): LightningCLI
(``--ckpt_path``) and ``GAN.load_from_checkpoint`` import what they name, so a checkpoint from elsewhere could run
code on import. Before that, every class path in the checkpoint is vetted. Allowed are:

* the package's own classes (``lightning_gan.*``) and torch's layers and optimizers (``torch.nn.*``, ``torch.optim.*``);
* the class paths that the user's own config names (the ``lightning-gan`` command);
* classes of modules already imported that are networks, optimizers, schedulers or Lightning modules (importing
  them again runs nothing).

Anything else is refused with :class:`UntrustedCheckpointError` before it is imported; a file that ``torch.load``
cannot read raises :class:`CorruptCheckpointError`, one line naming the file and what is wrong.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule

from lightning_gan._lightning import HPARAMS_INSTANTIATOR_KEY, load_from_checkpoint_as
from lightning_gan.cli_checks import subcommand_config
from lightning_gan.errors import LightningGANError

__all__ = [
    "ALLOWED_PREFIXES",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "UntrustedCheckpointError",
    "VettedCheckpoints",
    "class_paths",
    "load_vetted",
    "read_checkpoint",
    "vet_class_paths",
]

ALLOWED_PREFIXES = ("lightning_gan.", "torch.nn.", "torch.optim.")
# what an already imported class must be to be allowed: the types a GAN's hyperparameters name
_ALLOWED_BASES = (torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, LightningModule,
                  LightningDataModule)  # fmt: skip
_DOTTED_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
_SPECIAL_PATHS = ("last", "best", "hpc", "registry")  # --ckpt_path values that Lightning resolves itself


class UntrustedCheckpointError(LightningGANError, ValueError):
    """A checkpoint names a class (or another import path) that is not allowed (see the module's docstring)."""


class CorruptCheckpointError(LightningGANError, ValueError):
    """A checkpoint file that cannot be read: empty, truncated, or not written by ``torch.save``."""


class CheckpointNotFoundError(LightningGANError, FileNotFoundError):
    """``--ckpt_path`` names no file."""


def class_paths(tree: Any) -> Iterator[str]:
    """Every import path in nested dicts, lists and namespaces: the strings under ``class_path`` (or
    ``_class_path``) keys, and any other string that reads as a dotted name, for jsonargparse imports those too (the
    value of a callable-typed argument, e.g. ``"gan_helpers.make_optimizer"``)."""
    if hasattr(tree, "as_dict"):  # a jsonargparse Namespace
        tree = tree.as_dict()
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key != HPARAMS_INSTANTIATOR_KEY:  # Lightning checks it against an allowlist of its own
                yield from class_paths(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from class_paths(value)
    elif isinstance(tree, str) and _DOTTED_NAME.fullmatch(tree):
        yield tree


def _imported_class_allowed(path: str) -> bool:
    module, _, name = path.rpartition(".")
    obj = sys.modules.get(module)
    for part in name.split("."):  # never imports: only what is in sys.modules already
        obj = getattr(obj, part, None) if obj is not None else None
    return isinstance(obj, type) and issubclass(obj, _ALLOWED_BASES)


def vet_class_paths(paths: Iterable[str], source: str, trusted: Iterable[str] = ()) -> None:
    """Refuse, before anything is imported, a class path that is not allowed (see the module's docstring).

    Args:
        paths: the class paths to vet (e.g. :func:`class_paths` of a checkpoint's hyperparameters).
        source: the file they come from, for the message.
        trusted: class paths allowed besides the package's rule (those of the user's own config).

    Raises:
        UntrustedCheckpointError: naming the first class path refused, and the fix.
    """
    trusted = set(trusted)
    for path in paths:
        if path in trusted or path.startswith(ALLOWED_PREFIXES) or _imported_class_allowed(path):
            continue
        raise UntrustedCheckpointError(
            f"{source} names {path!r}, which lightning-gan does not import from a checkpoint (it could run "
            "code): only classes of lightning_gan, torch.nn and torch.optim, or named in your own config, are allowed. "
            f"If you trust this checkpoint, name the class in your config (e.g. `--model.init_args.generator={path}`) "
            "or import its module before loading."
        )


def read_checkpoint(path: str | os.PathLike[str] | io.IOBase, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint at ``path`` read with ``torch.load(weights_only=True)`` on the CPU (``mmap``: memory-mapped, for
    a reader that looks only at its small entries).

    Raises:
        CorruptCheckpointError: one line naming the file and what is wrong with it.
    """
    name = path if isinstance(path, (str, os.PathLike)) else getattr(path, "name", "the checkpoint")
    try:
        if isinstance(path, (str, os.PathLike)) and Path(path).stat().st_size == 0:
            raise CorruptCheckpointError(
                f"Cannot read checkpoint {name}: the file is empty (its writing was cut off?)."
            )
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise CorruptCheckpointError(
            f"Cannot read checkpoint {name}: it is not a file written by torch.save, or it holds objects that "
            "`weights_only` loading refuses."
        ) from error
    except (EOFError, RuntimeError, zipfile.BadZipFile, ValueError) as error:
        if isinstance(error, CorruptCheckpointError):
            raise
        raise CorruptCheckpointError(
            f"Cannot read checkpoint {name}: it is truncated or not a file written by torch.save "
            f"({type(error).__name__})."
        ) from error
    if not isinstance(checkpoint, dict):
        raise CorruptCheckpointError(
            f"Cannot read checkpoint {name}: it holds a {type(checkpoint).__name__}, not a dict."
        )
    return checkpoint


def vet_checkpoint(path: Any, trusted: Iterable[str] = ()) -> None:
    """Read the checkpoint at ``path`` (:func:`read_checkpoint`) and vet the class paths of its hyperparameters."""
    position = path.tell() if isinstance(path, io.IOBase) else None
    checkpoint = read_checkpoint(path)
    if position is not None:
        path.seek(position)
    vet_class_paths(class_paths(checkpoint.get("hyper_parameters") or {}), str(path), trusted)


def load_vetted(cls: type[LightningModule], checkpoint_path: Any, *args: Any, **kwargs: Any) -> LightningModule:
    """``LightningModule.load_from_checkpoint`` after :func:`vet_checkpoint`: the checkpoint may name only allowed
    classes (a ``classmethod`` of :class:`~lightning_gan.GAN`)."""
    vet_checkpoint(checkpoint_path)
    return load_from_checkpoint_as(cls, checkpoint_path, *args, **kwargs)


class VettedCheckpoints:
    """A LightningCLI mixin: once the arguments are parsed, and before LightningCLI reads the hyperparameters of
    ``--ckpt_path``'s checkpoint (importing the classes they name), check that the file exists and can be read, and
    vet its class paths, allowing those of the user's own config."""

    config: Any

    def parse_arguments(self, parser: Any, args: Any) -> None:
        super().parse_arguments(parser, args)  # type: ignore[misc]
        config = subcommand_config(self.config)
        ckpt_path = config.get("ckpt_path") if config is not None else None
        if not ckpt_path or str(ckpt_path) in _SPECIAL_PATHS or "://" in str(ckpt_path):
            return
        if not Path(ckpt_path).is_file():
            raise CheckpointNotFoundError(
                f"--ckpt_path {ckpt_path}: no such file. Give the path of a .ckpt file (e.g. "
                "<run folder>/checkpoints/<name>.ckpt), or leave --ckpt_path out to start a new run."
            )
        vet_checkpoint(ckpt_path, trusted=class_paths(config))
