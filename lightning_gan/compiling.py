"""Compiled networks for a GAN's fit: ``torch.compile`` of the generator and the discriminator, not of the module.

Each network is compiled in place (:meth:`torch.nn.Module.compile`), so its parameters, state dict and checkpoint
keys stay the same. Only the forward passes are compiled: the backward passes, the optimizer steps and the
package's bookkeeping run as before, eagerly or inside the fast path's CUDA graph (``cuda_graph: true``), whose
warm-up calls compile each network before capture. See docs/gpu.md.
"""

from __future__ import annotations

import os
import shutil

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

NETWORKS = ("generator", "discriminator")
CXX_COMPILERS = ("g++", "c++", "clang++")
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
OWN_CUDA_GRAPHS = ("reduce-overhead", "max-autotune")  # modes that capture CUDA graphs of their own


class CompileNetworks(Callback):
    """Compiles the GAN's generator and discriminator for ``fit`` with :func:`torch.compile`.

    Compiled forward passes fuse elementwise kernels (maxout, dropout, sigmoid, the losses) and, with
    ``max-autotune``, tune the matrix products for the batch size. The update is the same in distribution as the
    eager one: dropout masks come from the compiled kernels' own random stream, so a run is not bit for bit the eager
    run, and floating-point sums may be reordered.

    Args:
        mode: :func:`torch.compile`'s ``mode``; the default tunes kernels without CUDA graphs of its own, which
            would clash with the fast path's.
        dynamic: :func:`torch.compile`'s ``dynamic``; ``None``: specialized to the first batch shape, compiled
            again for shapes that vary (evaluation batches) with dynamic sizes.

    Raises:
        ValueError: for a ``mode`` torch does not have; at ``fit``, for a mode with CUDA graphs of its own on a GAN
            with ``cuda_graph: true``.
        TypeError: at ``fit``, for a module without ``generator`` and ``discriminator`` networks.
        RuntimeError: at ``fit`` on a CPU, where the compiler would need a C++ compiler and none is installed.
    """

    def __init__(self, mode: str | None = "max-autotune-no-cudagraphs", dynamic: bool | None = None) -> None:
        if mode is not None and mode not in MODES:
            raise ValueError(f"CompileNetworks: `mode` must be one of {', '.join(MODES)} or None, but got {mode!r}.")
        self.mode, self.dynamic = mode, dynamic

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        networks = [getattr(pl_module, name, None) for name in NETWORKS]
        if not all(isinstance(network, nn.Module) for network in networks):
            raise TypeError(
                f"CompileNetworks compiles a GAN's `generator` and `discriminator`, but {type(pl_module).__name__} "
                "lacks one of them: remove the callback, or compile your own networks in your module."
            )
        if getattr(pl_module, "cuda_graph", False) and self.mode in OWN_CUDA_GRAPHS:
            raise ValueError(
                f"CompileNetworks(mode={self.mode!r}) captures CUDA graphs of its own, which cannot run inside the "
                "fast path's graph (`cuda_graph: true`): use mode 'max-autotune-no-cudagraphs' or 'default'."
            )
        if trainer.strategy.root_device.type == "cpu" and not cxx_compiler_found():
            raise RuntimeError(
                "CompileNetworks on a CPU needs a C++ compiler for torch.compile's kernels, and none of "
                f"{', '.join(CXX_COMPILERS)} (nor $CXX) is on PATH: install one (e.g. `apt install g++`), or remove "
                "the callback."
            )
        for network in networks:
            network.compile(mode=self.mode, dynamic=self.dynamic)


def cxx_compiler_found() -> bool:
    """Whether a C++ compiler for torch.compile's CPU kernels is on PATH."""
    candidates = (os.environ.get("CXX"), *CXX_COMPILERS)
    return any(shutil.which(name) for name in candidates if name)
