"""Guards of :class:`~lightning_gan.GAN` against silently wrong training: non-finite losses and parameters
(:class:`NonFiniteGuard`), and a checkpoint from other networks (:func:`check_architecture`).

What the non-finite check costs (one ``isfinite`` on the step's one or two loss scalars per update):

- On the CPU the flag is read at once: there is no device to wait for.
- On an accelerator, ``"stop"`` keeps the first bad (step, network) on the device and reads it every
  ``log_every_n_steps`` steps (where Lightning reads the logged losses anyway), at every epoch end and before every
  checkpoint: no sync per step, the error still names the first bad step, and no checkpoint after it is written.
- ``"skip"`` must decide before each update, so it reads the flag every update (one host-device sync each).
- Under DDP the decision is reduced over the ranks (max), so that all ranks skip or stop at the same update.
- Parameters are checked (one pass over the weights) only before a checkpoint and when a loss is non-finite: a
  non-finite weight shows in the next step's loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_gan.distributed import all_reduce

NonFinite = Literal["stop", "skip"]
_NETWORKS = ("discriminator", "generator", "discriminator and generator")
_NONE_YET = 2**62  # "no non-finite loss yet", in the deferred check's code: step * 4 + network index


class NonFiniteError(FloatingPointError):
    """A loss or parameter became NaN or infinite; raised before a bad update is applied or a checkpoint written."""


def nonfinite_networks(networks: Mapping[str, nn.Module]) -> list[str]:
    """The names of the ``networks`` with a NaN or infinite parameter."""
    return [
        name
        for name, network in networks.items()
        if not torch.stack([torch.isfinite(p).all() for p in network.parameters()]).all().item()
    ]


def _loss(network: str) -> str:
    return f"{network} {'losses' if ' and ' in network else 'loss'}"


def _advice(network: str) -> str:
    optimizers = ", ".join(f"{name}_optimizer=..." for name in network.split(" and "))
    return (
        "The checkpoints written before are intact. Resuming one replays this run: its optimizers' state and learning "
        "rates come back (and, through `lightning-gan fit --ckpt_path`, the model settings it was saved with). To go "
        "on from its weights with a lower learning rate, or with nonfinite=skip (updates with a non-finite loss left "
        f"out and counted), start a new fit: `GAN.load_from_checkpoint(path, {optimizers}, nonfinite='skip')`, then "
        "`Trainer.fit` without `ckpt_path`; or a new run with --model.init_args.nonfinite=skip."
    )


class NonFiniteGuard:
    """The ``nonfinite`` policy of :class:`~lightning_gan.GAN`: ``"stop"`` or ``"skip"`` (see the module docstring
    for what it costs) over the ``discriminator`` and ``generator``. :attr:`skipped` counts the updates left out; it
    is checkpointed with the GAN."""

    def __init__(self, mode: NonFinite, discriminator: nn.Module, generator: nn.Module) -> None:
        if mode not in ("stop", "skip"):
            raise ValueError(f"Expected `nonfinite` to be 'stop' or 'skip', but got {mode!r}.")
        self.mode = mode
        self.networks = {"discriminator": discriminator, "generator": generator}
        self.skipped = 0
        self._checked = self._skipped_here = 0  # updates checked and skipped by this process (for the warning)
        self._warned = False
        self._first: Tensor | None = None  # deferred "stop": min over updates of step * 4 + network index

    def deferred(self, device: torch.device) -> bool:
        """Whether losses on ``device`` are checked later, from a record kept on the device."""
        return self.mode == "stop" and device.type != "cpu"

    def allows(self, step: int, epoch: int, d_loss: Tensor | None, g_loss: Tensor | None) -> bool:
        """Whether the update(s) from these losses, made at global step ``step``, may be applied: ``"stop"`` raises
        :class:`NonFiniteError` on a non-finite loss, ``"skip"`` counts it and returns False.

        Raises:
            NonFiniteError: see above; also under ``"skip"`` when the network's parameters are non-finite already.
        """
        loss = d_loss if d_loss is not None else g_loss
        if self.deferred(loss.device):
            self.record(step, d_loss, g_loss)
            return True
        losses = [loss.detach() for loss in (d_loss, g_loss) if loss is not None]
        self._checked += len(losses)
        bad = ~torch.isfinite(torch.stack(losses))  # (1,) or (2,)
        fixed = 0 if g_loss is None else 1 if d_loss is None else None
        flags = all_reduce(bad.float(), "max").tolist()  # the same on every rank
        if not any(flags):
            return True
        network = _NETWORKS[fixed if fixed is not None else int(flags[0]) + 2 * int(flags[1]) - 1]
        broken = nonfinite_networks(self.networks)
        if self.mode == "stop" or broken:
            values = ", ".join(f"{loss.item():g}" for loss in losses)
            why = "before applying the update"
            if broken:
                why = f"as the {' and '.join(broken)} parameters are non-finite already, so skipping cannot help"
            raise NonFiniteError(
                f"Non-finite {_loss(network)} ({values}) at global step {step} (epoch {epoch}): training "
                f"stopped {why}. {_advice(network)}"
            )
        self.skipped += len(losses)
        self._skipped_here += len(losses)
        return False

    def end_epoch(self, step: int, epoch: int) -> None:
        """At an epoch's end: the deferred check (:meth:`check_deferred`), and under ``"skip"``, at the first epoch
        end after a skip, one warning on rank zero saying how many updates were left out: a run that skips most of
        them ends as any other."""
        self.check_deferred(step, epoch)
        if self._skipped_here and not self._warned:
            self._warned = True
            rank_zero_warn(
                f"nonfinite='skip' left out {self._skipped_here} of the {self._checked} updates checked so far in "
                f"this run ({self._skipped_here / self._checked:.0%}), because of a non-finite loss (by epoch "
                f"{epoch}, global step {step}; {self.skipped} in all, logged as train/skipped_updates; this warning "
                "is not repeated). Many skips mean that training diverges: lower the learning rates, or the momentum."
            )

    def record(self, step: int | Tensor, d_loss: Tensor | None, g_loss: Tensor | None) -> None:
        """Deferred ``"stop"``: keep the first non-finite (step, network) on the device, updated in place, with no
        host sync (so it also runs inside a CUDA graph, with ``step`` a device tensor)."""
        bad = ~torch.isfinite(torch.stack([loss.detach() for loss in (d_loss, g_loss) if loss is not None]))
        index = 0 if g_loss is None else 1 if d_loss is None else bad[0].long() + 2 * bad[1].long() - 1
        found = torch.where(bad.any(), step * 4 + index, _NONE_YET)
        torch.minimum(self.first_bad(bad.device), found, out=self._first)

    def first_bad(self, device: torch.device) -> Tensor:
        """The deferred record (``step * 4 + network index``, or a sentinel), created on first use."""
        if self._first is None:
            self._first = torch.full((), _NONE_YET, dtype=torch.long, device=device)
        return self._first

    def check_deferred(self, step: int, epoch: int) -> None:
        """Raise :class:`NonFiniteError` if the deferred check saw a non-finite loss (one host sync); ``step`` and
        ``epoch``: where training is now."""
        if self._first is None:
            return
        first = int(all_reduce(self._first.clone(), "min").item())
        if first >= _NONE_YET:
            return
        bad_step, index = divmod(first, 4)
        raise NonFiniteError(
            f"Non-finite {_loss(_NETWORKS[index])} at global step {bad_step} (epoch {epoch}): training stopped "
            f"at step {step} (on an accelerator the check runs every `log_every_n_steps` steps and before "
            f"every checkpoint, to spare a host sync per step); no checkpoint was written since. "
            f"{_advice(_NETWORKS[index])}"
        )

    def check_before_saving(self, step: int, epoch: int) -> None:
        """Raise :class:`NonFiniteError` rather than let a checkpoint of non-finite weights be written."""
        self.check_deferred(step, epoch)
        broken = nonfinite_networks(self.networks)
        if broken:
            raise NonFiniteError(
                f"Not writing a checkpoint at global step {step}: the {' and '.join(broken)} parameters are "
                f"non-finite (NaN or infinite). {_advice(' and '.join(broken))}"
            )


def check_samples(samples: Tensor, step: int, what: str = "the Parzen evaluation") -> None:
    """Raise :class:`NonFiniteError`, with advice about the generator, when its ``samples`` are NaN or infinite
    (rather than an evaluation's advice to clean its input)."""
    if bool(torch.isfinite(samples.sum())) or bool(torch.isfinite(samples).all()):  # one fast pass when all is well
        return
    raise diverged_generator(int((~torch.isfinite(samples)).sum()), step, what)


def diverged_generator(bad: int, step: int, what: str) -> NonFiniteError:
    """The error for ``bad`` NaN/Inf values in the generator's samples for ``what``, with advice about the generator."""
    return NonFiniteError(
        f"The generator's samples for {what} hold {bad} NaN/Inf values (global step {step}): the generator has "
        "diverged (its weights or outputs are non-finite); no change to the evaluation can fix that. Lower the "
        "generator's learning rate or momentum (model.init_args.generator_optimizer), or train with "
        f"nonfinite=skip, resuming from a checkpoint written before it diverged. {_advice('generator')}"
    )


def check_architecture(own: Mapping[str, Any], saved: Mapping[str, Any], source: str | None = None) -> None:
    """Raise a ``ValueError`` naming the mismatched weights and the fix when the state dict ``saved`` (read from the
    file ``source``) was written by other networks than the state dict ``own``."""
    problems = [f"{key} is missing from the checkpoint" for key in own if key not in saved]
    problems += [f"{key} is in the checkpoint but not in this model" for key in saved if key not in own]
    problems += [
        f"{key} has shape {tuple(saved[key].shape)} in the checkpoint but {tuple(value.shape)} in this model"
        for key, value in own.items()
        if key in saved and tuple(getattr(saved[key], "shape", ())) != tuple(value.shape)
    ]
    if not problems:
        return
    more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
    raise ValueError(
        f"The checkpoint{f' {source}' if source else ''} was written by networks of another architecture: "
        f"{'; '.join(problems[:5])}{more}. Build the networks exactly as the run that wrote it (the CLI saves that "
        "run's config.yaml beside its checkpoints/ folder: `lightning-gan fit --config <run>/config.yaml "
        "--ckpt_path ...`), or leave out --ckpt_path to start afresh."
    )
