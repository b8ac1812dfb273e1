"""The benchmark scripts run end to end on a tiny budget (their figures are measured, never asserted)."""

from __future__ import annotations

import csv
import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_NETS
from test_datasets import tfd_arrays, write_tfd

from lightning_gan.cli import build_cli

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
CONFIGS = BENCHMARKS.parent / "configs"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_config(folder: Path) -> Path:
    """``configs/mnist.yaml`` with toy networks, written into ``folder``."""
    config = yaml.safe_load((CONFIGS / "mnist.yaml").read_text())
    config["model"]["init_args"]["generator"]["init_args"]["hidden_sizes"] = [16, 16]
    config["model"]["init_args"]["discriminator"]["init_args"]["units"] = [8, 8]
    (folder / "tiny.yaml").write_text(yaml.safe_dump(config))
    return folder / "tiny.yaml"


def test_reproduce_mnist_writes_its_tables(mnist_root: Path, tmp_path: Path) -> None:
    rows = load_script("reproduce_mnist").main(
        [
            f"--data-dir={mnist_root}", f"--out={tmp_path}", "--max-epochs=2", "--eval-every=1",
            "--limit-train-batches=3", "--num-samples=300", "--val-size=50", "--test-size=80", "--accelerator=cpu",
            "--matmul-precision=medium", "--", *TINY_NETS,
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
    assert "Float32 matmul precision: medium." in markdown  # the run's, put back after it:
    assert torch.get_float32_matmul_precision() == "highest"
    assert (tmp_path / "reproduce_mnist_samples.png").stat().st_size > 0


def test_tfd_folds_evaluates_each_fold_and_combines_them(tmp_path: Path) -> None:
    write_tfd(tmp_path)
    common = [
        f"--data.init_args.data_dir={tmp_path}", "--data.init_args.batch_size=10", "--trainer.logger=false",
        "--trainer.accelerator=cpu", *TINY_NETS, "--model.init_args.generator.init_args.output_sparse_init=10",
    ]  # fmt: skip

    def fit(run: str, *extra: str) -> Path:
        build_cli(
            ["fit", f"--config={CONFIGS / 'tfd.yaml'}", *common, f"--trainer.default_root_dir={tmp_path / run}",
             "--trainer.max_steps=2", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false", *extra]
        )  # fmt: skip
        (checkpoint,) = (tmp_path / run).rglob("*.ckpt")
        return checkpoint

    checkpoint = fit("unlabeled")
    script = load_script("tfd_folds")
    flags = [f"--ckpt-path={checkpoint}", f"--data-dir={tmp_path}", f"--out={tmp_path}", "--num-samples=200"]
    rows = script.main([*flags, "--accelerator=cpu", "--", *common[4:]])

    folds = tfd_arrays()["folds"]
    assert [row["fold"] for row in rows] == [0, 1, 2, 3, 4]
    assert [row["test_examples"] for row in rows] == [int((folds[:, k] == 3).sum()) for k in range(5)]
    assert all(0.1 <= row["sigma"] <= 1.0 for row in rows)  # each chosen from the paper's grid
    lls = [row["test_ll"] for row in rows]
    mean, se = script.across_folds(lls)
    assert mean == pytest.approx(np.mean(lls)) and se == pytest.approx(np.std(lls) / np.sqrt(5))
    with open(tmp_path / "tfd_folds.csv") as f:
        assert [float(r["test_ll"]) for r in csv.DictReader(f)] == lls
    assert f"Mean over folds: {mean:.2f} ± {se:.2f}" in (tmp_path / "tfd_folds.md").read_text()

    # a model trained on one fold's labelled rows has seen other folds' test rows (the checkpoint says so)
    labelled = fit("labelled", "--data.init_args.tfd_train_set=train")
    with pytest.raises(SystemExit, match="one checkpoint per fold"):
        script.main([f"--ckpt-path={labelled}", *flags[1:], "--", *common[4:]])


def table_rows(printed: str) -> dict[str, list[str]]:
    """The rows of the markdown table a script printed: first cell -> the other cells (header and rule left out)."""
    lines = [line for line in printed.splitlines() if line.startswith("| ") and line.endswith(" |")]
    rows = {cells[0]: cells[1:] for cells in (line[2:-2].split(" | ") for line in lines[1:])}
    assert lines[0].startswith("| ") and not any(name.startswith("---") for name in rows), printed
    return rows


def test_throughput_times_every_variant(
    mnist_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--device=cpu", "--steps=10", "--warmup=10", "--repeats=1", "--stack=10"]
    argv = ["throughput.py", f"--config={tiny_config(tmp_path)}", f"--data-dir={mnist_root}", *flags]
    monkeypatch.setattr(sys, "argv", argv)
    load_script("throughput").main()
    printed = capsys.readouterr().out
    fast, loop = "lightning-gan fast path", "lightning-gan loop only"
    variants = [
        "plain (same math)",
        "lightning-gan",
        "lightning-gan, device-resident data",
        fast,
        f"{fast}, metrics every 500 steps",
        f"{fast}, 10 steps per batch",
        f"{fast}, 10 steps per batch, metrics every 500 steps",
        loop,
        f"{loop}, 10 steps per batch",
    ]  # and no TF32 rows nor "captured update alone" off CUDA
    rows = table_rows(printed)
    assert list(rows) == variants, printed
    assert all(float(median) > 0 and float(median) == float(runs) for median, runs in rows.values()), printed
    for name in (
        "lightning-gan",
        fast,
        f"{fast}, 10 steps per batch",
        f"{fast}, 10 steps per batch, metrics every 500 steps",
    ):
        assert re.search(rf"^{re.escape(name)} / plain \(same math\): \d+\.\d\dx", printed, re.M), printed


def test_update_profile_profiles_and_times_the_update(
    mnist_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["update_profile.py", f"--configs={tiny_config(tmp_path)}", f"--data-dir={mnist_root}", "--fit-steps=4"]
    monkeypatch.setattr(sys, "argv", [*argv, "--device=cpu"])
    load_script("update_profile").main()
    printed = capsys.readouterr().out
    assert re.search(r"^  kernels per update 0\.0, kernel time per update 0\.0 us$", printed, re.M), printed  # no CUDA
    # 20 profiled updates of 9 layers each: the generator's 3, the discriminator's 3 on the real and the fake batch
    assert re.search(r"aten::addmm .* 180 *$", printed, re.M), printed
    assert re.search(r"^  eager update alone \d+\.\d steps/s$", printed, re.M), printed
    assert "replay alone" not in printed  # CUDA only


def test_parzen_benchmark_compares_every_method(
    mnist_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["parzen.py", "--quick", f"--mnist-root={mnist_root}", "--device=cpu"])
    load_script("parzen").main()
    printed = capsys.readouterr().out
    methods = [
        "ours",
        "float64 direct (matmul form, full matrices)",
        "authors' algorithm (B=100 x M x D diffs, float32)",
    ]
    if importlib.util.find_spec("sklearn") is not None:
        methods.append("scikit-learn KernelDensity (gaussian)")
    rows = table_rows(printed)
    assert list(rows) == methods, printed
    assert all(float(cells[0]) > 0 for cells in rows.values()), printed  # protocol time (s)
    assert rows["float64 direct (matmul form, full matrices)"][4] == "0.0e+00"  # the reference itself
    assert float(rows["ours"][4]) < 1e-2  # max abs error (nats) against float64, on log-likelihoods of ~1000 nats
    sigmas = re.search(r"^sigma chosen: ours ([\d.]+), float64 ([\d.]+);", printed, re.M)
    assert sigmas and sigmas.group(1) == sigmas.group(2), printed
