"""Advice that fits: with ``--ckpt_path``, the checkpoint's own model settings win, and the CLI says so."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_NETS

from lightning_gan import GANDataModule
from lightning_gan.ckpt_settings import changed_settings
from lightning_gan.cli import build_cli
from lightning_gan.datasets import Split, Splits

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class SmallImages(GANDataModule):
    """4 x 4 images of one's own (``load_splits``), for networks of another shape than MNIST's."""

    def load_splits(self) -> Splits:
        generator = torch.Generator().manual_seed(0)

        def split(n: int) -> Split:
            return Split(torch.rand(n, 1, 4, 4, generator=generator), torch.zeros(n, dtype=torch.long))

        return Splits(split(400), split(100), split(100))


def common(root: Path, *extra: str, config: Path = CONFIGS / "mnist.yaml") -> list[str]:
    return [
        "--config", str(config), f"--trainer.default_root_dir={root}", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu", *TINY_NETS, *extra,
    ]  # fmt: skip


def without_sample_quality(root: Path) -> Path:
    """configs/mnist.yaml without its SampleQuality, whose MNIST classifier refuses 4 x 4 images."""
    config = yaml.safe_load((CONFIGS / "mnist.yaml").read_text())
    callbacks = config["trainer"]["callbacks"]
    config["trainer"]["callbacks"] = [c for c in callbacks if c["class_path"] != "lightning_gan.SampleQuality"]
    root.mkdir(parents=True, exist_ok=True)
    (path := root / "mnist_small.yaml").write_text(yaml.safe_dump(config))
    return path


def small_checkpoint(root: Path) -> Path:
    shapes = ["--model.init_args.discriminator.init_args.in_shape=[1,4,4]"]
    shapes += ["--model.init_args.generator.init_args.out_shape=[1,4,4]"]
    data = ["--data=test_advice.SmallImages", "--data.init_args.dataset=small", f"--data.init_args.data_dir={root}"]
    config = without_sample_quality(root)
    build_cli(
        ["fit", *common(root, *shapes, *data, config=config), "--trainer.max_steps=2", "--trainer.limit_val_batches=0"]
    )
    return next(root.rglob("*.ckpt"))


def test_a_checkpoint_for_other_images_names_the_checkpoint_not_a_key_already_set(
    mnist_root: Path, tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    ckpt = small_checkpoint(tmp_path / "small")
    mnist = [f"--data.init_args.data_dir={mnist_root}", "--data.init_args.download=false"]
    args = ["validate", *common(tmp_path / "eval", *mnist), f"--ckpt_path={ckpt}"]
    with pytest.raises(
        ValueError, match=r"built for images of shape \(1, 4, 4\), but the data's are \(1, 28, 28\)"
    ) as e:
        build_cli(args)
    assert f"the checkpoint {ckpt} holds networks for (1, 4, 4) images" in str(e.value)
    assert "set `model.init_args" not in str(e.value)  # the config sets in_shape to [1, 28, 28] already
    (warning,) = [str(w.message) for w in recwarn if "hyper_parameters" in str(w.message)]
    assert "model.init_args.discriminator.init_args.in_shape: [1, 28, 28] -> [1, 4, 4]" in warning


def test_flags_that_a_checkpoint_overrides_are_named_once(
    mnist_root: Path, tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    mnist = [f"--data.init_args.data_dir={mnist_root}", "--data.init_args.download=false"]
    build_cli(["fit", *common(tmp_path, *mnist), "--trainer.max_steps=2", "--trainer.limit_val_batches=0"])
    ckpt = next(tmp_path.rglob("*.ckpt"))
    evaluate = ["validate", *common(tmp_path, *mnist), f"--ckpt_path={ckpt}", "--trainer.limit_val_batches=1"]
    build_cli(evaluate)  # the settings it was trained with: nothing to say
    assert not [w for w in recwarn if "hyper_parameters" in str(w.message)]
    build_cli([*evaluate, "--model.init_args.k=3", "--model.init_args.generator.init_args.hidden_sizes=[4,4]"])
    (warning,) = [str(w.message) for w in recwarn if "hyper_parameters" in str(w.message)]
    assert f"--ckpt_path {ckpt}: the checkpoint's own model settings (its hyper_parameters) win" in warning
    assert "model.init_args.k: 3 -> 1" in warning
    assert "model.init_args.generator.init_args.hidden_sizes: [4, 4] -> [16, 16]" in warning


def test_changed_settings_lists_only_values_that_differ() -> None:
    given = {"init_args": {"k": 3, "generator": {"init_args": {"hidden_sizes": [4]}}, "lr_decay": 1.0}}
    used = {"init_args": {"k": 1, "generator": {"init_args": {"hidden_sizes": [4]}}, "lr_decay": 1.0, "new": 2}}
    assert changed_settings(given, used) == [("model.init_args.k", 3, 1)]
