"""The convolutional networks of Goodfellow et al. (2014), the authors' CIFAR-10 pair (their
``cifar10_convolutional.yaml``; here ``configs/cifar10_conv.yaml``).

* :class:`DeconvGenerator`: fully connected layers, reshaped into feature maps, then one transposed convolution.
* :class:`ConvMaxoutDiscriminator`: maxout convolutions with max pooling, a maxout layer and a single logit, with
  (inverted) dropout on every layer's input.

Both expose ``apply_constraints()`` (max kernel and column norms), which :class:`~lightning_gan.GAN` calls after each
update of that network.
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
    MaxoutConv2d,
    NoiseDistribution,
    activation,
    check_generator_args,
    check_keep_probs,
    check_max_norms,
    clip_layer_norms_,
    clip_norms_,
    draw_noise,
    init_uniform_,
    marginal_bias,
    maxout_stack,
    per_layer,
)


class ConvMaxoutDiscriminator(nn.Module):
    """The authors' convolutional discriminator: ``[dropout -> maxout conv -> pool] * L -> [dropout -> maxout] * M ->
    dropout -> linear -> logit``.

    The defaults are the authors' CIFAR-10 net (``cifar10_convolutional.yaml``): 32x32x3 -> 32 maps (2 pieces, 8x8
    kernels, pad 4, pool 4 stride 2) 16x16 -> 32 maps (2 pieces, 8x8, pad 3, pool 4/2) 7x7 -> 192 maps (2 pieces, 5x5,
    pad 3, pool 2/2) 5x5 -> maxout 500 units x 5 pieces -> logit; dropout keep .8 on the input, .5 elsewhere.

    Args:
        in_shape: shape of one input image ``(C, H, W)``.
        channels, pieces, kernel_sizes, paddings, pool_sizes, pool_strides: one entry per convolutional layer
            (``pieces`` may be one number for all).
        units: maxout units of each fully connected layer after the convolutions.
        unit_pieces: pieces per unit of those layers (one number, or one per layer).
        input_keep_prob: probability of keeping an input pixel.
        hidden_keep_prob: probability of keeping a value at the input of every later layer.
        init_range: weights U(-r, r): one number, or one per layer (convolutions, maxout layers, output).
        max_kernel_norm: if set, every convolution kernel (one per map and piece) is clipped to this L2 norm after
            each update.
        max_col_norm: the same for the incoming weights of every fully connected unit.
    """

    def __init__(
        self,
        in_shape: Sequence[int] = (3, 32, 32),
        channels: Sequence[int] = (32, 32, 192),
        pieces: int | Sequence[int] = 2,
        kernel_sizes: Sequence[int] = (8, 8, 5),
        paddings: Sequence[int] = (4, 3, 3),
        pool_sizes: Sequence[int] = (4, 4, 2),
        pool_strides: Sequence[int] = (2, 2, 2),
        units: Sequence[int] = (500,),
        unit_pieces: int | Sequence[int] = 5,
        input_keep_prob: float = 0.8,
        hidden_keep_prob: float = 0.5,
        init_range: float | Sequence[float] = 0.005,
        max_kernel_norm: float | None = None,
        max_col_norm: float | None = None,
    ) -> None:
        super().__init__()
        n_conv = len(channels)
        per_conv = {"kernel_sizes": kernel_sizes, "paddings": paddings, "pool_sizes": pool_sizes}
        for name, values in {**per_conv, "pool_strides": pool_strides}.items():
            if len(values) != n_conv:
                raise ValueError(
                    f"Expected `{name}` to have one entry per layer of `channels` ({n_conv}), got {values}."
                )
        check_keep_probs(input_keep_prob=input_keep_prob, hidden_keep_prob=hidden_keep_prob)
        check_max_norms(max_kernel_norm=max_kernel_norm, max_col_norm=max_col_norm)
        conv_pieces = [int(p) for p in per_layer(pieces, n_conv, "pieces")]
        fc_pieces = [int(p) for p in per_layer(unit_pieces, len(units), "unit_pieces")]
        ranges = per_layer(init_range, n_conv + len(units) + 1, "init_range")
        self.in_shape = tuple(int(s) for s in in_shape)
        self.max_kernel_norm, self.max_col_norm = max_kernel_norm, max_col_norm

        layers: list[nn.Module] = []
        in_channels = self.in_shape[0]
        for i in range(n_conv):
            layers.append(nn.Dropout(1 - (input_keep_prob if i == 0 else hidden_keep_prob)))
            conv = MaxoutConv2d(
                in_channels, channels[i], conv_pieces[i], kernel_sizes[i], paddings[i], pool_sizes[i], pool_strides[i]
            )
            init_uniform_(conv.conv, ranges[i])
            layers.append(conv)
            in_channels = channels[i]
        layers.append(nn.Flatten())
        with torch.no_grad():
            fan_in = nn.Sequential(*layers)(torch.zeros(1, *self.in_shape)).shape[1]  # e.g. 192 * 5 * 5
        first_keep_prob = input_keep_prob if n_conv == 0 else hidden_keep_prob
        layers += maxout_stack(fan_in, units, fc_pieces, ranges[n_conv:], first_keep_prob, hidden_keep_prob)
        self.net = nn.Sequential(*layers)

    @torch.no_grad()
    def apply_constraints(self) -> None:
        """Clip kernel norms to ``max_kernel_norm`` and incoming weight norms to ``max_col_norm`` (None: no-op)."""
        clip_layer_norms_(self.modules(), {nn.Conv2d: self.max_kernel_norm, nn.Linear: self.max_col_norm})

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)  # (B,) logits


class DeconvGenerator(nn.Module):
    """The authors' convolutional generator: ``z -> [linear -> activation] * L -> reshape (C', H', W') ->
    transposed convolution ("deconv") -> + bias -> output activation``.

    The defaults are the authors' CIFAR-10 net (``cifar10_convolutional.yaml``): N(0, 1) noise 100 -> ReLU 8000 ->
    sigmoid 8000 -> 80x10x10 -> 5x5 transposed convolution, stride 3 -> linear 3x32x32, one bias per output value.
    The output side is ``(H' - 1) * stride - 2 * padding + kernel_size``, as pylearn2's ``Deconv``:
    (10 - 1) * 3 + 5 = 32, with no crop.

    Args:
        noise_dim: dimension of ``z``.
        noise: ``"gaussian"`` N(0, 1) (the authors' CIFAR-10 choice) or ``"uniform"`` U(-sqrt 3, sqrt 3).
        hidden_sizes: width of each fully connected layer; the last is reshaped, so it must equal prod(base_shape).
        hidden_activations: one activation per fully connected layer.
        base_shape: the feature maps ``(C', H', W')`` the last fully connected layer is reshaped to.
        out_channels: channels of the image.
        kernel_size, stride, padding: of the transposed convolution.
        output_activation: ``"linear"`` (GCN data, the authors) or ``"sigmoid"`` (pixels in [0, 1]).
        init_range: weights U(-r, r): one number, or one per layer (fully connected layers, then the deconvolution).
        hidden_bias_init: initial bias of each fully connected layer, one number or one per layer.
        tied_bias: one output bias per channel; ``False`` (the authors' ``tied_b: 0``): one per output value.
        output_bias_from_data: start the output bias at the training set's per-pixel marginals (logit of the mean
            for a sigmoid output; a channel's mean over pixels when ``tied_bias``).
        max_col_norm: if set, every fully connected unit's incoming weights are clipped to this L2 norm after each
            update.
        max_kernel_norm: if set, the deconvolution's kernel from each input map is clipped to this L2 norm after
            each update (pylearn2 ``Deconv``'s ``max_kernel_norm``).
    """

    def __init__(
        self,
        noise_dim: int = 100,
        noise: NoiseDistribution = "gaussian",
        hidden_sizes: Sequence[int] = (8000, 8000),
        hidden_activations: Sequence[Activation] = ("relu", "sigmoid"),
        base_shape: Sequence[int] = (80, 10, 10),
        out_channels: int = 3,
        kernel_size: int = 5,
        stride: int = 3,
        padding: int = 0,
        output_activation: Literal["sigmoid", "linear"] = "linear",
        init_range: float | Sequence[float] = 0.05,
        hidden_bias_init: float | Sequence[float] = 0.0,
        tied_bias: bool = False,
        output_bias_from_data: bool = False,
        max_col_norm: float | None = None,
        max_kernel_norm: float | None = None,
    ) -> None:
        super().__init__()
        check_generator_args(noise_dim, noise, output_activation)
        if not hidden_sizes or len(hidden_activations) != len(hidden_sizes):
            raise ValueError(
                f"Expected at least one hidden layer and one activation per hidden layer: got {len(hidden_sizes)} "
                f"hidden sizes and {len(hidden_activations)} activations."
            )
        self.base_shape = tuple(int(s) for s in base_shape)
        if len(self.base_shape) != 3 or hidden_sizes[-1] != math.prod(self.base_shape):
            raise ValueError(
                f"Expected `base_shape` (C, H, W) with C * H * W equal to the last hidden size {hidden_sizes[-1]}, but "
                f"got {list(base_shape)}; change one of them (the authors: 8000 = 80 * 10 * 10)."
            )
        check_max_norms(max_col_norm=max_col_norm, max_kernel_norm=max_kernel_norm)
        side = [(s - 1) * stride - 2 * padding + kernel_size for s in self.base_shape[1:]]
        if min(side) < 1:
            raise ValueError(f"The deconvolution's output would be {side}: check `kernel_size`, `stride`, `padding`.")
        self.noise_dim, self.noise = noise_dim, noise
        self.out_shape = (out_channels, *side)
        self.output_activation, self.output_bias_from_data = output_activation, output_bias_from_data
        self.max_col_norm, self.max_kernel_norm = max_col_norm, max_kernel_norm

        sizes = [noise_dim, *hidden_sizes]
        ranges = per_layer(init_range, len(hidden_sizes) + 1, "init_range")
        biases = per_layer(hidden_bias_init, len(hidden_sizes), "hidden_bias_init")
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
            linear = nn.Linear(fan_in, fan_out)
            init_uniform_(linear, ranges[i], biases[i])
            layers += [linear, activation(hidden_activations[i])]
        self.mlp = nn.Sequential(*layers)
        self.deconv = nn.ConvTranspose2d(self.base_shape[0], out_channels, kernel_size, stride, padding, bias=False)
        nn.init.uniform_(self.deconv.weight, -ranges[-1], ranges[-1])
        self.bias = nn.Parameter(torch.zeros(out_channels, 1, 1) if tied_bias else torch.zeros(self.out_shape))
        self.out = activation(output_activation)

    def sample_noise(self, n: int, device: torch.device | str | None = None) -> Tensor:
        """Draw ``n`` noise vectors ``(n, noise_dim)`` from the prior."""
        return draw_noise(self.noise, n, self.noise_dim, device)

    @torch.no_grad()
    def init_output_bias(self, pixel_mean: Tensor) -> None:
        """Set the output bias so that G's output starts at the per-pixel marginal ``pixel_mean`` ``(C, H, W)``."""
        if tuple(pixel_mean.shape) != self.out_shape:
            raise ValueError(f"Expected a pixel mean of shape {self.out_shape}, but got {tuple(pixel_mean.shape)}.")
        mean = pixel_mean.mean(dim=(1, 2), keepdim=True) if self.bias.shape[1] == 1 else pixel_mean
        self.bias.copy_(marginal_bias(mean, self.output_activation).to(self.bias))

    @torch.no_grad()
    def apply_constraints(self) -> None:
        """Clip fully connected column norms and deconvolution kernel norms (no-op where the limit is None)."""
        clip_layer_norms_(self.mlp, {nn.Linear: self.max_col_norm})
        # ConvTranspose2d weight: (in maps, out channels, k, k); pylearn2 clips the kernel of each input map.
        clip_norms_(self.deconv.weight, self.max_kernel_norm)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mlp(z).view(z.shape[0], *self.base_shape)  # (B, C', H', W')
        return self.out(self.deconv(h) + self.bias)  # (B, C, H, W)
