"""SampleQuality's cost against ParzenEvaluation's, side by side in one run, on real MNIST and this machine.

Both evaluate 10,000 samples of configs/quickstart.yaml's generator (freshly initialised: the cost does not depend on
the weights) through the callbacks' own code: Parzen selects sigma on 1,000 validation images and evaluates the
10,000 test images (what `lightning-gan test` runs); SampleQuality computes FID, KID, precision/recall and the
classifier score against the 10,000 test images. "first" includes the reference features (a new callback), "steady"
reuses them (every later evaluation). Repeats alternate the methods; medians are reported.
Usage: python benchmarks/quality.py [--mnist-root DIR] [--repeats 3] [--out benchmarks/results/cpu_quality.md]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from bench_common import DATA_ROOT, load_cli

from lightning_gan import ParzenEvaluation, ParzenLogLikelihood, SampleQuality, select_sigma
from lightning_gan.datasets import load_mnist

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def parzen(trainer: SimpleNamespace, gan: torch.nn.Module) -> float:
    """ParzenEvaluation's test-time number, as its ``on_test_epoch_end`` computes it (without the logging)."""
    callback = ParzenEvaluation()
    centres = callback.centres(trainer, gan)
    callback.select(trainer, gan, centres)
    metric = ParzenLogLikelihood(centres, callback.sigma)
    for batch in trainer.datamodule.splits.test.images.split(1000):
        metric.update(batch)
    return float(metric.compute()[0])


def floor(root: Path) -> None:
    """The numbers of real data: train[:10000] as the samples, against the test split (Parzen: sigma on val[:1000])."""
    splits = load_mnist(root, download=False)
    centres = splits.train.images[:10000].flatten(1)
    sigma, _ = select_sigma(splits.val.images[:1000].flatten(1), centres)
    metric = ParzenLogLikelihood(centres, sigma)
    for batch in splits.test.images.split(1000):
        metric.update(batch)
    mean, se = metric.compute()
    print(f"Parzen test LL {float(mean):.1f} ± {float(se):.1f} (sigma {sigma:.4f})")
    print(SampleQuality().measure("test", splits.test.images, list(splits.train.images[:10000].split(500))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mnist-root", type=Path, default=DATA_ROOT)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--floor", action="store_true", help="only the real-data floor: train[:10000] as samples")
    args = parser.parse_args()
    if args.floor:
        floor(args.mnist_root)
        return
    torch.manual_seed(0)
    gan = load_cli(CONFIG, args.mnist_root).model.eval()
    trainer = SimpleNamespace(world_size=1, global_rank=0, global_step=0, datamodule=SimpleNamespace(
        splits=load_mnist(args.mnist_root, download=False), dataset_name="MNIST"))  # fmt: skip
    times: dict[str, list[float]] = {"parzen": [], "quality_first": [], "quality_steady": []}
    steady = SampleQuality()
    steady.evaluate(trainer, gan, "test")  # its reference features, once
    for _ in range(args.repeats):
        for name, run in (
            ("parzen", lambda: parzen(trainer, gan)),
            ("quality_first", lambda: SampleQuality().evaluate(trainer, gan, "test")),
            ("quality_steady", lambda: steady.evaluate(trainer, gan, "test")),
        ):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
            print(f"{name}: {times[name][-1]:.2f} s", flush=True)
    med = {name: statistics.median(t) for name, t in times.items()}
    base = times["parzen"]
    paired = {name: statistics.median(a / b for a, b in zip(t, base, strict=True)) for name, t in times.items()}
    rows = [
        "| evaluation (10,000 samples, MNIST test) | median s | runs (s) | ratio of medians | median paired ratio |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {med[name]:.2f} | {', '.join(f'{t:.2f}' for t in runs)} | {med[name] / med['parzen']:.2f} "
            f"| {paired[name]:.2f} |"
            for name, runs in times.items()
        ),
    ]
    threads = torch.get_num_threads()
    text = "\n".join(rows) + f"\n\ntorch {torch.__version__}, {threads} threads, {args.repeats} repeats.\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
