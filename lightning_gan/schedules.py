"""The authors' learning-rate decay and momentum ramp, as ordinary scheduler objects.

Both follow the PyTorch scheduler API (``step()``, ``state_dict()``, ``load_state_dict()``), so Lightning checkpoints
and restores them with the optimizers. :class:`~lightning_gan.GAN` steps :class:`ExponentialDecay` after every
update of its optimizer and :class:`MomentumRamp` at the end of every training epoch.
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class ExponentialDecay(LRScheduler):
    """pylearn2's ``ExponentialDecay``: after ``t`` updates, ``lr_t = max(lr_0 / decay_factor**t, min_lr)``.

    The authors used ``decay_factor=1.000004`` and ``min_lr=1e-6`` with ``lr_0 = 0.1`` on MNIST.
    """

    def __init__(self, optimizer: Optimizer, decay_factor: float = 1.000004, min_lr: float = 1e-6) -> None:
        if decay_factor < 1:
            raise ValueError(f"Expected `decay_factor` >= 1 (1 keeps the learning rate constant), got {decay_factor}.")
        if min_lr < 0:
            raise ValueError(f"Expected `min_lr` >= 0, but got {min_lr}.")
        self.decay_factor = decay_factor
        self.min_lr = min_lr
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [max(base / self.decay_factor**self.last_epoch, self.min_lr) for base in self.base_lrs]


class MomentumRamp:
    """pylearn2's ``MomentumAdjustor``: momentum moves linearly from its initial value to ``final_momentum``.

    Stepped once per epoch. During (1-based) epoch ``e`` the momentum is
    ``m_0 + (final_momentum - m_0) * clip((e - start_epoch) / (saturate_epoch - start_epoch), 0, 1)``, so with the
    authors' ``start_epoch=1, saturate_epoch=250`` it is .5 in epoch 1 and reaches .7 in epoch 250.
    """

    def __init__(
        self, optimizer: Optimizer, final_momentum: float = 0.7, start_epoch: int = 1, saturate_epoch: int = 250
    ) -> None:
        missing = [i for i, group in enumerate(optimizer.param_groups) if "momentum" not in group]
        if missing:
            raise ValueError(
                f"MomentumRamp needs an optimizer with a `momentum` hyperparameter (e.g. torch.optim.SGD), but "
                f"{type(optimizer).__name__} has none; set `momentum_final: null` to switch the ramp off."
            )
        if not 0 <= final_momentum < 1:
            raise ValueError(f"Expected `final_momentum` in [0, 1), but got {final_momentum}.")
        if saturate_epoch <= start_epoch:
            raise ValueError(
                f"Expected `saturate_epoch` > `start_epoch`, but got start {start_epoch}, saturate {saturate_epoch}."
            )
        self.optimizer = optimizer
        self.final_momentum = final_momentum
        self.start_epoch = start_epoch
        self.saturate_epoch = saturate_epoch
        self.initial_momenta = [group["momentum"] for group in optimizer.param_groups]
        self.last_epoch = 0  # completed epochs
        self._apply()

    def momentum(self, initial: float) -> float:
        """The momentum for the current epoch, starting from ``initial``."""
        epoch = self.last_epoch + 1
        alpha = min(max((epoch - self.start_epoch) / (self.saturate_epoch - self.start_epoch), 0.0), 1.0)
        return initial + alpha * (self.final_momentum - initial)

    def _apply(self) -> None:
        for group, initial in zip(self.optimizer.param_groups, self.initial_momenta, strict=True):
            group["momentum"] = self.momentum(initial)

    def step(self) -> None:
        """Advance one epoch."""
        self.last_epoch += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key != "optimizer"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.__dict__.update(state_dict)
        self._apply()
