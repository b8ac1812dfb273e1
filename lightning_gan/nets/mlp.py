"""The networks of Goodfellow et al. (2014), "Generative Adversarial Nets".

Layer sizes, activations and initialisations follow the authors' pylearn2 configs (see ``configs/*.yaml``):

* :class:`MLPGenerator`: noise at the bottom layer only, then fully connected layers with a per-layer
  activation (ReLU/sigmoid mixtures), a sigmoid or linear output whose bias starts at the training set's
  per-pixel marginals.
* :class:`MaxoutDiscriminator`: maxout layers with (inverted) dropout on their inputs and a single logit.

The convolutional CIFAR-10 pair lives in :mod:`lightning_gan.nets.conv`. Every network that has weight constraints
exposes ``apply_constraints()``, which :class:`~lightning_gan.GAN` calls after each update of that network.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_gan.nets.layers import (
    Activation,
    NoiseDistribution,
    activation,
    check_generator_args,
    check_keep_probs,
    check_max_norms,
    clip_layer_norms_,
    draw_noise,
    init_uniform_,
    marginal_bias,
    maxout_stack,
    per_layer,
    sparse_init_,
)


class MLPGenerator(nn.Module):
    """Fully connected generator: noise ``z`` enters at the bottom layer only.

    Args:
        noise_dim: dimension of ``z``.
        noise: ``"uniform"`` draws U(-sqrt 3, sqrt 3) (unit variance, the authors' MNIST choice), ``"gaussian"``
            N(0, 1).
        hidden_sizes: width of each hidden layer.
        hidden_activations: one activation per hidden layer (``relu``, ``sigmoid``, ``tanh``, ``linear``).
        out_shape: shape of one generated image ``(C, H, W)``.
        output_activation: ``"sigmoid"`` for pixels in [0, 1], ``"linear"`` for unbounded (e.g. GCN) data.
        init_range: weights U(-r, r), one number or one per layer (hidden layers, then output).
        hidden_bias_init: initial bias of each hidden layer, one number or one per hidden layer.
        output_bias_from_data: start the output bias at the training set's per-pixel marginals (logit of the mean
            for a sigmoid output, the mean for a linear one); :class:`~lightning_gan.GAN` does it at fit start.
        max_col_norm: if set, every unit's incoming weight vector is clipped to this L2 norm after each update.
        output_sparse_init: if set, the output layer starts as pylearn2's ``sparse_init``: this many nonzero
            N(0, 1) weights per unit, at distinct random inputs, instead of U(-r, r) (the authors' TFD: 100).
    """

    def __init__(
        self,
        noise_dim: int = 100,
        noise: NoiseDistribution = "uniform",
        hidden_sizes: Sequence[int] = (1200, 1200),
        hidden_activations: Sequence[Activation] = ("relu", "relu"),
        out_shape: Sequence[int] = (1, 28, 28),
        output_activation: Literal["sigmoid", "linear"] = "sigmoid",
        init_range: float | Sequence[float] = 0.05,
        hidden_bias_init: float | Sequence[float] = 0.0,
        output_bias_from_data: bool = True,
        max_col_norm: float | None = None,
        output_sparse_init: int | None = None,
    ) -> None:
        super().__init__()
        check_generator_args(noise_dim, noise, output_activation)
        if len(hidden_activations) != len(hidden_sizes):
            raise ValueError(
                f"Expected one activation per hidden layer: got {len(hidden_sizes)} hidden sizes but "
                f"{len(hidden_activations)} activations."
            )
        check_max_norms(max_col_norm=max_col_norm)
        self.noise_dim = noise_dim
        self.noise = noise
        self.out_shape = tuple(int(s) for s in out_shape)
        self.output_activation = output_activation
        self.output_bias_from_data = output_bias_from_data
        self.max_col_norm = max_col_norm

        sizes = [noise_dim, *hidden_sizes, math.prod(self.out_shape)]
        ranges = per_layer(init_range, len(sizes) - 1, "init_range")
        biases = [*per_layer(hidden_bias_init, len(hidden_sizes), "hidden_bias_init"), 0.0]
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
            linear = nn.Linear(fan_in, fan_out)
            init_uniform_(linear, ranges[i], biases[i])
            if output_sparse_init is not None and i == len(hidden_sizes):
                sparse_init_(linear, output_sparse_init)
            layers.append(linear)
            layers.append(activation(hidden_activations[i] if i < len(hidden_sizes) else output_activation))
        self.net = nn.Sequential(*layers)

    @property
    def output_layer(self) -> nn.Linear:
        """The last affine layer, whose bias :meth:`init_output_bias` sets."""
        return self.net[-2]

    def sample_noise(self, n: int, device: torch.device | str | None = None) -> Tensor:
        """Draw ``n`` noise vectors ``(n, noise_dim)`` from the prior."""
        return draw_noise(self.noise, n, self.noise_dim, device)

    @torch.no_grad()
    def init_output_bias(self, pixel_mean: Tensor) -> None:
        """Set the output bias so that G's output starts at the per-pixel marginal ``pixel_mean`` ``(C, H, W)``."""
        if pixel_mean.numel() != self.output_layer.bias.numel():
            raise ValueError(
                f"Expected a pixel mean of {self.output_layer.bias.numel()} values for out_shape {self.out_shape}, "
                f"but got {tuple(pixel_mean.shape)}."
            )
        self.output_layer.bias.copy_(marginal_bias(pixel_mean.reshape(-1), self.output_activation))

    def apply_constraints(self) -> None:
        """Clip incoming weight norms to ``max_col_norm`` (no-op when it is None)."""
        clip_layer_norms_(self.net, {nn.Linear: self.max_col_norm})

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z).view(z.shape[0], *self.out_shape)  # (B, C, H, W)


class MaxoutDiscriminator(nn.Module):
    """Maxout discriminator with dropout: ``x -> [dropout -> maxout] * L -> dropout -> linear -> logit``.

    Dropout is inverted (kept units scaled by 1 / keep probability), one mask per example and unit, as the authors'
    pylearn2 setup: input keep probability .8 (scale 1.25), hidden keep .5 (scale 2).

    Args:
        in_shape: shape of one input image ``(C, H, W)``.
        units: maxout units of each layer.
        pieces: pieces per unit of each layer (one number for all layers, or one per layer).
        input_keep_prob: probability of keeping an input pixel.
        hidden_keep_prob: probability of keeping a unit at the input of every later layer.
        init_range: weights U(-r, r) for every layer (one number, or one per maxout layer plus the output).
        max_col_norm: if set, every unit's incoming weight vector is clipped to this L2 norm after each update.
    """

    def __init__(
        self,
        in_shape: Sequence[int] = (1, 28, 28),
        units: Sequence[int] = (240, 240),
        pieces: int | Sequence[int] = 5,
        input_keep_prob: float = 0.8,
        hidden_keep_prob: float = 0.5,
        init_range: float | Sequence[float] = 0.005,
        max_col_norm: float | None = None,
    ) -> None:
        super().__init__()
        check_keep_probs(input_keep_prob=input_keep_prob, hidden_keep_prob=hidden_keep_prob)
        if not units:
            raise ValueError("Expected at least one maxout layer in `units`.")
        check_max_norms(max_col_norm=max_col_norm)
        pieces_per_layer = [int(p) for p in per_layer(pieces, len(units), "pieces")]
        ranges = per_layer(init_range, len(units) + 1, "init_range")
        self.in_shape = tuple(int(s) for s in in_shape)
        self.max_col_norm = max_col_norm
        stack = maxout_stack(
            math.prod(self.in_shape), units, pieces_per_layer, ranges, input_keep_prob, hidden_keep_prob
        )
        self.net = nn.Sequential(nn.Flatten(), *stack)

    def apply_constraints(self) -> None:
        """Clip incoming weight norms to ``max_col_norm`` (no-op when it is None)."""
        clip_layer_norms_(self.modules(), {nn.Linear: self.max_col_norm})

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)  # (B,) logits
