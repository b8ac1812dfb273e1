"""Table 1's TFD number: a trained model's Parzen log-likelihood on each of TFD's five folds, and their mean ± SE.

    python benchmarks/tfd_folds.py --config configs/tfd.yaml --ckpt-path path/to.ckpt --data-dir DIR

The paper reports TFD as the mean over the five folds with the standard error across folds, sigma chosen per fold on
that fold's validation set. For each fold this runs ``test`` with :class:`~lightning_gan.ParzenEvaluation` (10,000
samples; sigma from ``logspace(-1, 0, 10)`` on the fold's whole valid set, as the authors' ``parzen_ll.py -f FOLD``;
the mean LL of the fold's test rows ± its standard error across them), then combines the folds: their mean, and the
standard error across them (numpy ``std`` with ``ddof=0``, as the authors' script takes it across examples, divided
by the square root of 5). The unlabeled rows that ``configs/tfd.yaml`` trains on are the same in every fold, so one
model serves all five; a model trained on a fold's labelled rows (``tfd_train_set`` ``train``/``full_train``) has
seen other folds' test rows, so then give one checkpoint per fold, in fold order. Writes ``<out>/tfd_folds.csv`` and
``.md``. Extra LightningCLI flags (e.g. the network sizes a checkpoint was trained with) go after ``--``.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from pathlib import Path

import torch

from lightning_gan import ParzenEvaluation
from lightning_gan.datasets import TFD_FOLDS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import bench_trainer, load_cli, resolve_accelerator  # noqa: E402

COLUMNS = ["fold", "sigma", "test_examples", "test_ll", "test_se"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "tfd.yaml")
    parser.add_argument(
        "--ckpt-path", type=Path, nargs="+", required=True, help="one checkpoint for every fold, or one per fold"
    )
    parser.add_argument("--data-dir", type=Path, required=True, help="the folder that holds TFD_48x48.mat")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--num-samples", type=int, default=10_000)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("cli_overrides", nargs="*", help="extra LightningCLI flags")
    return parser.parse_args(argv)


def trained_on(path: Path, default: str) -> str:
    """The TFD rows a checkpoint's model trained on, as its datamodule recorded them (else ``default``)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # the weights stay on disk
    return (checkpoint.get("datamodule_hyper_parameters") or {}).get("tfd_train_set", default)


def checkpoints_per_fold(paths: list[Path], config_train_set: str) -> list[Path]:
    """The checkpoint each fold is evaluated with; refuses one shared model that has seen labelled rows."""
    if len(paths) not in (1, TFD_FOLDS):
        raise SystemExit(f"Give one checkpoint, or one per fold ({TFD_FOLDS}), but got {len(paths)}.")
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise SystemExit(f"No checkpoint at {', '.join(missing)}.")
    if len(paths) == 1 and (train_set := trained_on(paths[0], config_train_set)) != "unlabeled":
        raise SystemExit(
            f"The model trained on fold rows ({train_set!r}), which are other folds' test rows: give one checkpoint "
            f"per fold (--ckpt-path fold0.ckpt ... fold{TFD_FOLDS - 1}.ckpt), or evaluate a model trained on the "
            "unlabeled rows."
        )
    return paths * TFD_FOLDS if len(paths) == 1 else paths


def across_folds(test_lls: list[float]) -> tuple[float, float]:
    """The mean over folds and its standard error across them (``ddof=0``)."""
    return statistics.fmean(test_lls), statistics.pstdev(test_lls) / math.sqrt(len(test_lls))


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    """Evaluate every fold; returns one row per fold."""
    args = parse_args(argv)
    accelerator = resolve_accelerator(args.accelerator)
    rows: list[dict[str, float]] = []
    ckpt_paths: list[Path] = []
    for fold in range(TFD_FOLDS):
        cli = load_cli(args.config, args.data_dir, f"--data.init_args.fold={fold}", *args.cli_overrides)
        if cli.datamodule.dataset != "tfd":
            raise SystemExit(f"{args.config} trains on {cli.datamodule.dataset!r}: give a TFD config.")
        ckpt_paths = ckpt_paths or checkpoints_per_fold(args.ckpt_path, cli.datamodule.tfd_train_set)
        ckpt_path = ckpt_paths[fold]
        parzen = ParzenEvaluation(num_samples=args.num_samples, val_size=None)  # the fold's whole valid set
        trainer = bench_trainer(accelerator, [parzen], limit_test_batches=1)  # the Parzen number reads all test rows
        trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path, verbose=False)
        rows.append(
            {
                "fold": fold,
                "sigma": round(parzen.sigma, 4),
                "test_examples": len(cli.datamodule.splits.test.images),
                "test_ll": round(parzen.test_ll, 2),
                "test_se": round(parzen.test_se, 2),
            }
        )
    write_tables(args, rows)
    return rows


def write_tables(args: argparse.Namespace, rows: list[dict[str, float]]) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "tfd_folds.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    mean, se = across_folds([row["test_ll"] for row in rows])
    lines = [
        f"# TFD, {args.config.name}: Parzen log-likelihood per fold",
        "",
        f"Checkpoints: {', '.join(map(str, args.ckpt_path))}. Flags: {' '.join(args.cli_overrides) or 'none'}.",
        "",
        f"{args.num_samples} samples; sigma chosen on each fold's valid set from logspace(-1, 0, 10).",
        "",
        "| fold | sigma | test examples | test LL ± SE (across examples) |",
        "|---|---|---|---|",
        *(f"| {r['fold']} | {r['sigma']} | {r['test_examples']} | {r['test_ll']} ± {r['test_se']} |" for r in rows),
        "",
        f"Mean over folds: {mean:.2f} ± {se:.2f} (standard error across folds; the paper: 2057 ± 26).",
    ]
    text = "\n".join(lines) + "\n"
    (args.out / "tfd_folds.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
