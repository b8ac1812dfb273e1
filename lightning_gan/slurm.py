"""SLURM: the requeue signal stops a run cleanly, as SIGTERM does, instead of Lightning's auto-requeue.

Lightning's auto-requeue (``SLURMEnvironment(auto_requeue=True)``, its default under SLURM) saves
``hpc_ckpt_<n>.ckpt`` *inside* the SIGUSR1 handler, wherever the signal lands: possibly between the discriminator's
and the generator's update of one step, so that the resumed run repeats half a step (not the run it would have
been); and under DDP the checkpoint's collectives (every rank's random state is gathered) run inside a signal
handler, where another rank may wait in one of training's. ``lightning-gan`` therefore picks
``SLURMEnvironment(auto_requeue=False)`` under SLURM, and :class:`~lightning_gan.checkpointing.InterruptCheckpoint`
handles SIGUSR1 as it handles SIGTERM: the ranks agree on a step, stop there and save ``interrupted.ckpt``, which
resumes bit for bit (``--ckpt_path``; see docs/distributed.md for a job script that requeues itself).
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from typing import Any

from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment

__all__ = ["REQUEUE_SIGNAL", "with_slurm_environment"]

REQUEUE_SIGNAL = signal.SIGUSR1 if hasattr(signal, "SIGUSR1") else None  # what `sbatch --signal=SIGUSR1@90` sends


def with_slurm_environment(plugins: Sequence[Any]) -> list[Any]:
    """``plugins`` with ``SLURMEnvironment(auto_requeue=False)`` added, unless they name a cluster environment (for a
    process that runs under SLURM, ``srun``)."""
    plugins = list(plugins)
    if not any(isinstance(plugin, ClusterEnvironment) for plugin in plugins):
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins
