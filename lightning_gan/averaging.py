"""An exponential moving average of the generator's weights (``GAN(ema_decay=...)``), the copy that samples and
evaluations draw from.

Averaging a GAN generator's iterates (Yazici et al., "The Unusual Effectiveness of Averaging in GAN Training", ICLR
2019) smooths out the oscillation of the adversarial game; the generator that trains is unchanged. The average is
bias-corrected as Adam's moment estimates are (Kingma & Ba, 2015): after the schedule's ``n``-th generator step (one
left out by ``nonfinite="skip"`` counts too) it moves towards the generator by ``(1 - decay) / (1 - decay ** n)``.
So it weights the iterates so far by ``decay ** age``, normalised, and the random initial weights have no part in it
(the first step replaces them): early on it is nearly the plain mean of the iterates so far, later the usual
exponential average over about ``1 / (1 - decay)`` generator updates.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

if TYPE_CHECKING:
    from lightning_gan.module import GAN

PREFIX = "generator_ema."


def check_decay(decay: float | None) -> None:
    """Raise a ``ValueError`` unless ``decay`` is ``None`` or in ``(0, 1)``."""
    if decay is not None and not 0 < decay < 1:
        raise ValueError(
            f"Expected `ema_decay` in (0, 1), e.g. 0.999 (an average over about 1,000 generator updates), or null to "
            f"switch the average off, but got {decay!r}."
        )


def check_precision(average: nn.Module, decay: float) -> None:
    """Raise a ``ValueError`` when ``average``'s weights are 16-bit floats, in which its updates would round away."""
    dtypes = {p.dtype for p in average.parameters() if p.is_floating_point()}
    low = sorted(str(dtype) for dtype in dtypes if torch.finfo(dtype).bits < 32)
    if low:
        raise ValueError(
            f"`ema_decay={decay}` averages the generator's weights, but they are {', '.join(low)} here, in which an "
            f"update of {1 - decay:.3g} of the difference rounds away: train with `precision` 32-true or a -mixed "
            "precision, or set `ema_decay: null`."
        )


def frozen_copy(network: nn.Module) -> nn.Module:
    """A copy of ``network`` whose parameters take no gradient."""
    average = copy.deepcopy(network)
    average.requires_grad_(False)
    return average


def average_weight(decay: float, update: int) -> float:
    """How far the average moves towards the generator after the generator's ``update``-th step (1-based)."""
    return (1.0 - decay) / (1.0 - decay**update)


@torch.no_grad()
def update_average(average: nn.Module, current: nn.Module, weight: Tensor) -> None:
    """``average += weight * (current - average)`` for every parameter, with ``weight`` a 0-d tensor on their device
    (read at run time, so that a CUDA graph can replay it); buffers are copied. Only device work: no host sync."""
    averaged = list(average.parameters())
    difference = torch._foreach_sub(list(current.parameters()), averaged)
    torch._foreach_mul_(difference, weight)
    torch._foreach_add_(averaged, difference)
    for averaged_buffer, buffer in zip(average.buffers(), current.buffers(), strict=True):
        averaged_buffer.copy_(buffer)


def reconcile_checkpoint(state_dict: dict[str, Any], averaging: bool) -> str | None:
    """Make a checkpoint's ``state_dict`` fit a model with (``averaging``) or without a generator average, in place:
    an average missing from the checkpoint starts from its generator, one the model does not keep is dropped.

    Returns:
        What was done, to tell the user, or ``None`` when the checkpoint already fit.
    """
    saved = [key for key in state_dict if key.startswith(PREFIX)]
    if averaging and not saved:
        for key in [key for key in state_dict if key.startswith("generator.")]:
            state_dict[PREFIX + key.removeprefix("generator.")] = state_dict[key].clone()
        return "the checkpoint has no generator average (`ema_decay`): the average starts from its generator"
    if not averaging and saved:
        for key in saved:
            del state_dict[key]
        return "the checkpoint's generator average is left out, as this model has `ema_decay: null`"
    return None


class GeneratorAveraging:
    """The weight average of :class:`~lightning_gan.GAN` (``ema_decay``), as a mixin: the copy, its updates (eagerly
    or inside the CUDA graph), the generator that samples are drawn from, and checkpoints with or without it."""

    generator: nn.Module
    generator_ema: nn.Module | None
    ema_decay: float | None
    _ema_weight: Tensor
    _ema_updates: int  # the schedule's generator steps the average has followed, over every fit of this module
    _ema_offset: int  # _ema_updates - generator_updates, fixed when a fit starts

    def _init_average(self: GAN, ema_decay: float | None) -> None:
        check_decay(ema_decay)
        self.ema_decay = ema_decay
        self.generator_ema = frozen_copy(self.generator) if ema_decay is not None else None
        self._ema_updates = self._ema_offset = 0
        if ema_decay is not None:
            # The average's step, on the module's device: the CUDA graph reads it at each replay. Every rank fills it
            # alike, so DDP need not broadcast it before each forward pass, as it does module buffers.
            self.register_buffer("_ema_weight", torch.zeros(()), persistent=False)
            self._ddp_params_and_buffers_to_ignore = ["_ema_weight"]

    @property
    def sampling_generator(self) -> nn.Module:
        """The generator that :meth:`~lightning_gan.GAN.sample`, the figure callbacks and the Parzen evaluation draw
        from: the weight average :attr:`generator_ema` when ``ema_decay`` is set, else :attr:`generator`."""
        return self.generator_ema if self.generator_ema is not None else self.generator

    def _continue_average(self, generator_updates: int) -> None:
        """When a fit starts, at ``generator_updates`` (restored by a resume, else 0): count on from the updates the
        average has followed, so that a second fit of a trained module goes on averaging instead of starting over."""
        self._ema_offset = self._ema_updates - generator_updates

    # The two below are called only when the average is kept (``generator_ema`` is not None), from the training step.
    def _set_average_weight(self, generator_updates: int) -> None:
        """Set how far :meth:`_average_generator` moves the average, for this fit's ``generator_updates``-th generator
        step (updates left out by ``nonfinite="skip"`` included)."""
        self._ema_updates = self._ema_offset + generator_updates
        self._ema_weight.fill_(average_weight(self.ema_decay, self._ema_updates))

    def _average_generator(self) -> None:
        """Move the average towards the generator by the weight set last (device work only)."""
        update_average(self.generator_ema, self.generator, self._ema_weight)

    def _check_average_precision(self) -> None:
        """When fitting starts, after the precision plugin converted the weights."""
        if self.generator_ema is not None:
            check_precision(self.generator_ema, self.ema_decay)

    def _fit_average_to(self, checkpoint: dict[str, Any], generator_updates: int) -> None:
        """Make a checkpoint written with or without an average load into this model, saying what was done, and
        restore how many updates the average has followed (``generator_updates`` for checkpoints that predate it)."""
        self._ema_updates = int((checkpoint.get("lightning_gan") or {}).get("ema_updates", generator_updates))
        if isinstance(checkpoint.get("state_dict"), dict):
            done = reconcile_checkpoint(checkpoint["state_dict"], averaging=self.generator_ema is not None)
            if done:
                rank_zero_info(f"GAN: {done}.")
