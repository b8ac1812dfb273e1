"""Reproduce Table 1 (MNIST): train a config for a time or epoch budget, evaluating the paper's Parzen protocol.

    python benchmarks/reproduce_mnist.py --config configs/mnist.yaml --data-dir data --minutes 8

Every ``--eval-every`` epochs: 10,000 samples from the generator; sigma chosen on 1,000 validation images over
logspace(-1, 0, 10); then the mean log-likelihood (± standard error, numpy ddof=0) of the 10,000 test images. Writes
``<out>/reproduce_<name>.csv`` and ``.md`` after every evaluation (so an interrupted run keeps its table), with
epoch, training wall time (evaluation excluded), steps/s, sigma, validation LL and test LL ± SE, and
``reproduce_<name>_samples.png``: 100 samples of the best model so far. The row reported as the result is the one
with the best *validation* LL: the test set picks nothing. Extra LightningCLI flags go after ``--``, e.g. the GPU
fast path: ``-- --data.init_args.device_resident=true --model.init_args.cuda_graph=true``.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback
from torchvision.utils import save_image

from lightning_gan.nets import eval_forward
from lightning_gan.parzen import parzen_log_likelihood, select_sigma
from lightning_gan.sampling import sampling_generator, seeded_noise

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import DATA_ROOT, bench_trainer, load_cli, resolve_accelerator, sync  # noqa: E402

COLUMNS = ["epoch", "train_seconds", "steps_per_s", "sigma", "val_ll", "test_ll", "test_se"]


class ParzenTable(Callback):
    """Evaluates the Parzen protocol every ``every`` epochs and rewrites the CSV/markdown tables."""

    def __init__(self, args: argparse.Namespace, out_stem: Path, hardware: str) -> None:
        self.args, self.out_stem, self.hardware = args, out_stem, hardware
        self.rows: list[dict[str, float]] = []
        self.train_seconds = 0.0
        self.evaluated_at_step = -1

    def on_train_start(self, trainer, pl_module) -> None:
        self.precision = torch.get_float32_matmul_precision()  # the run's (after MatmulPrecision's setup)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        sync(pl_module.device)
        self.epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        sync(pl_module.device)
        self.train_seconds += time.perf_counter() - self.epoch_start
        epoch = trainer.current_epoch + 1
        if epoch % self.args.eval_every == 0 or epoch == trainer.max_epochs:
            self.evaluate(trainer, pl_module, epoch)

    def on_train_end(self, trainer, pl_module) -> None:
        # a time budget can end training mid-epoch: evaluate the final weights too
        if trainer.global_step != self.evaluated_at_step:
            # a part epoch: counted in epochs of training steps (a batch holds `steps_per_batch` of them)
            steps_per_epoch = trainer.num_training_batches * getattr(trainer.datamodule, "steps_per_batch", 1)
            self.evaluate(trainer, pl_module, round(trainer.global_step / steps_per_epoch, 2))

    @torch.no_grad()
    def evaluate(self, trainer, pl_module, epoch: float) -> None:
        dm = trainer.datamodule
        generator = sampling_generator(pl_module)
        noise = seeded_noise(generator, self.args.num_samples, self.args.sample_seed, pl_module.device)
        samples = torch.cat([eval_forward(generator, chunk) for chunk in noise.split(1000)]).flatten(1)
        val = dm.splits.val.images[: self.args.val_size].flatten(1).to(samples.device)
        test = dm.splits.test.images[: self.args.test_size].flatten(1).to(samples.device)
        sigma, val_lls = select_sigma(val, samples)
        test_ll = parzen_log_likelihood(test, samples, sigma).double()
        row = {
            "epoch": epoch,
            "train_seconds": round(self.train_seconds, 2),
            "steps_per_s": round(trainer.global_step / max(self.train_seconds, 1e-9), 1),
            "sigma": round(float(sigma), 4),
            "val_ll": round(float(val_lls.max()), 2),
            "test_ll": round(test_ll.mean().item(), 2),
            "test_se": round((test_ll.std(correction=0) / len(test_ll) ** 0.5).item(), 2),
        }
        if not self.rows or row["val_ll"] > max(r["val_ll"] for r in self.rows):
            images = dm.to_display(samples[:100].view(-1, *dm.splits.val.images.shape[1:])).cpu()
            self.out_stem.parent.mkdir(parents=True, exist_ok=True)
            save_image(images, self.out_stem.with_name(self.out_stem.name + "_samples.png"), nrow=10)
        self.rows.append(row)
        self.evaluated_at_step = trainer.global_step
        print(" | ".join(f"{k} {v}" for k, v in row.items()), flush=True)
        self.write()

    def write(self) -> None:
        self.out_stem.parent.mkdir(parents=True, exist_ok=True)
        with open(self.out_stem.with_suffix(".csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(self.rows)
        best = max(self.rows, key=lambda r: r["val_ll"])
        lines = [
            f"# {self.args.config.name} on {self.hardware}",
            "",
            f"Flags: {' '.join(self.args.cli_overrides) or 'none'}. Float32 matmul precision: {self.precision}.",
            "",
            f"Parzen protocol: {self.args.num_samples} samples, sigma from {self.args.val_size} validation images, "
            f"{self.args.test_size} test images.",
            "",
            "| epoch | train time (s) | steps/s | sigma | val LL | test LL ± SE |",
            "|---|---|---|---|---|---|",
            *(
                f"| {r['epoch']} | {r['train_seconds']} | {r['steps_per_s']} | {r['sigma']} | {r['val_ll']} | "
                f"{r['test_ll']} ± {r['test_se']} |"
                for r in self.rows
            ),
            "",
            f"Selected by validation LL: epoch {best['epoch']}, test LL {best['test_ll']} ± {best['test_se']}.",
        ]
        self.out_stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "mnist.yaml")
    parser.add_argument("--data-dir", type=Path, default=DATA_ROOT)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--name", default=None, help="names the output files (default: the config's name)")
    parser.add_argument(
        "--minutes", type=float, default=None, help="wall-clock budget of the fit, evaluations included (max_time)"
    )
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--eval-every", type=int, default=10, help="epochs between evaluations")
    parser.add_argument("--num-samples", type=int, default=10_000)
    parser.add_argument("--val-size", type=int, default=1_000)
    parser.add_argument("--test-size", type=int, default=10_000)
    parser.add_argument("--sample-seed", type=int, default=1234)
    parser.add_argument("--limit-train-batches", type=float, default=1.0, help="for smoke runs")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument(
        "--matmul-precision",
        choices=["highest", "high", "medium"],
        default=None,
        help="float32 matmul precision of the run (lightning_gan.MatmulPrecision; high: TF32); default: torch's own",
    )
    parser.add_argument("cli_overrides", nargs="*", help="extra LightningCLI flags, e.g. --model.init_args.k=2")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    """Run the reproduction; returns the table's rows."""
    args = parse_args(argv)
    if args.minutes is None and args.max_epochs is None:
        raise SystemExit("Give a budget: --minutes and/or --max-epochs.")
    cli = load_cli(args.config, args.data_dir, *args.cli_overrides)
    accelerator = resolve_accelerator(args.accelerator)
    threads = torch.get_num_threads()
    hardware = torch.cuda.get_device_name() if accelerator == "gpu" else f"CPU, {threads} thread{'s' * (threads > 1)}"
    table = ParzenTable(args, args.out / f"reproduce_{args.name or args.config.stem}", hardware)
    trainer = bench_trainer(
        accelerator,
        [table],
        args.matmul_precision,
        max_epochs=args.max_epochs if args.max_epochs is not None else -1,
        max_time={"minutes": args.minutes} if args.minutes is not None else None,
        limit_train_batches=args.limit_train_batches,
        log_every_n_steps=cli.config.get("trainer.log_every_n_steps") or 50,  # the config's (no logger is attached)
    )
    trainer.fit(cli.model, datamodule=cli.datamodule)
    print(table.out_stem.with_suffix(".md").read_text())
    return table.rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
