"""An exponential moving average of the generator's weights (``GAN(ema_decay=...)``), the copy that samples and
evaluations draw from.

Averaging a GAN generator's iterates (Yazici et al., "The Unusual Effectiveness of Averaging in GAN Training", ICLR
2019) smooths out the oscillation of the adversarial game; the generator that trains is unchanged. The average is
bias-corrected as Adam's moment estimates are (Kingma & Ba, 2015): after the schedule's ``n``-th generator step (one
left out by ``nonfinite="skip"`` counts too) it moves towards the generator by ``(1 - decay) / (1 - decay ** n)``.
So it weights the iterates so far by ``decay ** age``, normalised, and the random initial weights have no part in it
(the first step replaces them): early on it is nearly the plain mean of the iterates so far, later the usual
exponential average over about ``1 / (1 - decay)`` generator updates.

Not ``torch.optim.swa_utils.AveragedModel``: its ``update_parameters`` reads its update count back to the host
(``if self.n_averaged == 0``), which a CUDA graph cannot capture, and it has no bias correction. Here the step size is
a 0-d device tensor that the host fills before each update, so the update is device work only.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_gan._lightning import foreach_move_towards

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


class GeneratorAverage:
    """The bias-corrected moving average :attr:`module` of a generator's weights, with decay ``decay``.

    :attr:`updates` counts the generator steps it has followed, over every fit (checkpointed by the GAN).
    """

    def __init__(self, generator: nn.Module, decay: float) -> None:
        check_decay(decay)
        self.decay = decay
        self.module = frozen_copy(generator)
        self.updates = 0
        self._offset = 0  # updates - the fit's generator updates, fixed when a fit starts
        self._weight: Tensor | None = None  # the step size, a 0-d tensor on the weights' device

    def start_fit(self, generator_updates: int) -> None:
        """When training starts, at ``generator_updates`` (restored by a resume, else 0): refuse 16-bit weights (the
        precision plugin has converted them by now), and count on from the updates followed so far, so that a second
        fit of a trained module goes on averaging instead of starting over."""
        check_precision(self.module, self.decay)
        self._offset = self.updates - generator_updates
        self._weight = None

    def set_step(self, generator_updates: int) -> None:
        """Set how far :meth:`update` moves the average, for the fit's ``generator_updates``-th generator step
        (updates left out by ``nonfinite="skip"`` included). Fills a tensor in place: a CUDA graph reads it."""
        self.updates = self._offset + generator_updates
        if self._weight is None:
            parameter = next(self.module.parameters())
            self._weight = torch.zeros((), dtype=parameter.dtype, device=parameter.device)
        self._weight.fill_(average_weight(self.decay, self.updates))

    @torch.no_grad()
    def update(self, generator: nn.Module) -> None:
        """Move the average towards ``generator`` by the step set last, and copy its buffers (device work only)."""
        foreach_move_towards(list(self.module.parameters()), list(generator.parameters()), self._weight)
        for averaged_buffer, buffer in zip(self.module.buffers(), generator.buffers(), strict=True):
            averaged_buffer.copy_(buffer)


def fit_average_to(checkpoint: dict[str, Any], average: GeneratorAverage | None, generator_updates: int) -> None:
    """Make a checkpoint written with or without an average load into a model with ``average`` (or none), saying
    what was done, and restore how many updates the average has followed (``generator_updates`` for checkpoints
    that predate the count)."""
    if average is not None:
        average.updates = int((checkpoint.get("lightning_gan") or {}).get("ema_updates", generator_updates))
    if isinstance(checkpoint.get("state_dict"), dict):
        done = reconcile_checkpoint(checkpoint["state_dict"], averaging=average is not None)
        if done:
            rank_zero_info(f"GAN: {done}.")
