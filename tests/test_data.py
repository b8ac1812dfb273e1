"""GANDataModule over MNIST: the authors' split, value range, clear errors for missing or corrupt files."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import quiet_trainer
from lightning.pytorch import seed_everything

from lightning_gan import GAN, GANDataModule, MaxoutDiscriminator, MLPGenerator
from lightning_gan.datasets import MNIST_FILES


def test_mnist_split_shapes_and_range(mnist_root: Path) -> None:
    dm = GANDataModule("mnist", data_dir=mnist_root, batch_size=100, download=False)
    dm.setup("fit")
    assert (len(dm.splits.train), len(dm.splits.val), len(dm.splits.test)) == (50000, 10000, 10000)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (100, 1, 28, 28) and images.dtype == torch.float32 and labels.shape == (100,)
    assert images.min() >= 0 and images.max() <= 1
    assert len(dm.train_dataloader()) == 500 and len(dm.val_dataloader()) == 100 and len(dm.test_dataloader()) == 100
    # the per-pixel mean over the training split: the official training file's first 50,000 images
    raw = (mnist_root / "MNIST" / "raw" / "train-images-idx3-ubyte").read_bytes()[16 : 16 + 50000 * 784]
    train = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(50000, 1, 28, 28).double() / 255
    pixel_mean = dm.pixel_mean()
    assert pixel_mean.shape == (1, 28, 28) and pixel_mean.dtype == torch.float32
    torch.testing.assert_close(pixel_mean.double(), train.mean(dim=0), rtol=0, atol=1e-6)
    assert pixel_mean.min() == 0 < pixel_mean.max()  # blank corners, brighter centres: no constant


def test_val_is_the_tail_of_the_official_training_file(mnist_root: Path) -> None:
    raw = (mnist_root / "MNIST" / "raw" / "train-images-idx3-ubyte").read_bytes()[16:]
    image_50000 = torch.frombuffer(bytearray(raw[50000 * 784 : 50001 * 784]), dtype=torch.uint8).float() / 255
    dm = GANDataModule(data_dir=mnist_root, download=False)
    dm.setup()
    torch.testing.assert_close(dm.splits.val.images[0].flatten(), image_50000)


def copy_mnist(mnist_root: Path, tmp_path: Path) -> Path:
    shutil.copytree(mnist_root / "MNIST", tmp_path / "MNIST")
    return tmp_path / "MNIST" / "raw"


def test_missing_files_name_the_folder_and_the_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        GANDataModule(data_dir=tmp_path, download=False).prepare_data()
    message = str(error.value)
    assert str((tmp_path / "MNIST" / "raw").resolve()) in message
    assert all(name in message for name in MNIST_FILES)


def test_a_data_dir_that_is_the_raw_folder_itself_is_named_with_the_fix(mnist_root: Path) -> None:
    raw = mnist_root / "MNIST" / "raw"
    fix = re.escape(f"set `data_dir` (--data.data_dir) to {mnist_root.resolve()}")
    with pytest.raises(FileNotFoundError, match=fix):
        GANDataModule(data_dir=raw).prepare_data()  # download allowed: nothing is fetched or created there
    assert not (raw / "MNIST").exists()


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-100]), "truncated or corrupt"),
        (lambda p: p.write_bytes(b"\x00\x00\x08\x01" + p.read_bytes()[4:]), "magic number 2049"),
        (lambda p: p.write_bytes(p.read_bytes()[:10]), "shorter than an IDX header"),
    ],
)
def test_corrupt_idx_files_are_named(mnist_root: Path, tmp_path: Path, corrupt, message: str) -> None:
    raw = copy_mnist(mnist_root, tmp_path)
    corrupt(raw / "train-images-idx3-ubyte")
    with pytest.raises(ValueError, match=message) as error:
        GANDataModule(data_dir=tmp_path, download=False).setup()
    assert "train-images-idx3-ubyte" in str(error.value)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="Unknown dataset 'svhn'"):
        GANDataModule("svhn")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        GANDataModule(batch_size=0)


def test_real_mnist(real_mnist_root: Path) -> None:
    dm = GANDataModule(data_dir=real_mnist_root, download=False)
    dm.setup()
    assert (len(dm.splits.train), len(dm.splits.val), len(dm.splits.test)) == (50000, 10000, 10000)
    # known facts about real MNIST: mean pixel ~0.13, labels 0-9 all present
    assert dm.splits.train.images.mean().item() == pytest.approx(0.1307, abs=0.002)
    assert dm.splits.test.labels.unique().tolist() == list(range(10))


def test_batches_are_gathered_in_one_op_and_equal_per_example_collation(mnist_root: Path) -> None:
    dm = GANDataModule(data_dir=mnist_root, batch_size=7, download=False)
    dm.setup()
    images, labels = next(iter(dm.val_dataloader()))
    plain = next(
        iter(
            torch.utils.data.DataLoader(
                torch.utils.data.TensorDataset(dm.splits.val.images, dm.splits.val.labels), batch_size=7
            )
        )
    )
    torch.testing.assert_close(images, plain[0], rtol=0, atol=0)
    torch.testing.assert_close(labels, plain[1], rtol=0, atol=0)


def test_device_resident_data_trains_identically(mnist_root: Path) -> None:
    def fit(device_resident: bool) -> dict[str, torch.Tensor]:
        seed_everything(0, verbose=False)
        gan = GAN(MLPGenerator(hidden_sizes=(16,), hidden_activations=("relu",)), MaxoutDiscriminator(units=(8,)))
        dm = GANDataModule(data_dir=mnist_root, download=False, device_resident=device_resident)
        trainer = quiet_trainer(max_steps=5, limit_val_batches=1, enable_checkpointing=False)
        trainer.fit(gan, datamodule=dm)
        assert dm.splits.train.images.device == trainer.strategy.root_device
        return gan.state_dict()

    resident, default = fit(True), fit(False)
    for name, tensor in resident.items():
        torch.testing.assert_close(tensor, default[name], rtol=0, atol=0, msg=name)


def test_device_resident_batches_are_the_default_batches_also_when_resumed_mid_epoch(mnist_root: Path) -> None:
    def batches(device_resident: bool, split: str) -> list[torch.Tensor]:
        dm = GANDataModule(data_dir=mnist_root, download=False, batch_size=300, device_resident=device_resident)
        dm.setup("fit")
        loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
        if split == "train":
            loader.load_state_dict({"epoch": 0, "batches": 160, "seed": 7})  # 6 of 166 batches left
            loader.sampler.seed = 7
        return [images for images, _ in loader]

    for split in ("train", "val"):  # val: 10000 / 300 leaves a last batch of 100
        resident, default = batches(True, split), batches(False, split)
        assert [len(b) for b in resident] == [len(b) for b in default]
        assert all(torch.equal(a, b) for a, b in zip(resident, default, strict=True))
    assert len(resident) == 34 and len(batches(True, "train")) == 6


def test_device_resident_data_needs_no_workers() -> None:
    with pytest.raises(ValueError, match="num_workers"):
        GANDataModule(device_resident=True, num_workers=2)
