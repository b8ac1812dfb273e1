"""Parzen-window evaluation on real MNIST, the paper's full protocol, timed side by side in one run.

Protocol (goodfeli/adversarial parzen_ll.py): sigma searched over logspace(-1, 0, 10) on 1,000 validation images
(train[50000:51000]), then the mean log-likelihood and its standard error on the 10,000 test images, with 10,000
centres. Without a generator, 10,000 training images (train[0:10000]) stand in for the samples.

Rows: ours (lightning_gan.parzen); the authors' algorithm (batches of 100 points, each building the full
100 x M x D difference tensor, torch float32; extrapolated from a few batches); a float64 direct computation
(matrix-product form, float64, full distance matrices), which is also the accuracy reference; scikit-learn's
KernelDensity if it is importable (on a subset). Usage: python benchmarks/parzen.py [--device cuda] [--quick]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lightning_gan.parzen import _CACHE_BYTES, _chunks, parzen_log_likelihood, select_sigma

GRID = torch.logspace(-1, 0, 10, dtype=torch.float64)
AUTHORS_BATCH = 100


def mnist(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    folder = next(
        (f for f in (root / "MNIST" / "raw", root / "raw", root) if (f / "t10k-images-idx3-ubyte").is_file()), None
    )
    if folder is None:
        raise SystemExit(
            f"real MNIST IDX files not found under {root}; pass --mnist-root or set LIGHTNING_GAN_DATA_ROOT"
        )

    def read(name: str) -> torch.Tensor:
        raw = np.fromfile(folder / name, dtype=np.uint8, offset=16)
        return torch.from_numpy(raw.reshape(-1, 784).astype(np.float32) / 255.0)

    return read("train-images-idx3-ubyte"), read("t10k-images-idx3-ubyte")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak extra memory of a block: CUDA allocator peak, or resident-set growth on Linux (VmHWM reset), else None."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak, self.base = device, None, 0

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    @staticmethod
    def _reset_rss_peak() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @classmethod
    def method(cls, device: torch.device) -> str:
        if device.type == "cuda":
            return "growth of torch.cuda.max_memory_allocated"
        if cls._reset_rss_peak():
            return "resident-set growth, Linux VmHWM reset via /proc/self/clear_refs (tracemalloc cannot see torch)"
        return "not measurable on this OS (no /proc/self/clear_refs): see the bound from the chunk sizes"

    def __enter__(self) -> PeakMemory:
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif self._reset_rss_peak():
            self.base = self._status("VmRSS")
        else:
            self.base = None
        return self

    def __exit__(self, *exc: object) -> None:
        sync(self.device)
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.base is not None:
            self.peak = self._status("VmHWM") - self.base


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def ours(valid: torch.Tensor, test: torch.Tensor, centres: torch.Tensor, cx: int | None, cy: int | None):
    sigma, val_ll = select_sigma(valid, centres, GRID, chunk_x=cx, chunk_y=cy)
    return sigma, val_ll, parzen_log_likelihood(test, centres, sigma, chunk_x=cx, chunk_y=cy).double()


def float64_direct(valid: torch.Tensor, test: torch.Tensor, centres: torch.Tensor):
    """Matrix-product form, float64 throughout, full distance matrices."""
    mu = centres.double()
    mu_sq = mu.square().sum(1)
    log_norm = math.log(len(mu)), mu.shape[1] * math.log(math.sqrt(2 * math.pi))

    def dists(x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        return torch.addmm(mu_sq, x, mu.T, alpha=-2).add_(x.square().sum(1)[:, None]).clamp_min_(0)

    def ll(sigma: float, d2: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(d2 * (-0.5 / sigma**2), 1) - log_norm[0] - log_norm[1] - mu.shape[1] * math.log(sigma)

    d2 = dists(valid)
    val_ll = torch.stack([ll(s, d2).mean() for s in GRID.tolist()]).cpu()
    del d2
    sigma = float(GRID[int(val_ll.argmax())])
    return sigma, val_ll, ll(sigma, dists(test))


def bare_matmuls(xs: tuple[torch.Tensor, ...], centres: torch.Tensor, rows: int = 1024) -> None:
    """Only the float32 x @ centres.T products of the protocol, in 1024-row blocks: the floor for any matmul form."""
    out = torch.empty(rows, centres.shape[0], device=centres.device)
    for x in xs:
        for block in x.split(rows):
            torch.mm(block, centres.T, out=out[: len(block)])


def authors_batch(x: torch.Tensor, centres: torch.Tensor, sigma: float) -> torch.Tensor:
    """parzen_ll.py for one batch: the full (B, M, D) difference tensor, float32."""
    a = (x[:, None, :] - centres[None, :, :]) / sigma
    e = -0.5 * (a**2).sum(2)
    lme = torch.logsumexp(e, 1) - math.log(centres.shape[0])
    return lme - centres.shape[1] * math.log(sigma * math.sqrt(2 * math.pi))


def extra_memory_bound(n: int, m: int, s: int, cx: int, cy: int, d: int = 784, b: int = 4) -> int:
    """The bound documented in parzen_log_likelihood, for float32 compute."""
    cx, cy = min(n, cx), min(m, cy)
    return b * cx * cy * (1 + (s > 1)) + b * (cx + cy) * d + min(b * m * d, _CACHE_BYTES) + 8 * (s + 1) * n + 8192 * d


def fmt_mem(nbytes: float | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:,.0f} MiB"


def main() -> None:
    default_root = os.environ.get("LIGHTNING_GAN_DATA_ROOT", "data")  # the folder holding MNIST/raw/
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (a smoke run)")
    parser.add_argument("--mnist-root", type=Path, default=Path(default_root))
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats of ours (median reported)")
    parser.add_argument("--authors-batches", type=int, default=None, help="authors' batches timed before extrapolating")
    parser.add_argument("--sklearn-points", type=int, default=None, help="test points given to KernelDensity")
    parser.add_argument("--chunk-x", type=int, default=None)
    parser.add_argument("--chunk-y", type=int, default=None)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    device = torch.device(args.device)
    n_valid, n_test, n_centres = (200, 1000, 2000) if args.quick else (1000, 10000, 10000)
    repeats = args.repeats or (1 if args.quick else 5)
    authors_batches = args.authors_batches or (1 if args.quick else (10 if device.type == "cuda" else 2))
    sklearn_points = args.sklearn_points or (10 if args.quick else 100)

    train, test_all = mnist(args.mnist_root)
    valid = train[50000 : 50000 + n_valid].to(device)
    test = test_all[:n_test].to(device)
    centres = train[:n_centres].to(device)
    cx, cy = _chunks(device, args.chunk_x, args.chunk_y)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# Parzen window on real MNIST: {name}, torch {torch.__version__}{' (QUICK: reduced sizes)' * args.quick}")
    print(
        f"- {n_valid} validation images train[50000:{50000 + n_valid}] for sigma over logspace(-1, 0, 10); "
        f"{n_test} test images; {n_centres} centres = MNIST training images train[0:{n_centres}] standing in for "
        "generator samples (no checkpoint given). Data already on the device; times exclude loading."
    )
    print(f"- ours: chunks {cx} x {cy}, float32 centred matmul + float64 accumulators; median of {repeats} runs")
    print(f"- peak extra memory: {PeakMemory.method(device)}")
    if hasattr(os, "getloadavg"):
        print(f"- load average before the run (other jobs share these cores): {os.getloadavg()[0]:.2f}")
    rows = []

    # ours: a tiny call initialises the BLAS and thread pools; the first full run then measures memory, before any
    # other method's freed memory could hide its first touch
    ours(valid[:10], test[:10], centres[:10], cx, cy)
    with PeakMemory(device) as mem:
        timed(lambda: ours(valid, test, centres, cx, cy), device)
    times, floor_times = [], []
    for _ in range(repeats):  # interleaved with the bare matmuls so both see the same load from other jobs
        t, (sigma, val_ll, test_ll) = timed(lambda: ours(valid, test, centres, cx, cy), device)
        times.append(t)
        floor_times.append(timed(lambda: bare_matmuls((valid, test), centres), device)[0])
    t_ours, t_floor = statistics.median(times), statistics.median(floor_times)
    bound = max(extra_memory_bound(n, n_centres, s, cx, cy) for n, s in ((n_valid, len(GRID)), (n_test, 1)))
    rows.append(["ours", t_ours, mem.peak, test_ll, f"runs {', '.join(f'{t:.2f}' for t in times)} s"])

    # float64 direct: also the accuracy reference
    with PeakMemory(device) as mem:
        t_ref, (ref_sigma, ref_val_ll, ref_ll) = timed(lambda: float64_direct(valid, test, centres), device)
    rows.append(["float64 direct (matmul form, full matrices)", t_ref, mem.peak, ref_ll, ""])

    # the authors' algorithm: time a few batches at the chosen sigma, extrapolate to the protocol's batch count
    n_batches = len(GRID) * math.ceil(n_valid / AUTHORS_BATCH) + math.ceil(n_test / AUTHORS_BATCH)
    batch_times, batch_ll = [], []
    with PeakMemory(device) as mem:
        for k in range(min(authors_batches, math.ceil(n_test / AUTHORS_BATCH))):
            t, ll = timed(lambda k=k: authors_batch(test[k * 100 : (k + 1) * 100], centres, ref_sigma), device)
            batch_times.append(t)
            batch_ll.append(ll.double())
    t_auth = statistics.median(batch_times) * n_batches
    done = len(batch_times)
    note = f"timed {done} of {n_batches} batches (median {statistics.median(batch_times):.2f} s), extrapolated"
    rows.append(["authors' algorithm (B=100 x M x D diffs, float32)", t_auth, mem.peak, torch.cat(batch_ll), note])

    try:
        from sklearn.neighbors import KernelDensity
    except ImportError:
        print("- scikit-learn not importable: KernelDensity row skipped")
    else:
        kde = KernelDensity(kernel="gaussian", bandwidth=ref_sigma).fit(centres.double().cpu().numpy())
        sub = test[:sklearn_points].double().cpu().numpy()
        with PeakMemory(torch.device("cpu")) as mem:
            t, kde_ll = timed(lambda: torch.from_numpy(kde.score_samples(sub)), torch.device("cpu"))
        t_kde = t / sklearn_points * (len(GRID) * n_valid + n_test)
        note = f"d=784, {sklearn_points} test points in {t:.2f} s, extrapolated (no shared distances)"
        rows.append(["scikit-learn KernelDensity (gaussian)", t_kde, mem.peak, kde_ll, note])

    print()
    print(f"sigma chosen: ours {sigma:.4f}, float64 {ref_sigma:.4f}; mean validation LL per sigma (float64):")
    print("  " + ", ".join(f"{s:.3f}: {v:.1f}" for s, v in zip(GRID.tolist(), ref_val_ll.tolist(), strict=True)))
    print(f"  max |ours - float64| over the grid means: {(val_ll - ref_val_ll).abs().max().item():.1e} nats")
    ref_cpu = ref_ll.cpu()
    mean, se = ref_cpu.mean().item(), ref_cpu.std(unbiased=False).item() / math.sqrt(len(ref_cpu))
    print(f"test LL (float64): {mean:.2f} +- {se:.2f} (se, ddof=0); ours {test_ll.mean().item():.2f}")
    print()
    print("| method | protocol time (s) | speed-up vs authors | speed-up vs float64 | peak extra memory | "
          "max abs err (nats) | mean err (nats) | notes |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for label, t, peak, ll, note in rows:
        err = ll.cpu() - ref_cpu[: len(ll)]
        print(
            f"| {label} | {t:.2f} | {t_auth / t:,.0f}x | {t_ref / t:.2f}x | {fmt_mem(peak)} | "
            f"{err.abs().max().item():.1e} | {err.mean().item():+.1e} | {note} |"
        )
    flops = 2 * (n_valid + n_test) * n_centres * 784
    print(
        f"\nbare float32 matmuls of the protocol ({flops / 1e9:.0f} GFLOP), same run, interleaved with ours: median "
        f"{t_floor:.2f} s ({flops / t_floor / 1e9:.0f} GFLOP/s); ours takes {t_ours / t_floor:.2f}x that"
    )
    print(
        f"ours: extra memory per call from the chunk sizes (parzen_log_likelihood docstring): {fmt_mem(bound)}; the "
        "measured figure spans both calls (select_sigma, then the test set) and what the allocator keeps between them"
    )
    if hasattr(os, "getloadavg"):
        print(f"load average after the run: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
