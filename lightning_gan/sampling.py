"""What the callbacks and the module share to draw from a GAN outside training: seeded noise that leaves the
training random stream untouched (and samples from it), the generator to draw from, and a datamodule's images."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_gan.nets.layers import eval_forward


def seeded_noise(generator: nn.Module, n: int, seed: int, device: torch.device | str | None = None) -> Tensor:
    """``n`` noise vectors from ``generator.sample_noise`` on ``device`` (CPU by default), drawn from ``seed``: the
    same on every rank and run, and the global random state (CPU, and CUDA where drawn there) is left as it was."""
    device = torch.device(device or "cpu")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return generator.sample_noise(n, device).detach()


def seeded_samples(generator: nn.Module, n: int, seed: int, device: torch.device | str | None = None) -> Tensor:
    """``n`` samples of ``generator``, in eval mode, from :func:`seeded_noise` drawn from ``seed``."""
    return eval_forward(generator, seeded_noise(generator, n, seed, device))


def sampling_generator(module: nn.Module) -> nn.Module:
    """The generator to draw figures and evaluations from: ``module.sampling_generator`` (the GAN's weight average,
    when it keeps one), else ``module.generator``."""
    sampler = getattr(module, "sampling_generator", None)
    return sampler if sampler is not None else module.generator


def datamodule_images(datamodule: Any, split: str, needed_by: str | None) -> Tensor | None:
    """``datamodule.splits.<split>.images`` (N, C, H, W). Missing, they are ``None`` where ``needed_by`` is ``None``,
    else a ``ValueError`` saying what ``needed_by`` needs."""
    splits = getattr(datamodule, "splits", None)
    images = getattr(getattr(splits, split, None), "images", None)
    if not isinstance(images, Tensor):
        if needed_by is None:
            return None
        raise ValueError(
            f"{needed_by} needs the {split} images as `trainer.datamodule.splits.{split}.images` (N, C, H, W); "
            "train with lightning_gan.GANDataModule (or a datamodule that provides them)."
        )
    return images
