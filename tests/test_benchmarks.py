"""The benchmark scripts run end to end on a tiny budget (their figures are measured, never asserted)."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reproduce_mnist_writes_its_tables(mnist_root: Path, tmp_path: Path) -> None:
    rows = load_script("reproduce_mnist").main(
        [
            f"--data-dir={mnist_root}", f"--out={tmp_path}", "--max-epochs=2", "--eval-every=1",
            "--limit-train-batches=3", "--num-samples=300", "--val-size=50", "--test-size=80", "--accelerator=cpu",
            "--", "--model.init_args.generator.init_args.hidden_sizes=[16,16]",
            "--model.init_args.discriminator.init_args.units=[8,8]",
        ]
    )  # fmt: skip
    assert [row["epoch"] for row in rows] == [1, 2]
    with open(tmp_path / "reproduce_mnist.csv") as f:
        written = list(csv.DictReader(f))
    assert [float(r["test_ll"]) for r in written] == [row["test_ll"] for row in rows]
    assert all(0.1 <= float(r["sigma"]) <= 1.0 for r in written)  # chosen from the paper's grid
    markdown = (tmp_path / "reproduce_mnist.md").read_text()
    assert "Selected by validation LL" in markdown
    assert "Flags: --model.init_args.generator.init_args.hidden_sizes=[16,16]" in markdown
    assert (tmp_path / "reproduce_mnist_samples.png").stat().st_size > 0
