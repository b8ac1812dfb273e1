"""The package's collectives: a no-op on one process, one ``torch.distributed`` call under DDP.

Called directly rather than through Lightning's ``strategy.reduce``, which adds a barrier per call.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def distributed() -> bool:
    """Whether a process group is initialised (DDP, possibly of one process)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce(tensor: Tensor, op: str = "max") -> Tensor:
    """``tensor`` reduced in place over the ranks by ``op`` (``"max"``, ``"min"`` or ``"sum"``); returned."""
    if distributed():
        torch.distributed.all_reduce(tensor, op=getattr(torch.distributed.ReduceOp, op.upper()))
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` on one process)."""
    if not distributed() or torch.distributed.get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered
