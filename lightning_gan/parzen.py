"""Parzen-window log-likelihood (the paper's evaluation) and the package's one chunked distance engine.

Squared distances come from the matrix-product expansion ``||x||^2 - 2 x.y + ||y||^2`` on data centred on the mean
of ``y``, computed block by block, so extra memory is bounded by the chunk sizes, never by ``N x M``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = [
    "ParzenLogLikelihood",
    "nearest_neighbours",
    "pairwise_sq_dists_chunks",
    "parzen_log_likelihood",
    "select_sigma",
]

# Block sizes (rows of x, rows of y). CPU: matmul-bound, blocks sized for the caches; CUDA: big enough to fill the GPU.
_CHUNKS = {"cpu": (1024, 2048), "cuda": (4096, 16384)}


def _chunks(device: torch.device, chunk_x: int | None, chunk_y: int | None) -> tuple[int, int]:
    dx, dy = _CHUNKS["cuda" if device.type == "cuda" else "cpu"]
    for name, value in (("chunk_x", chunk_x), ("chunk_y", chunk_y)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}={value!r} is not a positive integer; pass e.g. {name}=1024 or None (default).")
    return chunk_x or dx, chunk_y or dy


def _check_points(name: str, t: Tensor, fix_dims: str = "flatten it with .flatten(1)") -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}; convert it with torch.as_tensor.")
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (points, features), got shape {tuple(t.shape)}; {fix_dims}.")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(
            f"{name} is empty (shape {tuple(t.shape)}); pass at least one point with at least one feature."
        )
    if not t.is_floating_point():
        raise ValueError(
            f"{name} has dtype {t.dtype}; pass floating-point data in the model's scale (e.g. x.float() / 255)."
        )
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} contains {bad} NaN/Inf values; remove or replace them (e.g. torch.nan_to_num).")


def _check_pair(xname: str, x: Tensor, yname: str, y: Tensor) -> None:
    _check_points(xname, x)
    _check_points(yname, y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"dimension mismatch: {xname} has {x.shape[1]} features, {yname} has {y.shape[1]}; "
            "flatten both to the same (n, C*H*W) layout."
        )
    if x.device != y.device:
        raise ValueError(f"{xname} is on {x.device} but {yname} on {y.device}; move one with .to(other.device).")


def _sigmas(sigma: float | Sequence[float] | Tensor, name: str = "sigma") -> tuple[Tensor, bool]:
    """Return the sigmas as a 1-D float64 CPU tensor and whether the input was a scalar."""
    s = torch.as_tensor(sigma, dtype=torch.float64).detach().cpu()
    if s.ndim > 1 or s.numel() == 0:
        raise ValueError(f"{name} must be a positive float or a non-empty 1-D grid, got shape {tuple(s.shape)}.")
    bad = s[~(torch.isfinite(s) & (s > 0))]
    if bad.numel():
        raise ValueError(f"{name} must be finite and > 0, got {bad.tolist()}; use e.g. torch.logspace(-1, 0, 10).")
    return s.reshape(-1), s.ndim == 0


@contextlib.contextmanager
def _ieee_fp32(device: torch.device) -> Iterator[None]:
    """Full-precision float32 matmuls on CUDA: TF32 (10-bit mantissa) would cost nats of error at small sigma."""
    if device.type != "cuda":
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _compute_dtype(x: Tensor, y: Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    return torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32


def _prepared(t: Tensor, centre: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Centre a chunk, cast it to the compute dtype; return it and its squared norms (float64 accumulation)."""
    c = (t - centre).to(dtype)
    return c, c.square().sum(1, dtype=torch.float64)


def _partial_blocks(
    x: Tensor, y: Tensor, chunk_x: int, chunk_y: int, dtype: torch.dtype
) -> Iterator[tuple[int, int, int, int, Tensor, Tensor]]:
    """Yield ``(i0, i1, j0, j1, P, xx)`` with ``P = ||y_j||^2 - 2 x_i.y_j`` (so ``d^2 = P + xx``), y-chunks outermost.

    ``P`` lives in one reused buffer: it is only valid until the next step of the iterator.
    """
    n, m = x.shape[0], y.shape[0]
    acc = torch.float64 if dtype == torch.float64 or x.dtype == torch.float64 else torch.float32
    centre = sum(c.sum(0, dtype=torch.float64) for c in y.split(chunk_y)) / m
    centre = centre.to(acc)
    buf = torch.empty(min(n, chunk_x) * min(m, chunk_y), dtype=dtype, device=x.device)
    single_x = n <= chunk_x
    xs = _prepared(x, centre, dtype) if single_x else None
    for j0 in range(0, m, chunk_y):
        yc, yy = _prepared(y[j0 : j0 + chunk_y], centre, dtype)
        yy = yy.to(dtype)
        for i0 in range(0, n, chunk_x):
            xc, xx = xs if xs is not None else _prepared(x[i0 : i0 + chunk_x], centre, dtype)
            p = buf[: xc.shape[0] * yc.shape[0]].view(xc.shape[0], yc.shape[0])
            with _ieee_fp32(x.device):
                torch.addmm(yy, xc, yc.T, alpha=-2.0, out=p)
            yield i0, i0 + xc.shape[0], j0, j0 + yc.shape[0], p, xx


def pairwise_sq_dists_chunks(
    x: Tensor,
    y: Tensor,
    *,
    chunk_x: int | None = None,
    chunk_y: int | None = None,
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[slice, slice, Tensor]]:
    """Yield ``(rows, cols, d2)`` with ``d2 = ||x[rows] - y[cols]||^2`` (clamped >= 0) block by block.

    Blocks have at most ``chunk_x x chunk_y`` entries; extra memory is about ``(chunk_x + chunk_y) * D`` plus two
    blocks in the compute ``dtype`` (float32 unless an input is float64). ``d2`` is a fresh tensor you may keep.
    """
    _check_pair("x", x, "y", y)
    cx, cy = _chunks(x.device, chunk_x, chunk_y)
    for i0, i1, j0, j1, p, xx in _partial_blocks(x, y, cx, cy, _compute_dtype(x, y, dtype)):
        yield slice(i0, i1), slice(j0, j1), (p + xx.to(p.dtype)[:, None]).clamp_min_(0)


def nearest_neighbours(
    x: Tensor,
    y: Tensor,
    *,
    squared: bool = False,
    chunk_x: int | None = None,
    chunk_y: int | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """For every row of ``x`` (N, D), the nearest row of ``y`` (M, D): ``(dist (N,), index (N,) int64)``.

    ``dist`` is the Euclidean distance (squared if ``squared=True``). Ties go to the lowest index within a block.
    """
    _check_pair("x", x, "y", y)
    cx, cy = _chunks(x.device, chunk_x, chunk_y)
    best = torch.full((x.shape[0],), math.inf, dtype=torch.float64, device=x.device)
    index = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for i0, i1, j0, _, p, xx in _partial_blocks(x, y, cx, cy, _compute_dtype(x, y, dtype)):
        val, arg = p.min(1)
        d2 = (val.double() + xx).clamp_min_(0)
        better = d2 < best[i0:i1]
        best[i0:i1] = torch.where(better, d2, best[i0:i1])
        index[i0:i1] = torch.where(better, arg + j0, index[i0:i1])
    out_dtype = torch.promote_types(x.dtype, torch.float32)
    return (best if squared else best.sqrt()).to(out_dtype), index


def _log_sum_kernels(
    x: Tensor, samples: Tensor, sigmas: Tensor, chunk_x: int, chunk_y: int, dtype: torch.dtype
) -> Tensor:
    """``log sum_j exp(-||x_i - mu_j||^2 / (2 sigma_s^2))`` as (S, N) float64, by a streaming log-sum-exp."""
    n = x.shape[0]
    coef = (0.5 / sigmas.square()).to(x.device)  # (S,) float64
    coef_list = coef.tolist()
    run_min = torch.full((n,), math.inf, dtype=torch.float64, device=x.device)  # min_j d^2 so far
    run_sum = torch.zeros(len(coef_list), n, dtype=torch.float64, device=x.device)  # sum exp(-c (d^2 - run_min))
    work = None
    for i0, i1, _, _, p, xx in _partial_blocks(x, samples, chunk_x, chunk_y, dtype):
        pmin = p.amin(1)
        if len(coef_list) == 1:
            terms = [p]  # p is the reused engine buffer: transform it in place
        else:
            if work is None or work.numel() < p.numel():
                work = torch.empty_like(p)
            terms = [work[: p.numel()].view_as(p)] * len(coef_list)
        sums = []
        for c, t in zip(coef_list, terms, strict=True):
            torch.add((pmin * c)[:, None], p, alpha=-c, out=t)  # -c (d^2 - min_block d^2) <= 0
            sums.append(t.exp_().sum(1, dtype=torch.float64))
        block_sum = torch.stack(sums)
        block_min = pmin.double() + xx
        new_min = torch.minimum(run_min[i0:i1], block_min)
        run_sum[:, i0:i1] = run_sum[:, i0:i1] * torch.exp(-coef[:, None] * (run_min[i0:i1] - new_min)) + (
            block_sum * torch.exp(-coef[:, None] * (block_min - new_min))
        )
        run_min[i0:i1] = new_min
    return run_sum.log() - coef[:, None] * run_min.clamp_min(0)


def parzen_log_likelihood(
    x: Tensor,
    samples: Tensor,
    sigma: float | Sequence[float] | Tensor,
    *,
    chunk_x: int | None = None,
    chunk_y: int | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    r"""Per-example log-likelihood (nats) of the rows of ``x`` (N, D) under a Gaussian Parzen window on ``samples``.

    .. math::
        \log p(x) = \log \frac{1}{M} \sum_{j=1}^{M} \exp\left(-\frac{\lVert x - \mu_j \rVert^2}{2\sigma^2}\right)
        - D \log\left(\sigma \sqrt{2\pi}\right)

    ``sigma`` is a float (returns (N,)) or a 1-D grid (returns (S, N)); distances are computed once for the whole
    grid. Work is done in (chunk_x x chunk_y) blocks with a streaming log-sum-exp, so the extra memory is at most
    about ``(chunk_x + chunk_y) * D * 12`` bytes of centred chunks, ``chunk_x * chunk_y * 4 * (1 + [S > 1])`` bytes of
    blocks and ``(S + 1) * N * 8`` bytes of running state (float32 compute; double these for float64), whatever N
    and M. Compute dtype is float32 (full-precision matmul, TF32 off) on data centred on the mean of ``samples``,
    with float64 norms and accumulators; float64 if an input is float64 or ``dtype=torch.float64``.
    Returns float32 (float64 for float64 input) on ``x``'s device.

    Example:
        >>> x = torch.zeros(1, 2)
        >>> samples = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
        >>> parzen_log_likelihood(x, samples, sigma=1.0)  # log(0.5 * (1 + exp(-12.5))) - log(2 pi)
        tensor([-2.5310])
    """
    _check_pair("x", x, "samples", samples)
    sigmas, scalar = _sigmas(sigma)
    cx, cy = _chunks(x.device, chunk_x, chunk_y)
    lse = _log_sum_kernels(x, samples, sigmas, cx, cy, _compute_dtype(x, samples, dtype))
    norm = math.log(samples.shape[0]) + x.shape[1] * torch.log(sigmas * math.sqrt(2 * math.pi)).to(x.device)
    ll = (lse - norm[:, None]).to(torch.promote_types(x.dtype, torch.float32))
    return ll[0] if scalar else ll


def select_sigma(
    valid: Tensor, samples: Tensor, sigmas: Sequence[float] | Tensor | None = None, **kwargs: object
) -> tuple[float, Tensor]:
    """The paper's bandwidth search: the sigma of ``sigmas`` (default ``logspace(-1, 0, 10)``) maximising the mean
    validation log-likelihood. Returns ``(sigma, mean_ll_per_sigma (S,) float64)``; ties go to the first sigma.
    """
    grid, _ = _sigmas(torch.logspace(-1, 0, 10) if sigmas is None else sigmas, "sigmas")
    mean_ll = parzen_log_likelihood(valid, samples, grid, **kwargs).double().mean(1).cpu()  # type: ignore[arg-type]
    return float(grid[int(mean_ll.argmax())]), mean_ll


class ParzenLogLikelihood(Metric):
    """Mean Parzen-window log-likelihood (nats) and its standard error, accumulated over ``update(x)`` batches.

    ``samples`` (M, ...) are the window centres (e.g. 10,000 generator samples), the same on every rank; they are a
    non-persistent buffer that follows ``.to(device)``. ``x`` and ``samples`` are flattened from dim 1.
    ``compute()`` returns ``(mean, se)`` with ``se = std(ddof=0) / sqrt(N)`` as in the paper; the states ``sum``,
    ``sum_sq`` and ``count`` are float64 and summed across processes by torchmetrics.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    sum: Tensor
    sum_sq: Tensor
    count: Tensor
    samples: Tensor

    def __init__(
        self, samples: Tensor, sigma: float, *, chunk_x: int | None = None, chunk_y: int | None = None, **kwargs: object
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if not isinstance(samples, Tensor) or samples.ndim < 2:
            shape = tuple(samples.shape) if isinstance(samples, Tensor) else type(samples).__name__
            raise ValueError(f"samples must be a tensor (M, D) or (M, C, H, W), got {shape}; stack the samples first.")
        _check_points("samples", samples.detach().flatten(1))
        sigmas, scalar = _sigmas(sigma)
        if not scalar:
            raise ValueError(f"sigma must be one float, got {sigma!r}; pick it first with select_sigma().")
        self.sigma = float(sigmas[0])
        self.chunk_x, self.chunk_y = chunk_x, chunk_y
        self.register_buffer("samples", samples.detach().flatten(1), persistent=False)
        for name in ("sum", "sum_sq", "count"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, x: Tensor) -> None:
        """Add the per-example log-likelihoods of the batch ``x`` (B, ...) to the running sums."""
        if not isinstance(x, Tensor) or x.ndim < 2:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a batch (B, D) or (B, C, H, W), got {shape}; add a batch dimension.")
        ll = parzen_log_likelihood(
            x.detach().flatten(1), self.samples, self.sigma, chunk_x=self.chunk_x, chunk_y=self.chunk_y
        ).double()
        self.sum += ll.sum()
        self.sum_sq += ll.square().sum()
        self.count += ll.numel()

    def compute(self) -> tuple[Tensor, Tensor]:
        """Return ``(mean, standard error)`` of the log-likelihoods seen so far."""
        mean = self.sum / self.count
        var = (self.sum_sq / self.count - mean.square()).clamp_min(0)
        return mean, (var / self.count).sqrt()
