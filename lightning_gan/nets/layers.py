"""The building blocks the networks share: maxout units, the dropout-maxout stack, pylearn2's initialisations and
max-norm constraint, and the checks of their arguments."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_gan.checks import check_positive_int

Activation = Literal["relu", "sigmoid", "tanh", "linear"]
NoiseDistribution = Literal["uniform", "gaussian"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "linear": nn.Identity,
}


def activation(name: str) -> nn.Module:
    """The activation module named ``name`` (``relu``, ``sigmoid``, ``tanh``, ``linear``)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; expected one of {sorted(_ACTIVATIONS)}.")
    return _ACTIVATIONS[name]()


def per_layer(value: float | Sequence[float], n_layers: int, name: str) -> list[float]:
    """Broadcast a scalar setting to every layer, or check a per-layer list has one entry per layer."""
    if isinstance(value, (int, float)):
        return [float(value)] * n_layers
    values = [float(v) for v in value]
    if len(values) != n_layers:
        raise ValueError(f"Expected `{name}` to be a number or a list of {n_layers} numbers, but got {list(value)}.")
    return values


def check_keep_probs(**keep_probs: float) -> None:
    """Refuse a dropout keep probability outside (0, 1]."""
    for name, p in keep_probs.items():
        if not 0 < p <= 1:
            raise ValueError(f"Expected `{name}` in (0, 1], but got {p}.")


def check_max_norms(**max_norms: float | None) -> None:
    """Refuse a max-norm constraint that is not positive (``None``: no constraint)."""
    for name, norm in max_norms.items():
        if norm is not None and norm <= 0:
            raise ValueError(f"Expected `{name}` > 0 or None, but got {norm}.")


def check_generator_args(noise_dim: int, noise: str, output_activation: str) -> None:
    """Refuse a generator's noise dimension, noise distribution or output activation that cannot work."""
    check_positive_int("noise_dim", noise_dim)
    if noise not in ("uniform", "gaussian"):
        raise ValueError(f"Expected `noise` to be 'uniform' or 'gaussian', but got {noise!r}.")
    if output_activation not in ("sigmoid", "linear"):
        raise ValueError(f"Expected `output_activation` to be 'sigmoid' or 'linear', but got {output_activation!r}.")


def init_uniform_(layer: nn.Linear | nn.Conv2d | nn.ConvTranspose2d, init_range: float, bias: float = 0.0) -> None:
    """pylearn2's ``irange`` initialisation: weights U(-init_range, init_range), constant bias."""
    if init_range < 0:
        raise ValueError(f"Expected an init range >= 0, but got {init_range}.")
    nn.init.uniform_(layer.weight, -init_range, init_range)
    nn.init.constant_(layer.bias, bias)


@torch.no_grad()
def sparse_init_(linear: nn.Linear, num_nonzero: int) -> None:
    """pylearn2's ``sparse_init``: each unit gets ``num_nonzero`` distinct random inputs with N(0, 1) weights."""
    if not 1 <= num_nonzero <= linear.in_features:
        raise ValueError(
            f"Expected `output_sparse_init` in [1, {linear.in_features}] (the fan-in), but got {num_nonzero}."
        )
    inputs = torch.rand(linear.out_features, linear.in_features).topk(num_nonzero, dim=1).indices  # (out, k)
    linear.weight.zero_().scatter_(1, inputs, torch.randn(inputs.shape))


@torch.no_grad()
def clip_norms_(weight: Tensor, max_norm: float | None) -> None:
    """pylearn2's max-norm constraint: clip each slice ``weight[i]`` to L2 norm ``max_norm`` (``None``: no-op). A
    linear layer's slice is one unit's incoming weights (pylearn2's "column" of W), a convolution's one kernel, a
    transposed convolution's the kernel of one input map."""
    if max_norm is not None:
        weight.copy_(torch.renorm(weight, p=2, dim=0, maxnorm=max_norm))


def clip_layer_norms_(modules: Iterable[nn.Module], max_norms: Mapping[type[nn.Module], float | None]) -> None:
    """:func:`clip_norms_` on the weight of each of ``modules`` that is of a type in ``max_norms``, to its limit."""
    for module in modules:
        for kind, max_norm in max_norms.items():
            if isinstance(module, kind):
                clip_norms_(module.weight, max_norm)
                break


def draw_noise(noise: str, n: int, noise_dim: int, device: torch.device | str | None = None) -> Tensor:
    """``n`` noise vectors ``(n, noise_dim)``: ``"uniform"`` U(-sqrt 3, sqrt 3) (unit variance), else N(0, 1)."""
    if noise == "uniform":
        return (torch.rand(n, noise_dim, device=device) * 2 - 1) * math.sqrt(3)
    return torch.randn(n, noise_dim, device=device)


def marginal_bias(pixel_mean: Tensor, output_activation: str) -> Tensor:
    """The output bias that makes G's output equal ``pixel_mean``: its clipped logit for a sigmoid output."""
    mean = pixel_mean.double()  # float64, as numpy in pylearn2: 1 - 1e-7 is not a float32
    return torch.logit(mean.clamp(1e-7, 1 - 1e-7)) if output_activation == "sigmoid" else mean


@torch.no_grad()
def eval_forward(net: nn.Module, x: Tensor, device: torch.device | str | None = None) -> Tensor:
    """``net(x)`` in eval mode (no dropout) and without autograd, with ``x`` moved to ``device`` and cast to the
    net's dtype (noise is drawn in the default dtype, a 64-bit net wants its own); the net's mode is restored."""
    was_training = net.training
    net.eval()
    try:
        dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), x.dtype)
        return net(x.to(device=device, dtype=dtype))
    finally:
        net.train(was_training)


class Maxout(nn.Module):
    """Maxout layer (Goodfellow et al., 2013): an affine map to ``units * pieces`` values, then a max per unit.

    .. math:: h_i(x) = \\max_{j < \\text{pieces}} \\; x^\\top W_{:, i \\cdot \\text{pieces} + j} + b_{i \\cdot
       \\text{pieces} + j}

    Each unit's pieces are contiguous, as in pylearn2.
    """

    def __init__(self, in_features: int, units: int, pieces: int) -> None:
        super().__init__()
        check_positive_int("units", units)
        check_positive_int("pieces", pieces)
        self.units, self.pieces = units, pieces
        self.linear = nn.Linear(in_features, units * pieces)

    def forward(self, x: Tensor) -> Tensor:
        z = self.linear(x)  # (B, units * pieces)
        # max, not amax: the same values, and a backward pass that scatters to the argmax (amax's splits ties, in
        # several more kernels); the gradients differ only at exact ties
        return z.view(*z.shape[:-1], self.units, self.pieces).max(dim=-1).values  # (B, units)


class MaxoutConv2d(nn.Module):
    """Maxout convolution (pylearn2's ``MaxoutConvC01B``): a convolution to ``channels * pieces`` maps, the max over
    each channel's contiguous pieces, then max pooling that keeps partial windows at the border (cuda-convnet's).
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        pieces: int,
        kernel_size: int,
        padding: int,
        pool_size: int,
        pool_stride: int,
    ) -> None:
        super().__init__()
        self.channels, self.pieces = channels, pieces
        self.conv = nn.Conv2d(in_channels, channels * pieces, kernel_size, padding=padding)
        self.pool = nn.MaxPool2d(pool_size, pool_stride, ceil_mode=True)

    def forward(self, x: Tensor) -> Tensor:
        z = self.conv(x)  # (B, channels * pieces, H', W')
        # max, not amax, as in Maxout
        z = z.view(z.shape[0], self.channels, self.pieces, *z.shape[2:]).max(dim=2).values  # (B, channels, H', W')
        return self.pool(z)  # (B, channels, ceil((H' - pool) / stride) + 1, ...)


def maxout_stack(
    fan_in: int,
    units: Sequence[int],
    pieces: Sequence[int],
    init_ranges: Sequence[float],
    first_keep_prob: float,
    keep_prob: float,
) -> list[nn.Module]:
    """``[dropout -> maxout] * len(units) -> dropout -> linear`` to one logit: the top of both discriminators.
    Dropout keeps ``first_keep_prob`` of the stack's input and ``keep_prob`` of every later layer's;
    ``init_ranges``: one per maxout layer, then the output's."""
    layers: list[nn.Module] = []
    for i, (n_units, n_pieces) in enumerate(zip(units, pieces, strict=True)):
        layers.append(nn.Dropout(1 - (first_keep_prob if i == 0 else keep_prob)))
        maxout = Maxout(fan_in, n_units, n_pieces)
        init_uniform_(maxout.linear, init_ranges[i])
        layers.append(maxout)
        fan_in = n_units
    layers.append(nn.Dropout(1 - (first_keep_prob if not units else keep_prob)))
    output = nn.Linear(fan_in, 1)
    init_uniform_(output, init_ranges[-1])
    layers.append(output)
    return layers
