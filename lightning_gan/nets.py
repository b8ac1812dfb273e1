"""The networks of Goodfellow et al. (2014), "Generative Adversarial Nets".

Layer sizes, activations and initialisations follow the authors' pylearn2 configs (see ``configs/*.yaml``):

* :class:`MLPGenerator`: noise at the bottom layer only, then fully connected layers with a per-layer
  activation (ReLU/sigmoid mixtures), a sigmoid or linear output whose bias starts at the training set's
  per-pixel marginals.
* :class:`MaxoutDiscriminator`: maxout layers with (inverted) dropout on their inputs and a single logit.

The convolutional CIFAR-10 pair lives in :mod:`lightning_gan.conv_nets`. Every network that has weight constraints
exposes ``apply_constraints()``, which :class:`~lightning_gan.GAN` calls after each update of that network.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

Activation = Literal["relu", "sigmoid", "tanh", "linear"]
NoiseDistribution = Literal["uniform", "gaussian"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "linear": nn.Identity,
}


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; expected one of {sorted(_ACTIVATIONS)}.")
    return _ACTIVATIONS[name]()


def _per_layer(value: float | Sequence[float], n_layers: int, name: str) -> list[float]:
    """Broadcast a scalar setting to every layer, or check a per-layer list has one entry per layer."""
    if isinstance(value, (int, float)):
        return [float(value)] * n_layers
    values = [float(v) for v in value]
    if len(values) != n_layers:
        raise ValueError(f"Expected `{name}` to be a number or a list of {n_layers} numbers, but got {list(value)}.")
    return values


def _init_uniform_(linear: nn.Linear | nn.Conv2d | nn.ConvTranspose2d, init_range: float, bias: float = 0.0) -> None:
    """pylearn2's ``irange`` initialisation: weights U(-init_range, init_range), constant bias."""
    if init_range < 0:
        raise ValueError(f"Expected an init range >= 0, but got {init_range}.")
    nn.init.uniform_(linear.weight, -init_range, init_range)
    nn.init.constant_(linear.bias, bias)


@torch.no_grad()
def _sparse_init_(linear: nn.Linear, num_nonzero: int) -> None:
    """pylearn2's ``sparse_init``: each unit gets ``num_nonzero`` distinct random inputs with N(0, 1) weights."""
    if not 1 <= num_nonzero <= linear.in_features:
        raise ValueError(
            f"Expected `output_sparse_init` in [1, {linear.in_features}] (the fan-in), but got {num_nonzero}."
        )
    inputs = torch.rand(linear.out_features, linear.in_features).topk(num_nonzero, dim=1).indices  # (out, k)
    linear.weight.zero_().scatter_(1, inputs, torch.randn(inputs.shape))


@torch.no_grad()
def _clip_row_norms_(linear: nn.Linear, max_norm: float) -> None:
    # A torch weight row holds one unit's incoming weights: pylearn2's "column" of W (in, out).
    linear.weight.copy_(torch.renorm(linear.weight, p=2, dim=0, maxnorm=max_norm))


def _check_generator_args(noise_dim: int, noise: str, output_activation: str) -> None:
    if noise_dim < 1:
        raise ValueError(f"Expected `noise_dim` >= 1, but got {noise_dim}.")
    if noise not in ("uniform", "gaussian"):
        raise ValueError(f"Expected `noise` to be 'uniform' or 'gaussian', but got {noise!r}.")
    if output_activation not in ("sigmoid", "linear"):
        raise ValueError(f"Expected `output_activation` to be 'sigmoid' or 'linear', but got {output_activation!r}.")


def _marginal_bias(pixel_mean: Tensor, output_activation: str) -> Tensor:
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
        if units < 1 or pieces < 1:
            raise ValueError(f"Expected `units` and `pieces` >= 1, but got units={units}, pieces={pieces}.")
        self.units, self.pieces = units, pieces
        self.linear = nn.Linear(in_features, units * pieces)

    def forward(self, x: Tensor) -> Tensor:
        z = self.linear(x)  # (B, units * pieces)
        # max, not amax: the same values, and a backward pass that scatters to the argmax (amax's splits ties, in
        # several more kernels); the gradients differ only at exact ties
        return z.view(*z.shape[:-1], self.units, self.pieces).max(dim=-1).values  # (B, units)


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
        _check_generator_args(noise_dim, noise, output_activation)
        if len(hidden_activations) != len(hidden_sizes):
            raise ValueError(
                f"Expected one activation per hidden layer: got {len(hidden_sizes)} hidden sizes but "
                f"{len(hidden_activations)} activations."
            )
        if max_col_norm is not None and max_col_norm <= 0:
            raise ValueError(f"Expected `max_col_norm` > 0 or None, but got {max_col_norm}.")
        self.noise_dim = noise_dim
        self.noise = noise
        self.out_shape = tuple(int(s) for s in out_shape)
        self.output_activation = output_activation
        self.output_bias_from_data = output_bias_from_data
        self.max_col_norm = max_col_norm

        sizes = [noise_dim, *hidden_sizes, math.prod(self.out_shape)]
        ranges = _per_layer(init_range, len(sizes) - 1, "init_range")
        biases = [*_per_layer(hidden_bias_init, len(hidden_sizes), "hidden_bias_init"), 0.0]
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
            linear = nn.Linear(fan_in, fan_out)
            _init_uniform_(linear, ranges[i], biases[i])
            if output_sparse_init is not None and i == len(hidden_sizes):
                _sparse_init_(linear, output_sparse_init)
            layers.append(linear)
            layers.append(
                _activation(hidden_activations[i]) if i < len(hidden_sizes) else _activation(output_activation)
            )
        self.net = nn.Sequential(*layers)

    @property
    def output_layer(self) -> nn.Linear:
        """The last affine layer, whose bias :meth:`init_output_bias` sets."""
        return self.net[-2]

    def sample_noise(self, n: int, device: torch.device | str | None = None) -> Tensor:
        """Draw ``n`` noise vectors ``(n, noise_dim)`` from the prior."""
        if self.noise == "uniform":
            return (torch.rand(n, self.noise_dim, device=device) * 2 - 1) * math.sqrt(3)
        return torch.randn(n, self.noise_dim, device=device)

    @torch.no_grad()
    def init_output_bias(self, pixel_mean: Tensor) -> None:
        """Set the output bias so that G's output starts at the per-pixel marginal ``pixel_mean`` ``(C, H, W)``."""
        if pixel_mean.numel() != self.output_layer.bias.numel():
            raise ValueError(
                f"Expected a pixel mean of {self.output_layer.bias.numel()} values for out_shape {self.out_shape}, "
                f"but got {tuple(pixel_mean.shape)}."
            )
        self.output_layer.bias.copy_(_marginal_bias(pixel_mean.reshape(-1), self.output_activation))

    def apply_constraints(self) -> None:
        """Clip incoming weight norms to ``max_col_norm`` (no-op when it is None)."""
        if self.max_col_norm is not None:
            for module in self.net:
                if isinstance(module, nn.Linear):
                    _clip_row_norms_(module, self.max_col_norm)

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
        for name, p in (("input_keep_prob", input_keep_prob), ("hidden_keep_prob", hidden_keep_prob)):
            if not 0 < p <= 1:
                raise ValueError(f"Expected `{name}` in (0, 1], but got {p}.")
        if not units:
            raise ValueError("Expected at least one maxout layer in `units`.")
        if max_col_norm is not None and max_col_norm <= 0:
            raise ValueError(f"Expected `max_col_norm` > 0 or None, but got {max_col_norm}.")
        pieces_per_layer = [int(p) for p in _per_layer(pieces, len(units), "pieces")]
        ranges = _per_layer(init_range, len(units) + 1, "init_range")
        self.in_shape = tuple(int(s) for s in in_shape)
        self.max_col_norm = max_col_norm

        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = math.prod(self.in_shape)
        for i, (n_units, n_pieces) in enumerate(zip(units, pieces_per_layer, strict=True)):
            layers.append(nn.Dropout(1 - (input_keep_prob if i == 0 else hidden_keep_prob)))
            maxout = Maxout(fan_in, n_units, n_pieces)
            _init_uniform_(maxout.linear, ranges[i])
            layers.append(maxout)
            fan_in = n_units
        layers.append(nn.Dropout(1 - hidden_keep_prob))
        output = nn.Linear(fan_in, 1)
        _init_uniform_(output, ranges[-1])
        layers.append(output)
        self.net = nn.Sequential(*layers)

    def apply_constraints(self) -> None:
        """Clip incoming weight norms to ``max_col_norm`` (no-op when it is None)."""
        if self.max_col_norm is not None:
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    _clip_row_norms_(module, self.max_col_norm)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)  # (B,) logits


_CONV_NETS = ("ConvMaxoutDiscriminator", "DeconvGenerator", "MaxoutConv2d")


def __getattr__(name: str) -> type[nn.Module]:
    # The conv pair lives in conv_nets (which imports this module), and is reachable here as the design places it:
    # ``lightning_gan.nets.ConvMaxoutDiscriminator`` works in code and as a YAML ``class_path``.
    if name in _CONV_NETS:
        from lightning_gan import conv_nets

        return getattr(conv_nets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
