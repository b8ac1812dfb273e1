"""Tests for lightning_gan.parzen: the chunked distance engine, the Parzen estimator, sigma selection, the metric."""

from __future__ import annotations

import doctest
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from lightning_gan import parzen
from lightning_gan.parzen import (
    MIN_SIGMA,
    ParzenLogLikelihood,
    nearest_neighbours,
    pairwise_sq_dists_chunks,
    parzen_log_likelihood,
    select_sigma,
)


def reference_ll(x: torch.Tensor, samples: torch.Tensor, sigma: float) -> np.ndarray:
    """Direct float64 computation: broadcast differences, scipy log-sum-exp."""
    x64, mu64 = x.double().numpy(), samples.double().numpy()
    d2 = ((x64[:, None, :] - mu64[None, :, :]) ** 2).sum(-1)
    d = x64.shape[1]
    return logsumexp(-d2 / (2 * sigma**2), axis=1) - math.log(len(mu64)) - d * math.log(sigma * math.sqrt(2 * math.pi))


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(37, 20, generator=g)
    samples = torch.rand(53, 20, generator=g)
    return x, samples


@pytest.mark.parametrize("sigma", [0.01, 0.1, 0.3, 1.0, 10.0])
@pytest.mark.parametrize(("chunk_x", "chunk_y"), [(None, None), (7, 11), (1, 53), (37, 1), (100, 100)])
def test_matches_float64_reference(data, sigma, chunk_x, chunk_y):
    x, samples = data
    ref = reference_ll(x, samples, sigma)
    ours = parzen_log_likelihood(x, samples, sigma, chunk_x=chunk_x, chunk_y=chunk_y)
    assert ours.shape == (37,)
    assert ours.dtype == torch.float32
    np.testing.assert_allclose(ours.double().numpy(), ref, rtol=1e-5, atol=2e-3)
    ours64 = parzen_log_likelihood(x.double(), samples.double(), sigma, chunk_x=chunk_x, chunk_y=chunk_y)
    assert ours64.dtype == torch.float64
    np.testing.assert_allclose(ours64.numpy(), ref, rtol=1e-10, atol=1e-8)


def test_far_points_and_duplicates_stay_finite(data):
    x, samples = data
    x = torch.cat([x + 5.0, samples[:3]])  # far from every centre, and exact copies of centres
    for sigma in (0.01, 0.1):
        ours = parzen_log_likelihood(x, samples, sigma, chunk_y=10)
        assert torch.isfinite(ours).all()
        np.testing.assert_allclose(ours.double().numpy(), reference_ll(x, samples, sigma), rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input(data, dtype):
    x, samples = (t.to(dtype) for t in data)
    ours = parzen_log_likelihood(x, samples, 0.2)
    ref = reference_ll(x.float(), samples.float(), 0.2)
    assert ours.dtype == torch.float32
    np.testing.assert_allclose(ours.double().numpy(), ref, rtol=1e-5, atol=1e-3)


def test_inputs_that_require_grad_are_accepted(data):
    x, samples = (t.clone().requires_grad_() for t in data)
    ll = parzen_log_likelihood(x, samples, 0.2)
    assert not ll.requires_grad
    assert nearest_neighbours(x, samples)[0].shape == (37,)
    metric = ParzenLogLikelihood(samples, 0.2)
    metric.update(x)
    assert metric.compute()[0].item() == pytest.approx(ll.double().mean().item(), rel=1e-6)


def test_sigma_grid_equals_per_sigma_calls(data):
    x, samples = data
    grid = torch.logspace(-1, 0, 10)
    together = parzen_log_likelihood(x, samples, grid, chunk_x=8, chunk_y=16)
    assert together.shape == (10, 37)
    for k, sigma in enumerate(grid.tolist()):
        alone = parzen_log_likelihood(x, samples, sigma, chunk_x=8, chunk_y=16)
        torch.testing.assert_close(together[k], alone, rtol=1e-6, atol=1e-4)
    listed = parzen_log_likelihood(x, samples, [0.2, 0.5])
    torch.testing.assert_close(listed[1], parzen_log_likelihood(x, samples, 0.5))


def test_select_sigma_picks_grid_argmax(data):
    x, samples = data
    grid = [0.05, 0.1, 0.2, 0.4, 0.8]
    sigma, mean_ll = select_sigma(x, samples, grid)
    means = [reference_ll(x, samples, s).mean() for s in grid]
    np.testing.assert_allclose(mean_ll.numpy(), means, rtol=1e-5)
    assert sigma == pytest.approx(grid[int(np.argmax(means))])
    assert 0 < int(np.argmax(means)) < len(grid) - 1  # an interior optimum, so the test means something
    default_sigma, default_ll = select_sigma(x, samples)
    assert default_ll.shape == (10,)
    assert default_sigma == float(np.logspace(-1, 0, 10)[default_ll.argmax()])  # the authors' grid, bit for bit


def test_metric_mean_and_se_match_numpy(data):
    x, samples = data
    metric = ParzenLogLikelihood(samples, 0.2)
    batches = [x[:10], x[10:11], x[11:]]
    for batch in batches:
        metric.update(batch)
    mean, se = metric.compute()
    ll = reference_ll(x, samples, 0.2)
    assert mean.item() == pytest.approx(ll.mean(), rel=1e-6)
    assert se.item() == pytest.approx(ll.std(ddof=0) / math.sqrt(len(ll)), rel=1e-4)
    assert metric.count.dtype == metric.sum.dtype == metric.sum_sq.dtype == torch.float64


def test_metric_forward_gives_the_batch_value_and_accumulates(data):
    x, samples = data
    metric = ParzenLogLikelihood(samples, 0.2)
    batch_mean, _ = metric(x[:10])
    ll = reference_ll(x, samples, 0.2)
    assert batch_mean.item() == pytest.approx(ll[:10].mean(), rel=1e-6)
    metric(x[10:])
    assert metric.compute()[0].item() == pytest.approx(ll.mean(), rel=1e-6)


def test_metric_states_reduce_by_sum(data):
    x, samples = data
    rank0, rank1 = ParzenLogLikelihood(samples, 0.3), ParzenLogLikelihood(samples, 0.3)
    rank0.update(x[:20])
    rank1.update(x[20:])
    rank0.merge_state(rank1)  # what the sum reduction across processes does
    ll = reference_ll(x, samples, 0.3)
    mean, se = rank0.compute()
    assert mean.item() == pytest.approx(ll.mean(), rel=1e-6)
    assert se.item() == pytest.approx(ll.std(ddof=0) / math.sqrt(len(ll)), rel=1e-4)
    # the reduction across processes, here over two ranks with rank 0's states: every state is summed
    states = {name: getattr(rank0, name).clone() for name in ("sum", "sum_sq", "count")}
    rank0.sync(dist_sync_fn=lambda tensor, group=None: [tensor, tensor], distributed_available=lambda: True)
    for name, state in states.items():
        torch.testing.assert_close(getattr(rank0, name), 2 * state, rtol=0, atol=0, msg=name)


def test_metric_takes_images_and_keeps_samples_out_of_state(data):
    x, samples = data
    images = samples.reshape(53, 1, 4, 5)
    metric = ParzenLogLikelihood(images, 0.2)
    metric.update(x.reshape(37, 1, 4, 5))
    assert metric.compute()[0].item() == pytest.approx(reference_ll(x, samples, 0.2).mean(), rel=1e-6)
    assert "samples" in dict(metric.named_buffers())
    assert "samples" not in metric.state_dict()
    cached = metric._centres
    assert cached is not None and cached.y is metric.samples
    metric.double()  # a move (here of dtype) replaces the samples: the cached centred copy is made again from them
    metric.update(x[:1].double())
    assert metric._centres is not cached and metric._centres.y is metric.samples
    assert metric._centres.dtype == torch.float64
    assert metric.count.item() == 38  # the states survive
    metric.reset()
    metric.update(x[:5])
    assert metric.count.item() == 5


@pytest.mark.parametrize(("chunk_x", "chunk_y"), [(None, None), (5, 7), (1, 1)])
def test_nearest_neighbours_matches_cdist(data, chunk_x, chunk_y):
    x, samples = (t.double() for t in data)
    dist, index = nearest_neighbours(x, samples, chunk_x=chunk_x, chunk_y=chunk_y)
    full = torch.cdist(x, samples)
    ref_dist, ref_index = full.min(1)
    torch.testing.assert_close(index, ref_index)
    torch.testing.assert_close(dist, ref_dist)
    sq, _ = nearest_neighbours(x.float(), samples.float(), squared=True, chunk_x=chunk_x, chunk_y=chunk_y)
    torch.testing.assert_close(sq.double(), ref_dist**2, rtol=1e-5, atol=1e-5)


def test_pairwise_chunks_cover_the_matrix(data):
    x, samples = data
    full = torch.full((37, 53), -1.0)
    for rows, cols, d2 in pairwise_sq_dists_chunks(x, samples, chunk_x=6, chunk_y=17):
        assert d2.shape[0] <= 6 and d2.shape[1] <= 17
        assert (d2 >= 0).all()
        full[rows, cols] = d2
    torch.testing.assert_close(full, torch.cdist(x.double(), samples.double()).float() ** 2, rtol=1e-5, atol=1e-5)


def test_docstring_example():
    result = doctest.testmod(parzen, extraglobs={"torch": torch})
    assert result.attempted > 0 and result.failed == 0


GOOD = torch.rand(4, 3)
BAD_INPUTS = [
    (dict(sigma=0.0), r"sigma must be finite and > 0, got \[0\.0\]"),
    (dict(sigma=-1.0), r"sigma must be finite and > 0, got \[-1\.0\]"),
    (dict(sigma=[0.1, -0.2]), r"sigma must be finite and > 0, got \[-0\.2"),
    (dict(sigma=float("nan")), r"sigma must be finite and > 0, got \[nan\]"),
    (dict(sigma=[]), r"sigma must be a positive float or a non-empty 1-D grid"),
    (dict(x=torch.empty(0, 3)), r"x is empty \(shape \(0, 3\)\)"),
    (dict(samples=torch.empty(0, 3)), r"samples is empty \(shape \(0, 3\)\)"),
    (dict(x=torch.rand(4, 5)), r"dimension mismatch: x has 5 features, samples has 3; flatten both"),
    (dict(x=torch.tensor([[0.0, float("nan"), 0.0]])), r"x contains 1 NaN/Inf values"),
    (dict(samples=torch.tensor([[0.0, float("inf"), 0.0]])), r"samples contains 1 NaN/Inf values"),
    (dict(x=torch.rand(2, 1, 3)), r"x must be 2-D \(points, features\), got shape \(2, 1, 3\); flatten it"),
    (dict(samples=torch.rand(3)), r"samples must be 2-D \(points, features\), got shape \(3,\)"),
    (dict(x=torch.ones(4, 3, dtype=torch.uint8)), r"x has dtype torch.uint8; pass floating-point data"),
    (dict(x=np.ones((4, 3))), r"x must be a torch.Tensor, got ndarray"),
    (dict(chunk_x=0), r"chunk_x=0 is not a positive integer"),
    (dict(dtype=torch.float16), r"dtype=torch.float16 is not supported; use torch.float32"),
]


@pytest.mark.parametrize(("change", "message"), BAD_INPUTS)
def test_bad_input_is_a_clear_value_error(change, message):
    kwargs = dict(x=GOOD, samples=GOOD, sigma=0.5) | change
    with pytest.raises(ValueError, match=message):
        parzen_log_likelihood(**kwargs)


def test_bad_input_elsewhere():
    with pytest.raises(ValueError, match=r"sigmas must be finite and > 0, got \[0\.0\]"):
        select_sigma(GOOD, GOOD, [0.1, 0.0])
    with pytest.raises(ValueError, match=r"dimension mismatch: x has 3 features, y has 2"):
        nearest_neighbours(GOOD, torch.rand(5, 2))
    with pytest.raises(ValueError, match=r"y contains 1 NaN/Inf"):
        list(pairwise_sq_dists_chunks(GOOD, torch.tensor([[0.0, 0.0, float("nan")]])))
    with pytest.raises(ValueError, match=r"sigma must be one float, got \[0\.1, 0\.2\]; pick it first"):
        ParzenLogLikelihood(GOOD, [0.1, 0.2])
    with pytest.raises(ValueError, match=r"sigma must be finite and > 0, got \[0\.0\]"):
        ParzenLogLikelihood(GOOD, 0.0)
    with pytest.raises(ValueError, match=r"samples must be a tensor \(M, D\) or \(M, C, H, W\), got \(3,\)"):
        ParzenLogLikelihood(torch.rand(3), 0.1)
    metric = ParzenLogLikelihood(GOOD, 0.1)
    with pytest.raises(ValueError, match=r"dimension mismatch: x has 2 features, samples has 3"):
        metric.update(torch.rand(4, 2))
    with pytest.raises(ValueError, match=r"x must be a batch \(B, D\) or \(B, C, H, W\), got \(3,\)"):
        metric.update(torch.rand(3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_even_with_tf32_enabled(data):
    x, samples = data
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        gpu = parzen_log_likelihood(x.cuda(), samples.cuda(), torch.logspace(-1, 0, 10))
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(previous)
    cpu = parzen_log_likelihood(x, samples, torch.logspace(-1, 0, 10))
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=2e-3)
    metric = ParzenLogLikelihood(samples, 0.2).to("cuda")
    assert metric.samples.is_cuda
    metric.update(x.cuda())
    assert metric.compute()[0].item() == pytest.approx(reference_ll(x, samples, 0.2).mean(), rel=1e-6)


def _read_images(path: Path, count: int) -> torch.Tensor:
    raw = np.fromfile(path, dtype=np.uint8, count=count * 784, offset=16)
    return torch.from_numpy(raw.reshape(count, 784).astype(np.float32) / 255.0)


def test_real_mnist_accuracy_against_float64(real_mnist_root: Path):
    """Float32 compute on 500 test images x 2,000 training-image centres over the paper's sigma grid."""
    folder = real_mnist_root / "MNIST" / "raw"
    x = _read_images(folder / "t10k-images-idx3-ubyte", 500)
    samples = _read_images(folder / "train-images-idx3-ubyte", 2000)
    x = torch.cat([x, samples[:20]])  # exact matches: the hardest case for the expansion
    grid = torch.logspace(-1, 0, 10, dtype=torch.float64)
    x64, mu64 = x.double(), samples.double()
    d2 = ((x64**2).sum(1)[:, None] + (mu64**2).sum(1)[None] - 2 * x64 @ mu64.T).clamp_min(0)
    ref = torch.logsumexp(-d2[None] / (2 * grid[:, None, None] ** 2), 2) - math.log(2000)
    ref -= 784 * torch.log(grid * math.sqrt(2 * math.pi))[:, None]
    ours = parzen_log_likelihood(x, samples, grid).double()
    error = ours - ref
    assert error.abs().max().item() < 1e-2
    assert error.mean(1).abs().max().item() < 1e-3


def test_a_sigma_below_the_floor_is_refused_and_the_floor_itself_works():
    # 1e-30 once overflowed float32 deep inside the estimate, after a whole epoch of training
    with pytest.raises(ValueError, match=r"sigmas must be at least MIN_SIGMA = 0\.0001, got \[1e-30\]"):
        select_sigma(GOOD, GOOD, [1e-30, 0.1])
    with pytest.raises(ValueError, match=r"sigma must be at least MIN_SIGMA"):
        ParzenLogLikelihood(GOOD, 1e-5)
    generator = torch.Generator().manual_seed(0)
    x, samples = torch.rand(20, 784, generator=generator), torch.rand(50, 784, generator=generator)
    ll = parzen_log_likelihood(x, samples, [MIN_SIGMA, 0.1])
    assert torch.isfinite(ll).all()
    np.testing.assert_allclose(ll[0].double().numpy(), reference_ll(x, samples, MIN_SIGMA), rtol=1e-5)
