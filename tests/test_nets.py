"""The paper's networks: maxout and dropout arithmetic, initialisation, output bias, constraints."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_gan import Maxout, MaxoutDiscriminator, MLPGenerator


def maxout_by_hand() -> tuple[Maxout, torch.Tensor]:
    """A maxout layer whose pieces are, for unit 0, x0, x1, x0 + x1 and, for unit 1, -x0, -x1, 2 x0 - 5; two inputs."""
    layer = Maxout(in_features=2, units=2, pieces=3)
    with torch.no_grad():
        layer.linear.weight.copy_(torch.tensor([[1.0, 0], [0, 1], [1, 1], [-1, 0], [0, -1], [2, 0]]))
        layer.linear.bias.copy_(torch.tensor([0.0, 0, 0, 0, 0, -5]))
    return layer, torch.tensor([[1.0, 2.0], [-3.0, 0.5]])


def test_maxout_takes_the_max_over_each_units_contiguous_pieces() -> None:
    layer, x = maxout_by_hand()
    expected = torch.tensor([[3.0, -1.0], [0.5, 3.0]])
    torch.testing.assert_close(layer(x), expected)


def test_maxout_sends_each_units_gradient_to_its_winning_piece_only() -> None:
    layer, x = maxout_by_hand()
    layer(x).backward(torch.tensor([[1.0, 10.0], [100.0, 1000.0]]))
    # winners: row 0 pieces 2 (x0 + x1) and 3 (-x0); row 1 pieces 1 (x1) and 3 (-x0)
    expected_bias_grad = torch.tensor([0.0, 100, 1, 1010, 0, 0])
    torch.testing.assert_close(layer.linear.bias.grad, expected_bias_grad)

    tied = Maxout(in_features=1, units=1, pieces=3)
    with torch.no_grad():
        tied.linear.weight.copy_(torch.tensor([[1.0], [1.0], [-1.0]]))  # pieces 0 and 1 tie exactly
        tied.linear.bias.zero_()
    tied(torch.tensor([[2.0]])).backward(torch.tensor([[1.0]]))
    assert sorted(tied.linear.bias.grad.tolist()) == [0.0, 0.0, 1.0]  # all to one winner, not split between them


def test_discriminator_dropout_is_inverted_with_the_papers_keep_probabilities() -> None:
    d = MaxoutDiscriminator(in_shape=(1, 4, 4), units=(3, 3), pieces=2)
    dropouts = [m for m in d.modules() if isinstance(m, nn.Dropout)]
    assert [round(1 - m.p, 6) for m in dropouts] == [0.8, 0.5, 0.5]
    torch.manual_seed(0)
    kept = dropouts[0].train()(torch.ones(100_000))
    assert set(kept.unique().tolist()) == {0.0, 1.25}  # kept inputs scaled by 1 / .8
    assert kept.mean().item() == pytest.approx(1.0, abs=0.01)
    kept = dropouts[1].train()(torch.ones(10))
    assert set(kept.unique().tolist()) <= {0.0, 2.0}
    # masks are drawn per example: two identical rows get different masks
    x = torch.ones(2, 16)
    out = dropouts[0](x)
    assert not torch.equal(out[0], out[1])


def test_discriminator_is_deterministic_in_eval_mode_and_returns_one_logit_per_example() -> None:
    d = MaxoutDiscriminator(in_shape=(1, 28, 28)).eval()
    x = torch.rand(5, 1, 28, 28)
    assert d(x).shape == (5,)
    torch.testing.assert_close(d(x), d(x))


def test_init_ranges_follow_the_authors_configs() -> None:
    torch.manual_seed(0)
    g = MLPGenerator()
    d = MaxoutDiscriminator()
    g_linears = [m for m in g.modules() if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in g_linears] == [(1200, 100), (1200, 1200), (784, 1200)]
    for m in g_linears:
        assert m.weight.abs().max() <= 0.05
        assert m.weight.abs().max() > 0.049  # uniform over the whole range, not a smaller init
        assert torch.count_nonzero(m.bias) == 0
    for m in (m for m in d.modules() if isinstance(m, nn.Linear)):
        assert 0.0049 < m.weight.abs().max() <= 0.005
        assert torch.count_nonzero(m.bias) == 0
    assert [type(a).__name__ for a in g.net if not isinstance(a, nn.Linear)] == ["ReLU", "ReLU", "Sigmoid"]


def test_per_layer_settings_and_their_validation() -> None:
    g = MLPGenerator(
        hidden_sizes=(8, 8),
        hidden_activations=("relu", "sigmoid"),
        init_range=[0.1, 0.2, 0.3],
        hidden_bias_init=[0.0, -2.0],
    )
    assert g.net[2].bias.eq(-2.0).all()
    assert [type(a).__name__ for a in g.net if not isinstance(a, nn.Linear)] == ["ReLU", "Sigmoid", "Sigmoid"]
    with pytest.raises(ValueError, match="init_range"):
        MLPGenerator(hidden_sizes=(8, 8), hidden_activations=("relu", "relu"), init_range=[0.1])
    with pytest.raises(ValueError, match="one activation per hidden layer"):
        MLPGenerator(hidden_sizes=(8, 8), hidden_activations=("relu",))
    with pytest.raises(ValueError, match="Unknown activation"):
        MLPGenerator(hidden_sizes=(8,), hidden_activations=("swish",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="input_keep_prob"):
        MaxoutDiscriminator(input_keep_prob=0.0)


def test_output_bias_starts_at_the_logit_of_the_clipped_pixel_marginals() -> None:
    g = MLPGenerator(hidden_sizes=(8,), hidden_activations=("relu",), out_shape=(1, 2, 2))
    mean = torch.tensor([[[0.0, 0.25], [0.5, 1.0]]])
    g.init_output_bias(mean)
    expected = torch.tensor([math.log(1e-7 / (1 - 1e-7)), math.log(0.25 / 0.75), 0.0, math.log((1 - 1e-7) / 1e-7)])
    torch.testing.assert_close(g.output_layer.bias, expected)
    linear = MLPGenerator(
        hidden_sizes=(8,), hidden_activations=("relu",), out_shape=(1, 2, 2), output_activation="linear"
    )
    linear.init_output_bias(mean)
    torch.testing.assert_close(linear.output_layer.bias, mean.flatten())
    with pytest.raises(ValueError, match="pixel mean of 4 values"):
        g.init_output_bias(torch.zeros(3))


@pytest.mark.parametrize("noise", ["uniform", "gaussian"])
def test_noise_has_the_right_shape_support_and_unit_variance(noise: str) -> None:
    torch.manual_seed(0)
    g = MLPGenerator(noise_dim=10, noise=noise, hidden_sizes=(4,), hidden_activations=("relu",))
    z = g.sample_noise(20_000, "cpu")
    assert z.shape == (20_000, 10)
    assert z.var().item() == pytest.approx(1.0, abs=0.02)
    if noise == "uniform":
        assert z.abs().max() <= math.sqrt(3)
    assert g(z[:3]).shape == (3, 1, 28, 28)


def test_max_col_norm_clips_each_units_incoming_weights() -> None:
    d = MaxoutDiscriminator(in_shape=(1, 2, 2), units=(3,), pieces=2, init_range=10.0, max_col_norm=1.5)
    d.apply_constraints()
    for m in (m for m in d.modules() if isinstance(m, nn.Linear)):
        assert m.weight.norm(dim=1).max() <= 1.5 + 1e-5
    g = MLPGenerator(hidden_sizes=(4,), hidden_activations=("relu",), init_range=10.0, max_col_norm=2.0)
    g.apply_constraints()
    for m in (m for m in g.modules() if isinstance(m, nn.Linear)):
        assert m.weight.norm(dim=1).max() <= 2.0 + 1e-5
