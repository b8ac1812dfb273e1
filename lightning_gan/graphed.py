"""The GPU fast path of :class:`~lightning_gan.GAN` (``cuda_graph=True``): each training batch's whole update (forward
passes, backward pass, optimizer steps, weight-norm constraints) captured once as a CUDA graph and replayed, so that
the host issues one launch per batch instead of hundreds of kernels, and never waits for the device.

What a graph bakes in, and how it stays right:

* Tensors are used in place: parameters, gradients, optimizer state and the static input buffer keep their storage,
  so replays update the very parameters the module holds (validation, checkpoints and callbacks see them as usual).
* Learning rates become 0-d device tensors, which a scheduler's ``step()`` overwrites in place (``fill_``), and the
  optimizers switch to their fused implementations, which read them from the device (torch provides this for
  ``SGD``, ``Adam`` and ``AdamW``). Checkpoints are written with the user's own settings and float learning rates.
* Every other hyperparameter (momentum, betas, weight decay, ...) is a constant of the graph: when one changes (the
  momentum ramp, once per epoch) the update is captured again. So is it for each new batch shape.
* The generator's weight average (``ema_decay``) moves by a 0-d device tensor that the host fills before each
  replay (its warm-up changes it every step).
* Random numbers (noise, dropout masks) come from the device generator, which CUDA graphs advance on every replay.
* Gradients live in the graphs' memory: outside the update, a parameter's ``.grad`` is not the last batch's.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, ClassVar

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.optim import Optimizer

from lightning_gan._lightning import float_last_lrs
from lightning_gan.guards import NonFiniteGuard

GRAPH_SAFE_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
_FLAGS = ("lr", "fused", "foreach", "capturable")


def check_graph_safe(optimizer: Optimizer, name: str) -> None:
    """Raise a ``ValueError`` naming the fix when ``optimizer`` has no fused, device-lr implementation in torch."""
    if type(optimizer) not in GRAPH_SAFE_OPTIMIZERS:
        supported = ", ".join(f"torch.optim.{cls.__name__}" for cls in GRAPH_SAFE_OPTIMIZERS)
        raise ValueError(
            f"`cuda_graph=True` needs optimizers whose step can run inside a CUDA graph ({supported}), but the {name} "
            f"optimizer is {type(optimizer).__module__}.{type(optimizer).__name__}: choose one of those, or set "
            "`cuda_graph: false`."
        )
    if any(group.get("differentiable", False) for group in optimizer.param_groups):
        raise ValueError(f"`cuda_graph=True` cannot use the {name} optimizer with `differentiable=True`.")


def make_graph_safe(optimizer: Optimizer, device: torch.device) -> list[dict[str, Any]]:
    """Switch ``optimizer`` to device learning rates and its fused step; return each group's own settings."""
    saved = [{key: group.get(key) for key in _FLAGS} for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        lr = group["lr"]
        # fused CUDA steps read a float32 lr on the device (a CPU tensor would be read once, at capture)
        if not (isinstance(lr, Tensor) and lr.device == device and lr.dtype == torch.float32):
            group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=device)
        group["fused"], group["foreach"] = True, False
        if "capturable" in group:  # Adam(W) refuse capture without it, fused or not
            group["capturable"] = True
    for state in optimizer.state.values():  # the fused step keeps its step count on the device
        if isinstance(state.get("step"), Tensor):
            state["step"] = state["step"].to(device=device, dtype=torch.float32)
    return saved


def restore_settings(optimizer_state: dict[str, Any], saved: list[dict[str, Any]]) -> None:
    """Put the user's settings back into a state dict of a graph-safe optimizer: float learning rates, their
    ``fused``/``foreach``/``capturable`` flags, and step counts on the CPU where their step keeps them there."""
    for group, own in zip(optimizer_state["param_groups"], saved, strict=True):
        for key, value in own.items():
            if key == "lr":
                group["lr"] = float(group["lr"]) if isinstance(group["lr"], Tensor) else group["lr"]
            elif value is not None or key in group:
                group[key] = value
        if not (own.get("fused") or own.get("capturable")):  # else each eager step would read it back (a sync)
            for index in group["params"]:
                state = optimizer_state["state"].get(index, {})
                if isinstance(state.get("step"), Tensor):
                    # a new dict: ``Optimizer.state_dict()`` hands out the live per-parameter state, which the
                    # graphs keep updating on the device
                    optimizer_state["state"][index] = {**state, "step": state["step"].detach().to("cpu", torch.float32)}


def graph_constants(optimizers: list[Optimizer]) -> tuple[Any, ...]:
    """The optimizer hyperparameters a captured graph holds as constants (all but params and tensor values)."""
    return tuple(
        tuple((key, value) for key, value in group.items() if key != "params" and not isinstance(value, Tensor))
        for optimizer in optimizers
        for group in optimizer.param_groups
    )


class GraphedUpdates:
    """Runs ``update(real, variant)``, captured as a CUDA graph per (variant, batch shape, optimizer constants) and
    replayed after that.

    The first ``warmup`` calls of each variant and batch shape run eagerly on a side stream (as torch's CUDA-graph
    recipe asks: lazy state such as momentum buffers and library workspaces must exist before capture, or the graph
    would re-create it on every replay), and so does the first call after the constants change (a momentum that
    leaves 0 creates its buffers then); on a device other than CUDA every call runs eagerly. ``update`` must only
    launch device work: it may not read values back to the host.
    """

    def __init__(self, update: Callable[[Tensor, Hashable], Tensor], warmup: int = 3) -> None:
        self.update = update
        self.warmup = warmup
        self.captures = 0
        self._calls: dict[Hashable, int] = {}  # eager calls so far, per (variant, shape, dtype)
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = {}
        self._constants: tuple[Any, ...] | None = None

    def reset(self) -> None:
        """Drop every graph (the tensors they captured may have been replaced, e.g. by a checkpoint restore)."""
        self._graphs.clear()
        self._constants = None
        self._calls.clear()

    def __call__(self, real: Tensor, variant: Hashable, constants: tuple[Any, ...]) -> Tensor:
        """This batch's update; returns its statistics tensor (overwritten by the next call: copy to keep it)."""
        if not self.capturable(real):
            return self.update(real, variant)
        if constants != self._constants:
            self._graphs.clear()
            if self._constants is not None:  # one eager call first: state a new constant needs must exist at capture
                self._calls = dict.fromkeys(self._calls, self.warmup - 1)
            self._constants = constants
        key = (variant, tuple(real.shape), real.dtype)
        entry = self._graphs.get(key)
        if entry is None:
            self._calls[key] = self._calls.get(key, 0) + 1
            if self._calls[key] <= self.warmup:
                return self._run_on_side_stream(real, variant)
            entry = self._graphs[key] = self._capture(real, variant)
        graph, static_real, stats = entry
        static_real.copy_(real)
        graph.replay()
        return stats

    @staticmethod
    def capturable(real: Tensor) -> bool:
        """Whether updates on ``real``'s device can be captured (CUDA)."""
        return real.device.type == "cuda"

    def _run_on_side_stream(self, real: Tensor, variant: Hashable) -> Tensor:
        stream = torch.cuda.Stream(device=real.device)
        stream.wait_stream(torch.cuda.current_stream(real.device))
        with torch.cuda.stream(stream):
            stats = self.update(real, variant)
        torch.cuda.current_stream(real.device).wait_stream(stream)
        return stats

    def _capture(self, real: Tensor, variant: Hashable) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor]:
        static_real = real.clone()
        graph = torch.cuda.CUDAGraph()
        # Each graph has its own memory pool: graphs sharing one must replay in capture order, and ours interleave.
        # "thread_local": CUDA calls of other threads (a DataLoader's pin-memory thread) may go on during capture.
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                stats = self.update(static_real, variant)
        except RuntimeError as err:
            raise RuntimeError(
                f"Capturing the training update as a CUDA graph failed: {err}. The update (networks, losses, "
                "optimizer steps) must run on the GPU without reading values back to the host (no `.item()`, "
                "`.cpu()`, `if tensor:` or CPU tensors); fix that, or set `model.init_args.cuda_graph: false`."
            ) from err
        self.captures += 1
        return graph, static_real, stats


def check_graph_fits(world_size: int, precision: Any) -> None:
    """Raise a ``ValueError`` naming the fix for a run the fast path cannot capture: several processes, or mixed
    precision."""
    problem = None
    if world_size > 1:
        problem = f"runs on one device, but this run has {world_size} processes"
    elif str(precision).endswith("-mixed"):
        problem = f"does not support mixed precision (precision={precision!r}); use 32-true or bf16-true"
    if problem:
        raise ValueError(f"`cuda_graph=True` {problem}: set `model.init_args.cuda_graph: false`.")


class CudaGraphRunner:
    """The fast path's state for one fit: the optimizers switched to their graph-safe settings (the user's kept for
    checkpoints), the step counted on the device (for the non-finite record), and the graphs of the update.

    ``update(real, generator_step, backward, allows, step)`` is the module's update body; it returns
    ``(d_loss, g_loss or None, real_logits, fake_logits)``.
    """

    #: Off only in tests: the fast path's bookkeeping then runs on the CPU, with its update made eagerly.
    requires_cuda: ClassVar[bool] = True

    def __init__(
        self, update: Callable[..., Any], optimizers: list[Optimizer], guard: NonFiniteGuard, device: torch.device,
        step: int,
    ) -> None:  # fmt: skip
        self.update, self.optimizers, self.guard = update, optimizers, guard
        self.user_settings = [make_graph_safe(optimizer, device) for optimizer in optimizers]
        # made before any capture, so that the graphs update them in place
        self.step = torch.full((), step, dtype=torch.long, device=device)
        guard.first_bad(device)
        self.graphs = GraphedUpdates(self.body)

    @classmethod
    def start(
        cls, update: Callable[..., Any], optimizers: list[Optimizer], guard: NonFiniteGuard, device: torch.device,
        step: int,
    ) -> CudaGraphRunner | None:  # fmt: skip
        """The runner for a fit on ``device`` from global step ``step``; ``None``, saying so, off CUDA."""
        if device.type != "cuda" and cls.requires_cuda:
            rank_zero_info(f"GAN: `cuda_graph` needs a CUDA device; training on {device.type} runs eagerly.")
            return None
        return cls(update, optimizers, guard, device, step)

    def body(self, real: Tensor, generator_step: bool) -> Tensor:
        """The graph's body: the update with nothing read back to the host. Returns ``[d_loss, g_loss (NaN without a
        generator step), D(x), D(G(z))]``."""
        record = self.guard.deferred(real.device)

        def allows(d_loss: Tensor | None, g_loss: Tensor | None) -> bool:
            if record:  # the non-finite check, kept on the device
                self.guard.record(self.step, d_loss, g_loss)
            return True

        d_loss, g_loss, real_logits, fake_logits = self.update(real, generator_step, Tensor.backward, allows, _step)
        self.step.add_(1)
        g_loss = torch.full_like(d_loss, float("nan")) if g_loss is None else g_loss
        return torch.stack(
            [d_loss, g_loss, torch.sigmoid(real_logits).mean(), torch.sigmoid(fake_logits).mean()]
        ).detach()

    @property
    def captures(self) -> int:
        """Graphs captured so far."""
        return self.graphs.captures

    def __call__(
        self, real: Tensor, generator_step: bool, constants: tuple[Any, ...] | None, step: int, epoch: int, copy: bool
    ) -> Tensor:
        """Replay (or capture) the update of ``real`` at global ``step`` and ``epoch``; its statistics, a ``copy`` or
        the graph's own (overwritten by the next replay). ``constants``: :func:`graph_constants` of the optimizers,
        read now if ``None``."""
        constants = graph_constants(self.optimizers) if constants is None else constants
        stats = self.graphs(real, generator_step, constants)
        if not self.guard.deferred(real.device):  # else the update itself recorded it
            self.guard.allows(step, epoch, stats[0], stats[1] if generator_step else None)
        return stats.clone() if copy else stats

    def checkpoint_as_eager(self, checkpoint: dict[str, Any]) -> None:
        """Write ``checkpoint`` as an eager run writes it: the user's optimizer settings, float learning rates."""
        for state, saved in zip(checkpoint.get("optimizer_states", []), self.user_settings, strict=False):
            restore_settings(state, saved)
        for scheduler in checkpoint.get("lr_schedulers", []):
            float_last_lrs(scheduler)


def _step(optimizer: Any) -> None:
    """The optimizer's own step, not Lightning's, whose hooks run on the host."""
    optimizer.optimizer.step()
