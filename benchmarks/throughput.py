"""Training throughput of a config through lightning-gan against plain PyTorch loops doing the same math.

    python benchmarks/throughput.py --config configs/mnist.yaml --data-dir data

Prints steps/s (training batches per second, median of ``--repeats`` interleaved runs) of:

* ``plain (same math)``: a hand-written loop with the same update as ``GAN`` on one device in the config's schedule
  (for the simultaneous one, the authors' graph: one pass of D on the fake batch, each network's gradient from its
  own objective), with the paper's optimizer (SGD, lr .1, momentum .5, the lr decay; no momentum ramp): the same
  math for ``configs/mnist.yaml``, not for configs with other optimizers,
* ``lightning-gan``: ``Trainer.fit`` of the config's model and datamodule (metrics logged, no logger attached),
* ``lightning-gan, device-resident data``: the same with ``data.init_args.device_resident=true`` (batches gathered
  on the training device, no host-to-device copy per step),
* ``lightning-gan fast path``: device-resident data and ``model.init_args.cuda_graph=true`` (each batch's update
  replayed as one CUDA graph; on a CPU this is the eager update),
* ``lightning-gan fast path, metrics every 500 steps``: the same with ``log_every_n_steps=500`` instead of
  Lightning's 50 (each logging step costs Lightning milliseconds of host time),
* ``lightning-gan fast path, 10 steps per batch``: the same with ``data.init_args.steps_per_batch=10`` (``--stack``):
  ten minibatches per Lightning batch, so that Lightning's own per-batch cost is paid once per ten steps,
* ``lightning-gan fast path, 10 steps per batch, metrics every 500 steps``: both of the above, the fastest full-float32
  setting; on CUDA also ``..., TF32 matmuls``: the same with :class:`~lightning_gan.MatmulPrecision` ``("high")``,
* ``lightning-gan loop only``: the fast path with the update itself left out (a no-op returning fixed statistics):
  what Lightning's loop, the data loader and the package's bookkeeping cost the host per step, the ceiling of the
  fast path on this machine's host; ``..., 10 steps per batch``: the same with the batches stacked,
* ``..., compiled networks`` (CUDA only): the fastest setting (and its TF32 twin, and the captured update alone) with
  :class:`~lightning_gan.CompileNetworks`: the networks' forward passes compiled by ``torch.compile`` inside the
  captured update (the compilation happens in the warm-up steps, before timing),
* ``captured update alone`` (CUDA only): the fast path's captured graph replayed in a bare Python loop on one fixed
  batch, without Lightning or data: the device's time per update, the ceiling of the fast path on this GPU (and
  ``..., TF32 matmuls``),

and the ratios of lightning-gan and of its fast path to the same-math loop. Data sits in memory for every variant;
batch size comes from the config. Without MNIST files a synthetic dataset in the real format is used (said in the
output).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]

from bench_common import DATA_ROOT, bench_trainer, load_cli, sync  # noqa: E402

from lightning_gan import GAN, CompileNetworks  # noqa: E402
from lightning_gan.graphed import CudaGraphRunner, GraphedUpdates, graph_constants  # noqa: E402


class StepTimer(Callback):
    """Times training batches after ``warmup`` of them."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start: tuple[int, float] | None = None  # (global_step, time) when timing started

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.start is None and trainer.global_step >= self.warmup:  # steps may come several per batch
            sync(pl_module.device)
            self.start = (trainer.global_step, time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        sync(pl_module.device)
        assert self.start is not None, "training ended within the warm-up"
        self.steps_per_s = (trainer.global_step - self.start[0]) / (time.perf_counter() - self.start[1])


@contextlib.contextmanager
def update_left_out(gan: GAN) -> Iterator[None]:
    """The fast path's loop and bookkeeping with a no-op update, run eagerly on any device."""
    stats: dict[torch.device, torch.Tensor] = {}  # made on the batch's device: no copy, no sync per step

    def no_update(real: torch.Tensor, generator_step: bool) -> torch.Tensor:
        if real.device not in stats:
            stats[real.device] = torch.zeros(4, device=real.device)
        return stats[real.device]

    with (
        mock.patch.object(
            CudaGraphRunner, "body", lambda runner, real, generator_step: no_update(real, generator_step)
        ),
        mock.patch.object(GraphedUpdates, "capturable", staticmethod(lambda real: False)),
        mock.patch.object(CudaGraphRunner, "requires_cuda", False),
        warnings.catch_warnings(),
    ):
        # the decays step while no optimizer does, which torch warns about
        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler.step\(\)` before")
        yield


def with_compile(callbacks: list[Callback], compiled: bool) -> list[Callback]:
    """``callbacks``, and :class:`~lightning_gan.CompileNetworks` where ``compiled``."""
    return [*callbacks, CompileNetworks()] if compiled else callbacks


FAST_PATH = ("--data.init_args.device_resident=true", "--model.init_args.cuda_graph=true")


def load(config: Path, data_dir: Path, *overrides: str):
    cli = load_cli(config, data_dir, *overrides)
    cli.datamodule.setup("fit")
    return cli


def lightning_steps_per_s(
    config: Path,
    data_dir: Path,
    steps: int,
    warmup: int,
    device: str,
    *overrides: str,
    loop_only: bool = False,
    log_every_n_steps: int = 50,
    tf32: bool = False,
    compiled: bool = False,
) -> float:
    cli = load(config, data_dir, *overrides)
    timer = StepTimer(warmup)
    precision = "high" if tf32 else None
    callbacks = with_compile([timer], compiled)
    trainer = bench_trainer(device, callbacks, precision, max_steps=steps + warmup, log_every_n_steps=log_every_n_steps)
    with update_left_out(cli.model) if loop_only else contextlib.nullcontext():
        trainer.fit(cli.model, datamodule=cli.datamodule)
    return timer.steps_per_s


class ReplayTimer(Callback):
    """Times the fast path's update replayed alone, at the end of training: before Lightning's teardown moves the
    model and the optimizers' state to the CPU (which leaves the captured graphs pointing at freed memory)."""

    def __init__(self, steps: int, warmup: int) -> None:
        self.steps, self.warmup = steps, warmup
        self.steps_per_s: float | None = None

    def on_train_end(self, trainer, gan) -> None:
        if gan.graph_runner is None or gan.graph_runner.graphs.captures == 0:
            raise RuntimeError(f"the fast path captured no graph in {self.warmup} warm-up steps")
        dm = trainer.datamodule
        real = dm.splits.train.images[: dm.batch_size].to(gan.device)
        # read now: the momentum ramp may have moved at the epoch's end (then the first calls recapture)
        constants = graph_constants([gan.trainer.optimizers[0], gan.trainer.optimizers[1]])
        for _ in range(self.warmup):
            gan.graph_runner(real, True, constants)
        sync(gan.device)
        start = time.perf_counter()
        for _ in range(self.steps):
            gan.graph_runner(real, True, constants)
        sync(gan.device)
        self.steps_per_s = self.steps / (time.perf_counter() - start)


def replay_steps_per_s(
    config: Path, data_dir: Path, steps: int, warmup: int, device: str, *overrides: str, tf32: bool = False,
    compiled: bool = False,
) -> float:  # fmt: skip
    """Fit the fast path until its update is captured, then time the graph's replays alone (CUDA only)."""
    cli = load(config, data_dir, *overrides)
    timer = ReplayTimer(steps, warmup)
    trainer = bench_trainer(device, with_compile([timer], compiled), "high" if tf32 else None, max_steps=warmup)
    trainer.fit(cli.model, datamodule=cli.datamodule)
    assert timer.steps_per_s is not None
    return timer.steps_per_s


def plain_steps_per_s(config: Path, data_dir: Path, steps: int, warmup: int, device: str) -> float:
    cli = load(config, data_dir)
    gan, dm = cli.model.to(device), cli.datamodule
    g, d = gan.generator, gan.discriminator
    g.init_output_bias(dm.pixel_mean())
    data = dm.splits.train.images.to(device)
    batch = dm.batch_size
    d_opt = torch.optim.SGD(d.parameters(), lr=0.1, momentum=0.5)
    g_opt = torch.optim.SGD(g.parameters(), lr=0.1, momentum=0.5)
    decays = [torch.optim.lr_scheduler.LambdaLR(o, lambda t: max(1.000004**-t, 1e-5)) for o in (d_opt, g_opt)]
    simultaneous = gan.schedule == "simultaneous"
    d_params = list(d.parameters())
    g_params = list(g.parameters())
    order = torch.randperm(len(data), device=device)
    for step in range(steps + warmup):
        if step == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        i = (step * batch) % (len(data) - batch + 1)
        real = data[order[i : i + batch]]
        z = g.sample_noise(batch, device)
        if simultaneous:
            fake = g(z)
            real_logits, fake_logits = d(real), d(fake)
            d_loss = 0.5 * (F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean())
            g_loss = F.softplus(-fake_logits).mean()
            d_grads = torch.autograd.grad(d_loss, d_params, retain_graph=True)
            g_grads = torch.autograd.grad(g_loss, g_params)
            for p, grad in zip(d_params + g_params, d_grads + g_grads):
                p.grad = grad
            d_opt.step()
            g_opt.step()
        else:
            with torch.no_grad():
                fake = g(z)
            d_loss = 0.5 * (F.softplus(-d(real)).mean() + F.softplus(d(fake)).mean())
            d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            d_opt.step()
            if (step + 1) % gan.k == 0:
                for p in d_params:
                    p.requires_grad_(False)
                g_loss = F.softplus(-d(g(g.sample_noise(batch, device)))).mean()
                for p in d_params:
                    p.requires_grad_(True)
                g_opt.zero_grad(set_to_none=True)
                g_loss.backward()
                g_opt.step()
        for decay in decays:
            decay.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "mnist.yaml")
    parser.add_argument("--data-dir", type=Path, default=DATA_ROOT)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stack", type=int, default=10, help="steps per batch of the stacked rows")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if (args.steps + args.warmup) % args.stack:
        parser.error(f"--steps + --warmup must be a multiple of --stack ({args.stack}): the stacked rows' max_steps")

    data_dir = args.data_dir
    if not (data_dir / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        from conftest import write_fake_mnist

        data_dir = write_fake_mnist(Path(tempfile.mkdtemp()))
        print(f"MNIST not found under {args.data_dir}: using synthetic data in the IDX format ({data_dir})")
    resident, fast, loop = "lightning-gan, device-resident data", "lightning-gan fast path", "lightning-gan loop only"
    fast_500, replay = "lightning-gan fast path, metrics every 500 steps", "captured update alone"
    per_batch = f", {args.stack} steps per batch"
    fast_stacked, loop_stacked = fast + per_batch, loop + per_batch
    fastest = f"{fast_stacked}, metrics every 500 steps"
    tf32, compiled = ", TF32 matmuls", ", compiled networks"
    cuda = args.device == "cuda"
    runs: dict[str, list[float]] = {
        "plain (same math)": [],
        "lightning-gan": [],
        resident: [],
        fast: [],
        fast_500: [],
        fast_stacked: [],
        fastest: [],
        # TF32 exists on CUDA only; compiling takes minutes of a CPU's time
        **({fastest + tf32: [], fastest + compiled: [], fastest + tf32 + compiled: []} if cuda else {}),
        loop: [],
        loop_stacked: [],
        **({replay: [], replay + tf32: [], replay + compiled: [], replay + tf32 + compiled: []} if cuda else {}),
    }

    def record(name: str, steps_per_s: float) -> None:
        # printed as measured too, so that a run cut short (a lease running out) still leaves its figures
        runs[name].append(steps_per_s)
        print(f"{name}: {steps_per_s:.1f} steps/s", flush=True)

    for _ in range(args.repeats):  # interleaved, so that drifts in machine load hit every variant alike
        torch.manual_seed(0)
        record("plain (same math)", plain_steps_per_s(args.config, data_dir, args.steps, args.warmup, args.device))
        torch.manual_seed(0)
        record("lightning-gan", lightning_steps_per_s(args.config, data_dir, args.steps, args.warmup, args.device))
        torch.manual_seed(0)
        record(
            resident, lightning_steps_per_s(args.config, data_dir, args.steps, args.warmup, args.device, FAST_PATH[0])
        )
        measure = (args.config, data_dir, args.steps, args.warmup, args.device, *FAST_PATH)
        torch.manual_seed(0)
        record(fast, lightning_steps_per_s(*measure))
        torch.manual_seed(0)
        record(fast_500, lightning_steps_per_s(*measure, log_every_n_steps=500))
        stacked = (*measure, f"--data.init_args.steps_per_batch={args.stack}")
        torch.manual_seed(0)
        record(fast_stacked, lightning_steps_per_s(*stacked))
        torch.manual_seed(0)
        record(fastest, lightning_steps_per_s(*stacked, log_every_n_steps=500))
        if cuda:
            torch.manual_seed(0)
            record(fastest + tf32, lightning_steps_per_s(*stacked, log_every_n_steps=500, tf32=True))
            for name, with_tf32 in ((fastest + compiled, False), (fastest + tf32 + compiled, True)):
                torch.manual_seed(0)
                try:
                    record(name, lightning_steps_per_s(*stacked, log_every_n_steps=500, tf32=with_tf32, compiled=True))
                except Exception as err:  # torch.compile's toolchain may be missing: report it, keep the table
                    print(f"{name}: not measured ({type(err).__name__}: {err})")
        record(loop, lightning_steps_per_s(*measure, loop_only=True))
        record(loop_stacked, lightning_steps_per_s(*stacked, loop_only=True))
        replays = [(replay + t + c, bool(t), bool(c)) for c in ("", compiled) for t in ("", tf32)]
        for name, with_tf32, with_compiled in replays if cuda else ():
            try:
                record(name, replay_steps_per_s(*measure, tf32=with_tf32, compiled=with_compiled))
            except Exception as err:  # a diagnostic row: report it, keep the table
                print(f"{name}: not measured ({type(err).__name__}: {err})")

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{args.config.name} on {device_name}: {args.steps} timed steps after {args.warmup}, {args.repeats} runs")
    print("| variant | steps/s (median) | runs |")
    print("|---|---|---|")
    for name, values in runs.items():
        if not values:
            continue
        print(f"| {name} | {statistics.median(values):.1f} | {', '.join(f'{v:.1f}' for v in values)} |")
    plain = statistics.median(runs["plain (same math)"])
    for name, target in (("lightning-gan", " (target >= 0.9x)"), (fast, ""), (fast_stacked, ""), (fastest, "")):
        print(f"{name} / plain (same math): {statistics.median(runs[name]) / plain:.2f}x{target}")
    if cuda:  # the target for the MNIST networks at batch 100 on an H100/H200
        candidates = (fastest, fastest + tf32, fastest + compiled, fastest + tf32 + compiled)
        best = max(candidates, key=lambda name: statistics.median(runs[name]) if runs[name] else 0.0)
        print(f"fastest lightning-gan setting: {statistics.median(runs[best]):.1f} steps/s ({best}; target >= 2000)")


if __name__ == "__main__":
    main()
