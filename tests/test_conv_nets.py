"""The convolutional CIFAR-10 pair (DeconvGenerator, ConvMaxoutDiscriminator), the fully connected TFD generator's
sparse init, and the three new configs' numbers against the authors' YAML files. Small widths throughout."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from lightning_gan import ConvMaxoutDiscriminator, DeconvGenerator, MaxoutConv2d, MLPGenerator

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL_D = {"channels": (2, 2, 4), "units": (8,)}


def small_generator(**kwargs: Any) -> DeconvGenerator:
    return DeconvGenerator(**{"hidden_sizes": (16, 200), "base_shape": (2, 10, 10), **kwargs})


# ---------------------------------------------------------------------------------------------------------- D
def test_maxout_conv_takes_the_max_over_each_maps_contiguous_pieces_then_pools() -> None:
    layer = MaxoutConv2d(1, channels=2, pieces=2, kernel_size=1, padding=0, pool_size=2, pool_stride=2)
    with torch.no_grad():
        layer.conv.weight.copy_(torch.tensor([1.0, -1.0, 2.0, 0.5]).view(4, 1, 1, 1))
        layer.conv.bias.zero_()
    x = torch.tensor([[1.0, -2.0, 3.0], [0.0, -1.0, 4.0], [5.0, 0.0, -6.0]]).view(1, 1, 3, 3)
    # by hand: map 0 = max(x, -x) = |x|, map 1 = max(2x, x/2); pools 2x2 stride 2 keep the partial border windows
    expected = torch.stack(
        [F.max_pool2d(x.abs(), 2, 2, ceil_mode=True), F.max_pool2d(torch.maximum(2 * x, x / 2), 2, 2, ceil_mode=True)],
        dim=1,
    )
    assert layer(x).shape == (1, 2, 2, 2)
    torch.testing.assert_close(layer(x), expected.view(1, 2, 2, 2))


def test_discriminator_follows_the_authors_spatial_sizes() -> None:
    d = ConvMaxoutDiscriminator(**SMALL_D)
    convs = [m for m in d.modules() if isinstance(m, MaxoutConv2d)]
    x, sizes = torch.zeros(1, 3, 32, 32), []
    for layer in convs:
        sizes.append(layer.conv(x).shape[-1])
        x = layer(x)
        sizes.append(x.shape[-1])
    # conv 32 + 8 - 8 + 1 = 33, pool ceil((33 - 4) / 2) + 1 = 16; 16 + 6 - 8 + 1 = 15 -> 7; 7 + 6 - 5 + 1 = 9 -> 5
    assert sizes == [33, 16, 15, 7, 9, 5]
    maxout = d.net[8]
    assert maxout.linear.in_features == 4 * 5 * 5 and (maxout.units, maxout.pieces) == (8, 5)
    assert d(torch.randn(3, 3, 32, 32)).shape == (3,)


def test_full_size_discriminator_is_the_authors() -> None:
    d = ConvMaxoutDiscriminator()
    convs = [m.conv for m in d.modules() if isinstance(m, MaxoutConv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.padding[0]) for c in convs] == [
        (3, 64, 8, 4),
        (32, 64, 8, 3),
        (32, 384, 5, 3),
    ]
    assert d.net[8].linear.in_features == 192 * 5 * 5 and d.net[8].linear.out_features == 500 * 5
    dropouts = [m for m in d.modules() if isinstance(m, nn.Dropout)]
    assert [round(1 - m.p, 6) for m in dropouts] == [0.8, 0.5, 0.5, 0.5, 0.5]
    weights = [p for name, p in d.named_parameters() if name.endswith("weight")]
    assert all(w.abs().max() <= 0.005 for w in weights)
    assert all(b.eq(0).all() for name, b in d.named_parameters() if name.endswith("bias"))


def test_discriminator_constraints_clip_kernels_and_columns() -> None:
    d = ConvMaxoutDiscriminator(**SMALL_D, max_kernel_norm=0.5, max_col_norm=0.25)
    with torch.no_grad():
        for p in d.parameters():
            p.fill_(1.0)
    d.apply_constraints()
    for module in d.modules():
        if isinstance(module, nn.Conv2d):
            norms = module.weight.flatten(1).norm(dim=1)  # one kernel per map and piece
            torch.testing.assert_close(norms, torch.full_like(norms, 0.5))
        elif isinstance(module, nn.Linear):
            norms = module.weight.norm(dim=1)
            torch.testing.assert_close(norms, torch.full_like(norms, 0.25))
    unconstrained = ConvMaxoutDiscriminator(**SMALL_D)
    before = [p.clone() for p in unconstrained.parameters()]
    unconstrained.apply_constraints()
    assert all(torch.equal(a, b) for a, b in zip(before, unconstrained.parameters(), strict=True))


# ---------------------------------------------------------------------------------------------------------- G
def test_generator_contract_and_output_side() -> None:
    g = small_generator()
    z = g.sample_noise(4, "cpu")
    assert z.shape == (4, g.noise_dim) == (4, 100)
    assert g(z).shape == (4, *g.out_shape) == (4, 3, 32, 32)  # (10 - 1) * 3 + 5
    assert g.noise == "gaussian" and abs(g.sample_noise(20000).std().item() - 1) < 0.02
    other = DeconvGenerator(
        hidden_sizes=(32,), hidden_activations=("relu",), base_shape=(2, 4, 4), kernel_size=3, stride=2, padding=1
    )
    assert other.out_shape == (3, 7, 7) and other(other.sample_noise(2)).shape == (2, 3, 7, 7)  # 3 * 2 - 2 + 3


def test_deconvolution_is_the_transpose_of_the_strided_convolution() -> None:
    # pylearn2's Deconv applies the transpose (lmul_T) of a 5x5, stride-3 convolution from the image to the maps:
    # <deconv(h), x> == <h, conv(x)> for the same kernel.
    g = small_generator()
    h, x = torch.randn(2, 2, 10, 10), torch.randn(2, 3, 32, 32)
    lhs = (g.deconv(h) * x).sum()
    rhs = (h * F.conv2d(x, g.deconv.weight, stride=3)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-4, atol=1e-4)


def test_generator_init_and_biases() -> None:
    g = small_generator()
    assert g.deconv.weight.abs().max() <= 0.05 and g.bias.shape == (3, 32, 32) and g.bias.eq(0).all()
    assert g.mlp[1].__class__ is nn.ReLU and g.mlp[3].__class__ is nn.Sigmoid and g.out.__class__ is nn.Identity
    mean = torch.rand(3, 32, 32)
    g.init_output_bias(mean)  # linear output: the mean itself
    torch.testing.assert_close(g.bias, mean)
    sigmoid = small_generator(output_activation="sigmoid", tied_bias=True)
    assert sigmoid.bias.shape == (3, 1, 1)
    sigmoid.init_output_bias(mean)  # tied: one bias per channel, the logit of the channel's mean
    torch.testing.assert_close(sigmoid.bias, torch.logit(mean.mean(dim=(1, 2), keepdim=True)))


def test_generator_constraints() -> None:
    g = small_generator(max_col_norm=0.5, max_kernel_norm=0.25)
    with torch.no_grad():
        for p in g.parameters():
            p.fill_(1.0)
    g.apply_constraints()
    norms = g.mlp[0].weight.norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, 0.5))
    kernel_norms = g.deconv.weight.flatten(1).norm(dim=1)  # one per input map, as pylearn2's Deconv
    torch.testing.assert_close(kernel_norms, torch.full_like(kernel_norms, 0.25))


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (DeconvGenerator, {"hidden_sizes": (16, 100)}, r"`base_shape` .* equal to the last hidden size 100"),
        (DeconvGenerator, {"hidden_sizes": (), "hidden_activations": ()}, r"at least one hidden layer"),
        (DeconvGenerator, {"hidden_sizes": (16, 8000), "noise": "cauchy"}, r"`noise` .* 'cauchy'"),
        (DeconvGenerator, {"hidden_sizes": (16, 8000), "max_kernel_norm": 0}, r"`max_kernel_norm` > 0"),
        (DeconvGenerator, {"hidden_sizes": (16, 8000), "init_range": [0.1]}, r"`init_range` .* list of 3"),
        (ConvMaxoutDiscriminator, {"paddings": (4, 3)}, r"`paddings` to have one entry per layer of `channels` \(3\)"),
        (ConvMaxoutDiscriminator, {"input_keep_prob": 0.0}, r"`input_keep_prob` in \(0, 1\]"),
        (ConvMaxoutDiscriminator, {"pieces": (2, 2)}, r"`pieces` .* list of 3"),
        (
            MLPGenerator,
            {"hidden_sizes": (8,), "hidden_activations": ("relu",), "output_sparse_init": 9},
            r"`output_sparse_init` in \[1, 8\]",
        ),
    ],
)
def test_bad_arguments(cls: type[nn.Module], kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


# ---------------------------------------------------------------------------------------------------------- TFD G
def test_sparse_init_gives_each_output_unit_its_own_nonzero_inputs() -> None:
    torch.manual_seed(0)
    g = MLPGenerator(hidden_sizes=(300,), hidden_activations=("relu",), out_shape=(1, 6, 6), output_sparse_init=100)
    w = g.output_layer.weight  # (36, 300)
    assert w.ne(0).sum(dim=1).tolist() == [100] * 36
    assert abs(w[w != 0].std().item() - 1) < 0.05  # N(0, 1)
    assert w.ne(0).float().mean(dim=0).std() > 0  # different inputs for different units
    assert g.net[0].weight.abs().max() <= 0.05  # the hidden layers keep U(-.05, .05)


# ---------------------------------------------------------------------------------------------------------- configs
def setting(config: dict, path: str) -> Any:
    for key in path.split("."):
        config = config[key]
    return config


G, D = "model.init_args.generator.init_args", "model.init_args.discriminator.init_args"
LR = "model.init_args.{}_optimizer.init_args.lr"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "tfd.yaml",
            {
                f"{G}.noise": "gaussian",
                f"{G}.hidden_sizes": [8000, 8000],
                f"{G}.hidden_activations": ["relu", "sigmoid"],
                f"{G}.hidden_bias_init": [0.0, -2.0],
                f"{G}.output_sparse_init": 100,
                f"{G}.output_bias_from_data": True,
                f"{G}.out_shape": [1, 48, 48],
                f"{G}.max_col_norm": 1.9365,
                f"{D}.units": [1200, 1200],
                f"{D}.pieces": 5,
                f"{D}.max_col_norm": 1.9365,
                LR.format("generator"): 0.05,
                LR.format("discriminator"): 0.05,
                "data.init_args.dataset": "tfd",
                "data.init_args.tfd_train_set": "unlabeled",
                "trainer.max_epochs": 50,
            },
        ),
        (
            "cifar10.yaml",
            {
                f"{G}.noise": "gaussian",
                f"{G}.hidden_sizes": [8000, 8000],
                f"{G}.output_activation": "linear",
                f"{G}.init_range": [0.05, 0.05, 0.5],
                f"{D}.units": [1600, 1600],
                f"{D}.pieces": 5,
                LR.format("generator"): 0.025,
                LR.format("discriminator"): 0.025,
                "data.init_args.preprocessing": "gcn",
                "data.init_args.batch_size": 100,
            },
        ),
        (
            "cifar10_conv.yaml",
            {
                f"{G}.hidden_sizes": [8000, 8000],
                f"{G}.base_shape": [80, 10, 10],
                f"{G}.kernel_size": 5,
                f"{G}.stride": 3,
                f"{G}.output_activation": "linear",
                f"{D}.channels": [32, 32, 192],
                f"{D}.pieces": 2,
                f"{D}.kernel_sizes": [8, 8, 5],
                f"{D}.paddings": [4, 3, 3],
                f"{D}.pool_sizes": [4, 4, 2],
                f"{D}.pool_strides": [2, 2, 2],
                f"{D}.units": [500],
                f"{D}.unit_pieces": 5,
                LR.format("generator"): 0.004,
                LR.format("discriminator"): 0.004,
                "data.init_args.preprocessing": "gcn",
                "data.init_args.batch_size": 128,
            },
        ),
    ],
)
def test_configs_hold_the_authors_numbers(name: str, expected: dict[str, Any]) -> None:
    config = yaml.safe_load((CONFIGS / name).read_text())
    for path, value in expected.items():
        assert setting(config, path) == value, path
    assert setting(config, "model.init_args.schedule") == "simultaneous"
    assert setting(config, "model.init_args.lr_decay") == 1.000004
    assert math.isclose(setting(config, "model.init_args.momentum_final"), 0.7)


def test_conv_pair_is_reachable_where_the_design_places_it() -> None:
    from lightning_gan import nets

    assert nets.ConvMaxoutDiscriminator is ConvMaxoutDiscriminator
    assert nets.DeconvGenerator is DeconvGenerator
    assert nets.MaxoutConv2d is MaxoutConv2d
    with pytest.raises(AttributeError, match="no attribute 'ConvGenerator'"):
        nets.ConvGenerator  # noqa: B018
