"""Where the fast path's update spends the GPU's time: kernels per update, and the captured update's speed at each
float32 matmul precision.

    python benchmarks/update_profile.py --data-dir data

For each config (``configs/mnist.yaml`` and ``configs/mnist_fast.yaml`` by default), with the fast path's flags: a
short fit, then 20 of its updates run eagerly under ``torch.profiler`` (kernels per update, the device's kernel time
per update, the 25 heaviest operations), then the eager update alone, then the captured update replayed alone
(as ``benchmarks/throughput.py``'s "captured update alone") with matmuls at torch's default ``"highest"`` precision
and at ``"high"`` (TF32, through :class:`~lightning_gan.MatmulPrecision`), twice each, interleaved. On an H200 the
captured update of ``configs/mnist.yaml`` replays in 573 µs: its 138 kernels' own 517 µs, plus under half a
microsecond between kernels; float32 matrix products at batch 100 are over half of the kernels' time
(``results/h200_update_profile.md``), and TF32 is what shortens them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from unittest import mock

import torch
from lightning.pytorch import Callback
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import DATA_ROOT, bench_trainer, sync  # noqa: E402
from throughput import FAST_PATH, load, replay_steps_per_s  # noqa: E402

from lightning_gan.graphed import CudaGraphRunner  # noqa: E402

PROFILED = 20


class KernelProfile(Callback):
    """At the end of a short fit: the fast path's update run eagerly, profiled, then timed."""

    def on_train_end(self, trainer, gan) -> None:
        cuda = gan.device.type == "cuda"
        real = trainer.datamodule.splits.train.images[: trainer.datamodule.batch_size].to(gan.device)
        for _ in range(5):
            gan.graph_runner.body(real, True)
        sync(gan.device)
        with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
            for _ in range(PROFILED):
                gan.graph_runner.body(real, True)
            sync(gan.device)
        # the GPU's user annotations (``Optimizer.step#SGD.step``) are device events too, but no kernels
        kernels = [
            e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation
        ]
        kernel_us = sum(e.device_time for e in kernels) / PROFILED
        print(f"  kernels per update {len(kernels) / PROFILED:.1f}, kernel time per update {kernel_us:.1f} us")
        print(prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=25))
        start = time.perf_counter()
        for _ in range(200):
            gan.graph_runner.body(real, True)
        sync(gan.device)
        print(f"  eager update alone {200 / (time.perf_counter() - start):.1f} steps/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=DATA_ROOT)
    parser.add_argument(
        "--configs", type=Path, nargs="+", default=[ROOT / "configs" / f"{c}.yaml" for c in ("mnist", "mnist_fast")]
    )
    parser.add_argument("--fit-steps", type=int, default=30, help="training steps before profiling")
    parser.add_argument("--replays", type=int, default=2000, help="timed replays per precision (CUDA only)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    for config in args.configs:
        print(config.relative_to(ROOT) if config.is_relative_to(ROOT) else config, flush=True)
        cli = load(config, args.data_dir, *FAST_PATH)
        # off CUDA, the same update run eagerly
        with mock.patch.object(CudaGraphRunner, "requires_cuda", args.device == "cuda"):
            bench_trainer(args.device, [KernelProfile()], max_steps=args.fit_steps).fit(
                cli.model, datamodule=cli.datamodule
            )
        if args.device != "cuda":
            continue
        measure = (config, args.data_dir, args.replays, 100, args.device, *FAST_PATH)
        for tf32 in (False, True, False, True):
            steps_per_s = replay_steps_per_s(*measure, tf32=tf32)
            print(f"  replay alone, matmul precision {'high' if tf32 else 'highest'}: {steps_per_s:.1f} steps/s")


if __name__ == "__main__":
    main()
