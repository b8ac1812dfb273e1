"""CIFAR-10 and TFD: fixtures in the real on-disk formats, the authors' splits and preprocessing, readers' errors,
and one `fit --trainer.fast_dev_run` through the CLI for each of their configs."""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import torch
from lightning.pytorch.cli import LightningCLI

from lightning_gan import GANDataModule
from lightning_gan.cli import build_cli
from lightning_gan.datasets import (
    CIFAR10_FOLDER,
    CIFAR10_TEST_FILE,
    CIFAR10_TRAIN_FILES,
    Split,
    global_contrast_normalize,
    load_cifar10,
    load_tfd,
    read_tfd_mat,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# ---------------------------------------------------------------------------------------------------------- CIFAR-10
def cifar10_batch(index: int, rows: int = 10000, seed: int = 0) -> dict:
    """One batch as in the official python version: uint8 ``data`` (rows, 3072), a list of ``labels``. Pixel 0 of
    every row holds 20 * the batch's index (1-5 train, 6 test), so that tests can tell where a row came from."""
    rng = np.random.default_rng(seed + index)
    data = np.frombuffer(rng.bytes(rows * 3072), dtype=np.uint8).reshape(rows, 3072).copy()
    data[:, 0] = 20 * index
    data[:3, 1:] = 7  # three rows all but constant
    return {
        "batch_label": f"batch {index}",
        "labels": rng.integers(0, 10, size=rows).tolist(),
        "data": data,
        "filenames": [f"image_{i}.png" for i in range(rows)],
    }


def write_cifar10(root: Path) -> Path:
    """The official layout ``root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``, full size. The
    batches use pickle protocols 2 to 5, one with byte-string keys as Python 2 wrote them."""
    folder = root / CIFAR10_FOLDER
    folder.mkdir(parents=True)
    for index, name in enumerate([*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE], start=1):
        batch = cifar10_batch(index)
        if index == 2:
            batch = {key.encode(): value for key, value in batch.items()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=[2, 3, 4, 5, 5, 5][index - 1]))
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


@pytest.fixture(scope="module")
def cifar10_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cifar10(tmp_path_factory.mktemp("cifar10"))


def test_cifar10_splits_shapes_range_and_order(cifar10_root: Path) -> None:
    splits = load_cifar10(cifar10_root, download=False)
    assert [len(splits.train), len(splits.val), len(splits.test)] == [40000, 10000, 10000]
    assert splits.train.images.shape[1:] == (3, 32, 32) and splits.train.images.dtype == torch.float32
    assert splits.train.images.min() >= 0 and splits.train.images.max() <= 1

    # train = batches 1-4, val = batch 5, test = test_batch, in order; the rows' layout is (3, 32, 32) row-major
    def origin(split: Split) -> list[int]:
        return (split.images[:, 0, 0, 0] * 255).round().long().unique().tolist()

    assert origin(splits.train) == [20, 40, 60, 80] and origin(splits.val) == [100] and origin(splits.test) == [120]
    batch = cifar10_batch(5)
    torch.testing.assert_close(splits.val.images[17], torch.from_numpy(batch["data"][17]).view(3, 32, 32) / 255)
    assert splits.val.labels[:50].tolist() == batch["labels"][:50]
    assert splits.test.labels.tolist() == cifar10_batch(6)["labels"]
    x = splits.val.images[:4]
    torch.testing.assert_close(GANDataModule("cifar10").to_display(x), x)


def check_gcn(data: GANDataModule) -> None:
    """The GCN'd CIFAR-10 of ``data`` against a hand computation from the fixture's raw bytes, and its display."""
    raw = cifar10_batch(5)["data"][:5].astype(np.float64)  # the first rows of the validation split
    centred = raw - raw.mean(axis=1, keepdims=True)
    expected = 55 * centred / np.sqrt((centred**2).sum(axis=1, keepdims=True))
    got = data.splits.val.images[:5].reshape(5, -1).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    norms = data.splits.train.images[:1000].flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, 55.0), rtol=1e-5, atol=1e-3)
    # GCN cannot be inverted: the sample grids show each image divided by its largest |value|, mapped to [0, 1]
    shown = data.to_display(data.splits.val.images[:8])
    assert shown.min() >= 0 and shown.max() <= 1
    extremes = (shown.flatten(1) - 0.5).abs().amax(dim=1)
    torch.testing.assert_close(extremes, torch.full_like(extremes, 0.5))


def test_gcn_formula_and_divisor_floor() -> None:
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0], [5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 0.0, 1e-9]])
    y = global_contrast_normalize(x)
    # by hand: mean 1.5, centred (-1.5, -.5, .5, 1.5), norm sqrt(5)
    torch.testing.assert_close(y[0], 55 * torch.tensor([-1.5, -0.5, 0.5, 1.5]) / math.sqrt(5))
    assert y[1].eq(0).all()  # constant: only centred
    # norm / 55 below 1e-8: pylearn2 divides by 1 instead, so the image is only centred
    torch.testing.assert_close(y[2], x[2] - x[2].mean())
    assert global_contrast_normalize(torch.ones(2, 3, 4, 4, dtype=torch.uint8)).shape == (2, 3, 4, 4)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _resize(path: Path) -> None:
    path.write_bytes(pickle.dumps(cifar10_batch(1, rows=9999)))


def _bad_labels(path: Path) -> None:
    batch = cifar10_batch(1)
    batch["labels"][5] = 10
    path.write_bytes(pickle.dumps(batch))


def _not_a_dict(path: Path) -> None:
    path.write_bytes(pickle.dumps([1, 2, 3]))


def _code_in_pickle(path: Path) -> None:
    path.write_bytes(b"cos\nsystem\n(S'echo hacked'\ntR.")


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_truncate, r"data_batch_1 is truncated or corrupt: it could not be unpickled"),
        (_resize, r"data_batch_1 holds `data` uint8 \(9999, 3072\), expected uint8 \(10000, 3072\)"),
        (_bad_labels, r"data_batch_1 holds `labels` .* integers in 0-9"),
        (_not_a_dict, r"data_batch_1 holds a list, not a CIFAR-10 batch"),
        (_code_in_pickle, r"data_batch_1 .* global os.system is not part of a CIFAR-10 batch"),
    ],
)
def test_corrupt_cifar10_batches_are_named(
    cifar10_root: Path, tmp_path: Path, corrupt: Callable[[Path], None], message: str
) -> None:
    folder = tmp_path / CIFAR10_FOLDER
    folder.mkdir()
    for name in [*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE]:
        (folder / name).symlink_to(cifar10_root / CIFAR10_FOLDER / name)
    (folder / "data_batch_1").unlink()
    (folder / "data_batch_1").write_bytes((cifar10_root / CIFAR10_FOLDER / "data_batch_1").read_bytes())
    corrupt(folder / "data_batch_1")
    with pytest.raises(ValueError, match=message) as error:
        GANDataModule("cifar10", data_dir=tmp_path, download=False).prepare_data()
    assert "cifar-10-python.tar.gz" in str(error.value)  # says how to fix it


def test_missing_cifar10_names_the_folder_and_files(tmp_path: Path) -> None:
    (tmp_path / CIFAR10_FOLDER).mkdir()
    (tmp_path / CIFAR10_FOLDER / "data_batch_1").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"CIFAR-10 not found in .*cifar-10-batches-py \(download=False\)") as e:
        GANDataModule("cifar10", data_dir=tmp_path, download=False).prepare_data()
    assert "missing: data_batch_2, data_batch_3, data_batch_4, data_batch_5, test_batch" in str(e.value)
    assert "--data.data_dir" in str(e.value)


# ---------------------------------------------------------------------------------------------------------- TFD
TFD_N = 80  # 40 unlabeled faces (code 0 in every fold), 40 labelled ones spread over train/valid/test by fold


def tfd_arrays(n: int = TFD_N, size: int = 48) -> dict[str, np.ndarray]:
    """TFD's variables in MATLAB's axis order. Image i has pixel (r, c) = (i + r + 2c) mod 256: asymmetric, so a
    transposed or shuffled read shows."""
    i, r, c = np.ogrid[:n, :size, :size]
    folds = np.zeros((n, 5))
    labelled = np.arange(n // 2, n)
    for fold in range(5):
        folds[labelled, fold] = (labelled + fold) % 3 + 1  # train 1, valid 2, test 3
    labs_ex = np.where(np.arange(n) < n // 2, -1, np.arange(n) % 7 + 1).astype(np.float64)[:, None]
    return {
        "images": ((i + r + 2 * c) % 256).astype(np.uint8),
        "folds": folds,
        "labs_ex": labs_ex,
        "labs_id": np.arange(n, dtype=np.float64)[:, None],
    }


def write_mat_v73(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` as MATLAB 7.3 does: HDF5 with each array's axes reversed (column-major), a MATLAB_class
    attribute, and the 128-byte MATLAB header in a 512-byte user block."""
    classes = {np.dtype(np.uint8): "uint8", np.dtype(np.float64): "double"}
    with h5py.File(path, "w", userblock_size=512) as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=np.ascontiguousarray(value.T)).attrs["MATLAB_class"] = np.bytes_(
                classes[value.dtype]
            )
    text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  6 10:00:00 2014 HDF5 schema 1.00 ."
    with open(path, "r+b") as f:
        f.write(text.ljust(116, b" ") + bytes(8) + b"\x00\x02IM")  # subsystem offset, version 0x0200, endian


def write_tfd(root: Path, fmt: str = "v5", **overrides: np.ndarray | None) -> Path:
    """Write ``root/TFD_48x48.mat`` (scipy v5 or HDF5 v7.3); ``overrides`` replace (or, with None, drop) variables."""
    arrays = {**tfd_arrays(), **overrides}
    arrays = {key: value for key, value in arrays.items() if value is not None}
    path = root / "TFD_48x48.mat"
    if fmt == "v5":
        scipy.io.savemat(path, arrays)
    else:
        write_mat_v73(path, arrays)
    return root


@pytest.mark.parametrize("fmt", ["v5", "v73"])
@pytest.mark.parametrize("fold", [0, 3])
def test_tfd_folds_splits_and_pixels(tmp_path: Path, fmt: str, fold: int) -> None:
    write_tfd(tmp_path, fmt)
    if fmt == "v73":  # the fixture is what MATLAB writes: scipy calls it 7.3 and refuses it, h5py reads it
        assert scipy.io.matlab.matfile_version(tmp_path / "TFD_48x48.mat") == (2, 0)
        assert h5py.is_hdf5(tmp_path / "TFD_48x48.mat")
    data = GANDataModule("tfd", data_dir=tmp_path, fold=fold, batch_size=10)
    data.setup()
    expected = tfd_arrays()
    for split, name, codes in [("train", "unlabeled", (0,)), ("val", "valid", (2,)), ("test", "test", (3,))]:
        rows = np.flatnonzero(np.isin(expected["folds"][:, fold], codes))
        got = getattr(data.splits, split)
        assert got.images.shape == (len(rows), 1, 48, 48) and got.images.dtype == torch.float32, name
        torch.testing.assert_close(got.images[:, 0], torch.from_numpy(expected["images"][rows]).float() / 255)
        labels = -1 if name == "unlabeled" else torch.from_numpy(expected["labs_ex"][rows, 0] - 1).long()
        assert torch.equal(got.labels, torch.as_tensor(labels).expand(len(rows)))
    assert len(data.splits.train) == 40
    assert next(iter(data.train_dataloader()))[0].shape == (10, 1, 48, 48)


@pytest.mark.parametrize(("train_set", "codes"), [("train", (1,)), ("full_train", (1, 2))])
def test_tfd_train_sets(tmp_path: Path, train_set: str, codes: tuple[int, ...]) -> None:
    splits = load_tfd(write_tfd(tmp_path), fold=1, train_set=train_set)
    assert len(splits.train) == np.isin(tfd_arrays()["folds"][:, 1], codes).sum()
    assert splits.train.labels.min() >= 0


def test_tfd_v73_reader_undoes_matlabs_transpose(tmp_path: Path) -> None:
    arrays = read_tfd_mat(write_tfd(tmp_path, "v73") / "TFD_48x48.mat")
    expected = tfd_arrays()
    for key in ("images", "folds", "labs_ex"):
        np.testing.assert_array_equal(arrays[key], expected[key])


def _tfd_v73_truncated(root: Path) -> None:
    path = write_tfd(root, "v73") / "TFD_48x48.mat"
    path.write_bytes(path.read_bytes()[:2000])


@pytest.mark.parametrize(
    ("write", "kwargs", "error", "message"),
    [
        (None, {}, FileNotFoundError, r"TFD not found: looked for .*TFD_48x48\.mat.*from its owners.*--data\.data_dir"),
        (write_tfd, {"tfd_image_size": 96}, FileNotFoundError, r"looked for .*TFD_96x96\.mat"),
        (lambda root: write_tfd(root, folds=None), {}, ValueError, r"TFD_48x48\.mat has no variable folds"),
        (
            lambda root: write_tfd(root, "v73", labs_ex=None),
            {},
            ValueError,
            r"TFD_48x48\.mat has no variable labs_ex",
        ),
        (
            lambda root: write_tfd(root, images=np.zeros((TFD_N, 32, 32), np.uint8)),
            {},
            ValueError,
            r"holds `images` of shape \(80, 32, 32\), expected \(N, 48, 48\)",
        ),
        (
            lambda root: write_tfd(root, folds=np.zeros((TFD_N, 4))),
            {},
            ValueError,
            r"holds `folds` of shape \(80, 4\) .* expected \(80, 5\)",
        ),
        (
            lambda root: write_tfd(root, folds=np.zeros((TFD_N, 5))),
            {},
            ValueError,
            r"has no 'valid' rows in fold 0",
        ),
        (
            lambda root: (root / "TFD_48x48.mat").write_bytes(b"MATLAB 5.0 MAT-file" + bytes(20)),
            {},
            ValueError,
            r"TFD_48x48\.mat could not be read as a MATLAB \.mat file, it is truncated or corrupt",
        ),
        (_tfd_v73_truncated, {}, ValueError, r"TFD_48x48\.mat could not be read as a MATLAB \.mat file"),
    ],
)
def test_bad_tfd_files_fail_before_training(
    tmp_path: Path, write: Callable[[Path], object] | None, kwargs: dict, error: type[Exception], message: str
) -> None:
    if write is not None:
        write(tmp_path)
    with pytest.raises(error, match=message):
        GANDataModule("tfd", data_dir=tmp_path, **kwargs).prepare_data()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fold": 5}, r"Expected `fold` in 0-4 \(TFD has 5 folds\), but got 5"),
        ({"fold": -1}, r"Expected `fold` in 0-4"),
        ({"tfd_train_set": "test"}, r"Expected `tfd_train_set` to be 'unlabeled', 'train' or 'full_train'"),
        ({"tfd_image_size": 64}, r"Expected `tfd_image_size` to be 48 or 96, but got 64"),
        ({"preprocessing": "zca"}, r"Expected `preprocessing` to be 'scale' or 'gcn', but got 'zca'"),
    ],
)
def test_bad_datamodule_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GANDataModule("tfd", **kwargs)


def test_load_tfd_checks_its_fold(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"Expected `fold` in 0-4 \(TFD has 5 folds\), but got 7"):
        load_tfd(write_tfd(tmp_path), fold=7)


# ---------------------------------------------------------------------------------------------------------- CLI
def run_config(config: str, data_dir: Path, root: Path, *overrides: str) -> LightningCLI:
    return build_cli(
        [
            "fit",
            "--config",
            str(CONFIGS / config),
            f"--data.init_args.data_dir={data_dir}",
            "--data.init_args.download=false",
            f"--trainer.default_root_dir={root}",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.accelerator=cpu",
            "--trainer.fast_dev_run=true",
            *overrides,
        ]
    )


def test_fit_tfd_config(tmp_path: Path) -> None:
    cli = run_config(
        "tfd.yaml",
        write_tfd(tmp_path),
        tmp_path,
        "--model.init_args.generator.init_args.hidden_sizes=[32,32]",
        "--model.init_args.generator.init_args.output_sparse_init=10",
        "--model.init_args.discriminator.init_args.units=[16,16]",
        "--data.init_args.batch_size=10",
    )
    assert cli.trainer.global_step == 1
    generator = cli.model.generator
    assert generator.noise == "gaussian" and generator.max_col_norm == 1.9365
    assert all(norm <= 1.9365 + 1e-4 for norm in generator.output_layer.weight.norm(dim=1))  # clipped after the step
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 / 1.000004)


def test_fit_cifar10_config(cifar10_root: Path, tmp_path: Path) -> None:
    cli = run_config(
        "cifar10.yaml",
        cifar10_root,
        tmp_path,
        "--model.init_args.generator.init_args.hidden_sizes=[32,32]",
        "--model.init_args.discriminator.init_args.units=[16,16]",
    )
    assert cli.trainer.global_step == 1
    assert cli.model.generator.output_activation == "linear"
    check_gcn(cli.datamodule)


def test_fit_cifar10_conv_config(cifar10_root: Path, tmp_path: Path) -> None:
    cli = run_config(
        "cifar10_conv.yaml",
        cifar10_root,
        tmp_path,
        "--model.init_args.generator.init_args.hidden_sizes=[32,200]",
        "--model.init_args.generator.init_args.base_shape=[2,10,10]",
        "--model.init_args.discriminator.init_args.channels=[4,4,8]",
        "--model.init_args.discriminator.init_args.units=[16]",
        "--data.init_args.batch_size=16",  # small convolutions on a CPU are slow per example
    )
    assert cli.trainer.global_step == 1
    assert cli.model.generator.out_shape == (3, 32, 32) and cli.datamodule.preprocessing == "gcn"


def test_a_generator_built_for_another_image_shape_is_named_with_what_to_change(
    cifar10_root: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=r"\(3, 26, 26\), but the data.s are \(3, 32, 32\): choose the arguments"):
        run_config(
            "cifar10_conv.yaml",
            cifar10_root,
            tmp_path,
            "--model.init_args.generator.init_args.hidden_sizes=[32,128]",
            "--model.init_args.generator.init_args.base_shape=[2,8,8]",  # (8 - 1) * 3 + 5 = 26 pixels a side
            "--model.init_args.discriminator.init_args.channels=[4,4,8]",
            "--model.init_args.discriminator.init_args.units=[16]",
        )
