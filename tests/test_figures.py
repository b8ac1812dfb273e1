"""The figure callbacks and the collapse monitor, on tiny synthetic data (no files, no W&B)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import quiet_trainer
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from lightning_gan import GAN, MaxoutDiscriminator, MLPGenerator
from lightning_gan._lightning import callback_state_key
from lightning_gan.figures import LatentInterpolation, SampleGrid, nearest_training_images
from lightning_gan.monitor import CollapseMonitor, GANProgressBar
from lightning_gan.nets import eval_forward

PAD = 2  # torchvision.utils.make_grid's default padding
YELLOW = torch.tensor([1.0, 1.0, 0.0])


class TinyData(LightningDataModule):
    """Splits held as ``splits.<name>.images``, like GANDataModule; optional ``to_display``."""

    def __init__(self, train: Tensor, val: Tensor, display: bool = False) -> None:
        super().__init__()
        self.splits = SimpleNamespace(train=SimpleNamespace(images=train), val=SimpleNamespace(images=val))
        self.display = display

    def to_display(self, images: Tensor) -> Tensor:
        if not self.display:
            return images.clamp(0, 1)
        # like undoing GCN: each image rescaled to [0, 1]
        lo, hi = images.amin((1, 2, 3), keepdim=True), images.amax((1, 2, 3), keepdim=True)
        return (images - lo) / (hi - lo).clamp_min(1e-8)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.splits.train.images), batch_size=20, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.splits.val.images), batch_size=50)


def tiny_gan(shape: tuple[int, int, int], linear: bool = False) -> GAN:
    generator = MLPGenerator(
        noise_dim=4,
        hidden_sizes=[8],
        hidden_activations=["relu"],
        out_shape=shape,
        output_activation="linear" if linear else "sigmoid",
        init_range=1.0,
        output_bias_from_data=False,
    )
    return GAN(generator, MaxoutDiscriminator(in_shape=shape, units=[4, 4], pieces=2))


def tile(grid: Tensor, row: int, col: int, h: int, w: int) -> Tensor:
    top, left = PAD + row * (h + PAD), PAD + col * (w + PAD)
    return grid[:, top : top + h, left : left + w]


def samples_of(gan: GAN, noise: Tensor) -> Tensor:
    gan.eval()
    with torch.no_grad():
        return gan.generator(noise)


@pytest.mark.parametrize(("shape", "display"), [((1, 5, 7), False), ((3, 6, 6), True)])
def test_sample_grid_layout_and_range(shape: tuple[int, int, int], display: bool) -> None:
    gan = tiny_gan(shape, linear=display)
    data = TinyData(torch.rand(30, *shape), torch.rand(10, *shape), display=display)
    grid = SampleGrid(num_samples=6, nrow=3).make_grid(gan, data)
    (_, h, w), rows, cols = shape, 2, 3
    assert grid.shape == (3, PAD + rows * (h + PAD), PAD + cols * (w + PAD))
    assert grid.min() >= 0 and grid.max() <= 1
    noise = SampleGrid(num_samples=6, nrow=3)._fixed_noise(gan)  # same seed, same noise
    expected = data.to_display(samples_of(gan, noise)).expand(-1, 3, -1, -1)
    if display:  # GCN-like data outside [0, 1] is shown through to_display, not clamped
        assert samples_of(gan, noise).abs().max() > 1
    for i in range(6):
        torch.testing.assert_close(tile(grid, i // cols, i % cols, h, w), expected[i])


def test_nearest_training_images_match_brute_force() -> None:
    torch.manual_seed(0)
    samples, train = torch.rand(40, 2, 5, 5), torch.rand(3000, 2, 5, 5)
    neighbours, index = nearest_training_images(samples, train)
    brute = torch.cdist(samples.flatten(1).double(), train.flatten(1).double())
    torch.testing.assert_close(index, brute.argmin(1))
    torch.testing.assert_close(neighbours, train[brute.argmin(1)])


def test_sample_grid_puts_the_nearest_training_image_beside_each_sample() -> None:
    torch.manual_seed(0)
    shape = (1, 6, 6)
    gan, train = tiny_gan(shape), torch.rand(500, *shape)
    callback = SampleGrid(num_samples=4, nrow=2, nearest_neighbours=True)
    grid = callback.make_grid(gan, TinyData(train, train[:10]))
    assert grid.shape == (3, PAD + 2 * (6 + PAD), PAD + 4 * (6 + PAD))  # 2 rows of (sample, neighbour) x 2
    samples = samples_of(gan, callback.noise)
    nearest = torch.cdist(samples.flatten(1).double(), train.flatten(1).double()).argmin(1)
    for i in range(4):
        row, col = divmod(2 * i, 4)
        torch.testing.assert_close(tile(grid, row, col, 6, 6)[0], samples[i, 0])
        beside = tile(grid, row, col + 1, 6, 6)
        torch.testing.assert_close(beside[0, 1:-1, 1:-1], train[nearest[i], 0, 1:-1, 1:-1])  # inside the frame
        assert (beside[:, 0, :].T == YELLOW).all()  # yellow frame, as in Figure 2


def test_latent_interpolation_rows_run_between_two_fixed_noise_vectors() -> None:
    shape = (1, 4, 4)
    gan = tiny_gan(shape)
    callback = LatentInterpolation(num_rows=3, num_steps=5)
    grid = callback.make_grid(gan)
    assert grid.shape == (3, PAD + 3 * (4 + PAD), PAD + 5 * (4 + PAD))
    z_a, z_b = callback.noise.chunk(2)
    ends = samples_of(gan, torch.cat([z_a, (z_a + z_b) / 2, z_b]))
    for row in range(3):
        for col, image in ((0, ends[row]), (2, ends[3 + row]), (4, ends[6 + row])):
            torch.testing.assert_close(tile(grid, row, col, 4, 4)[0], image[0])


def test_fixed_noise_is_saved_and_restored() -> None:
    gan = tiny_gan((1, 4, 4))
    first = SampleGrid(num_samples=5, seed=3)
    first.make_grid(gan)
    second = SampleGrid(num_samples=5, seed=99)
    second.load_state_dict(first.state_dict())
    torch.testing.assert_close(second._fixed_noise(gan), first.noise)
    assert SampleGrid(key="a").state_key != SampleGrid(key="b").state_key


def test_callback_state_key_names_the_class_and_the_key() -> None:
    assert callback_state_key(SampleGrid(key="a"), key="a") == "SampleGrid{'key': 'a'}" == SampleGrid(key="a").state_key


def test_a_grid_s_png_is_synced_and_a_failed_write_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = SimpleNamespace(global_step=3, is_global_zero=True, datamodule=None, loggers=[])
    grid = SampleGrid(num_samples=4, nrow=2, dirpath=tmp_path / "grids")
    synced: list[int] = []  # inodes
    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        synced.append(os.fstat(descriptor).st_ino)
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    grid._emit(trainer, tiny_gan((1, 4, 4)), epoch=1)
    (png,) = (tmp_path / "grids").iterdir()
    assert png.name == "epoch=0001-step=3.png" and png.stat().st_ino in synced

    def killed_half_way(tensor: Tensor, file: Any, format: str) -> None:
        file.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr("lightning_gan.figures.save_image", killed_half_way)
    trainer.global_step = 4
    with pytest.raises(KeyboardInterrupt):
        grid._emit(trainer, tiny_gan((1, 4, 4)), epoch=2)
    assert [p.name for p in (tmp_path / "grids").iterdir()] == [png.name]  # no temporary file, no half a PNG


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (SampleGrid, {"num_samples": 0}, "num_samples"),
        (SampleGrid, {"every_n_epochs": 0}, "every_n_epochs"),
        (LatentInterpolation, {"num_steps": 1}, "num_steps"),
        (CollapseMonitor, {"num_samples": 1}, "num_samples"),
        (CollapseMonitor, {"min_relative_distance": 2.0}, "min_relative_distance"),
        (CollapseMonitor, {"patience": 0}, "patience"),
    ],
)
def test_bad_arguments(cls: type, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_nearest_neighbours_without_training_images_fails_before_training(tmp_path) -> None:
    data = TinyData(torch.rand(40, 1, 4, 4), torch.rand(10, 1, 4, 4))
    data.splits = None
    callback = SampleGrid(nearest_neighbours=True)
    trainer = Trainer(default_root_dir=tmp_path, max_epochs=1, logger=False, callbacks=[callback])
    with pytest.raises(ValueError, match=r"splits\.train\.images"):
        trainer.fit(tiny_gan((1, 4, 4)), datamodule=data)
    assert trainer.global_step == 0


class ConstantGenerator(nn.Module):
    """The 'Helvetica scenario' taken to the limit: every z gives the same image."""

    noise_dim = 4

    def __init__(self, image: Tensor) -> None:
        super().__init__()
        self.image = nn.Parameter(image.clone())

    def sample_noise(self, n: int, device: torch.device) -> Tensor:
        return torch.rand(n, self.noise_dim, device=device)

    def forward(self, z: Tensor) -> Tensor:
        return self.image.expand(z.shape[0], *self.image.shape)


class DataGenerator(ConstantGenerator):
    """A perfect generator: z picks one of a pool of real(-like) images."""

    def __init__(self, pool: Tensor) -> None:
        super().__init__(pool)

    def forward(self, z: Tensor) -> Tensor:
        return self.image[(z[:, 0] * self.image.shape[0]).long().clamp_max(self.image.shape[0] - 1)]


def digit_like(n: int, generator: torch.Generator) -> Tensor:
    """Ten smooth prototypes (classes) plus per-example noise, in [0, 1]: clustered like real digits."""
    prototypes = torch.rand(10, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    prototypes = nn.functional.interpolate(prototypes, size=(10, 10), mode="bilinear")
    labels = torch.randint(0, 10, (n,), generator=generator)
    return (prototypes[labels] + 0.15 * torch.randn(n, 1, 10, 10, generator=generator)).clamp(0, 1)


@pytest.mark.parametrize("collapsed", [True, False])
def test_collapse_monitor(tmp_path, collapsed: bool) -> None:
    g = torch.Generator().manual_seed(1)
    train, val, pool = digit_like(2000, g), digit_like(200, g), digit_like(2000, g)
    generator = ConstantGenerator(train[0]) if collapsed else DataGenerator(pool)
    gan = GAN(generator, MaxoutDiscriminator(in_shape=(1, 10, 10), units=[4, 4], pieces=2))
    monitor = CollapseMonitor(num_samples=200, num_reference=1000)
    trainer = quiet_trainer(default_root_dir=tmp_path, logger=CSVLogger(tmp_path), callbacks=[monitor])
    helvetica_per_check = []
    for _ in range(3):  # patience 2: the warning comes at the second check, and only once
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.validate(gan, datamodule=TinyData(train, val), verbose=False)
        helvetica_per_check.append(sum("Helvetica" in str(w.message) for w in caught))
    metrics = trainer.callback_metrics
    assert set(metrics) >= {
        "monitor/d_real",
        "monitor/d_fake",
        "monitor/distinct_neighbours",
        "monitor/relative_distance",
    }
    if collapsed:
        assert helvetica_per_check == [0, 1, 0]  # at the second check in a row, then never again
        assert monitor.collapsed_checks == 3 and monitor.warned
        assert metrics["monitor/distinct_neighbours"] == 1 / 200
        assert metrics["monitor/relative_distance"] < 1e-3 and metrics["monitor/relative_nn_distance"] < 1e-3
    else:
        assert helvetica_per_check == [0, 0, 0] and monitor.collapsed_checks == 0
        assert metrics["monitor/distinct_neighbours"] > 0.3
        assert 0.8 < metrics["monitor/relative_distance"] < 1.2 and 0.5 < metrics["monitor/relative_nn_distance"] < 2


def test_the_monitor_s_d_real_and_d_fake_are_the_eval_mode_discriminator_s_means(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    train, val = digit_like(300, g), digit_like(40, g)
    torch.manual_seed(0)
    generator = MLPGenerator(
        noise_dim=4, hidden_sizes=[8], hidden_activations=["relu"], out_shape=(1, 10, 10), init_range=1.0,
        output_bias_from_data=False,
    )  # fmt: skip
    gan = GAN(generator, MaxoutDiscriminator(in_shape=(1, 10, 10), units=[8, 8], pieces=2, init_range=0.5))
    monitor = CollapseMonitor(num_samples=len(val), num_reference=100)  # every validation image, in some order
    trainer = quiet_trainer(default_root_dir=tmp_path, callbacks=[monitor])
    trainer.validate(gan, datamodule=TinyData(train, val), verbose=False)
    logged = {key: trainer.callback_metrics[f"monitor/{key}"].item() for key in ("d_real", "d_fake")}
    # by hand: mean sigmoid of D without dropout, on the validation images and on G's samples of the fixed noise
    gan.eval()
    with torch.no_grad():
        d_real = torch.sigmoid(gan.discriminator(val)).mean().item()
        d_fake = torch.sigmoid(gan.discriminator(gan.generator(monitor.noise))).mean().item()
    assert logged == pytest.approx({"d_real": d_real, "d_fake": d_fake}, rel=1e-5)
    assert abs(d_real - d_fake) > 0.01  # far enough apart that a swap shows


def test_progress_bar_shows_losses_and_parzen() -> None:
    bar = GANProgressBar()
    trainer = SimpleNamespace(
        callback_metrics={"train/d_loss": torch.tensor(0.5), "parzen/val_ll": torch.tensor(123.0)},
        progress_bar_metrics={},
        loggers=[],
    )
    items = bar.get_metrics(trainer, None)  # type: ignore[arg-type]
    assert items["d_loss"] == 0.5 and items["parzen/val_ll"] == 123.0 and "g_loss" not in items


def test_progress_bar_redraws_every_refresh_rate_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    redrawn: list[int] = []
    monkeypatch.setattr(RichProgressBar, "on_train_batch_end", lambda self, t, m, o, b, i: redrawn.append(i))
    monkeypatch.setattr(GANProgressBar, "total_train_batches", property(lambda self: 25))
    bar = GANProgressBar(refresh_rate=10)
    for batch_idx in range(25):
        bar.on_train_batch_end(None, None, None, None, batch_idx)  # type: ignore[arg-type]
    assert redrawn == [9, 19, 24]  # and the epoch's last batch
    GANProgressBar(refresh_rate=0).on_train_batch_end(None, None, None, None, 0)  # type: ignore[arg-type]  # off
    assert redrawn == [9, 19, 24]


class SaveFixedNoise(Callback):
    """Each rank saves the figure callbacks' fixed noise, for the parent process to compare."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        noise = {type(cb).__name__: cb.noise for cb in trainer.callbacks if hasattr(cb, "noise")}
        torch.save({**noise, "metrics": dict(trainer.callback_metrics)}, self.folder / f"rank{trainer.global_rank}.pt")


def test_figures_and_monitor_under_ddp(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    data = TinyData(digit_like(400, g), digit_like(100, g))
    callbacks = [
        SampleGrid(num_samples=4, nrow=2, nearest_neighbours=True),
        LatentInterpolation(num_rows=2, num_steps=3),
        CollapseMonitor(num_samples=50, num_reference=200),
        SaveFixedNoise(tmp_path),
    ]
    trainer = Trainer(
        default_root_dir=tmp_path,
        devices=2,
        strategy="ddp_spawn_find_unused_parameters_true",
        max_epochs=2,
        limit_train_batches=2,
        logger=CSVLogger(tmp_path),
        enable_checkpointing=False,
        callbacks=callbacks,
    )
    trainer.fit(tiny_gan((1, 10, 10)), datamodule=data)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for name in ("SampleGrid", "LatentInterpolation", "CollapseMonitor"):
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0, msg=name)  # the same on every rank
    assert rank0["metrics"]["monitor/relative_distance"] == rank1["metrics"]["monitor/relative_distance"]
    run = tmp_path / "lightning_logs" / "version_0"
    for key in ("samples", "interpolations"):  # written once (rank zero), one grid per epoch
        assert sorted(p.name for p in (run / key).iterdir()) == ["epoch=0000-step=2.png", "epoch=0001-step=4.png"]
    assert "monitor/distinct_neighbours" in (run / "metrics.csv").read_text()


def tensorboard_images(path: Path) -> dict[str, tuple[int, int]]:
    """Tag -> (height, width) of the images in a TensorBoard event file (TFRecord: length, crc, Event, crc)."""
    from tensorboardX.proto import event_pb2

    data, pos, images = path.read_bytes(), 0, {}
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 8], "little")
        event = event_pb2.Event()
        event.ParseFromString(data[pos + 12 : pos + 12 + length])
        pos += 12 + length + 4
        images.update({v.tag: (v.image.height, v.image.width) for v in event.summary.value if v.HasField("image")})
    return images


def test_grids_go_to_tensorboard_and_to_png_files(tmp_path: Path) -> None:
    trainer = quiet_trainer(
        default_root_dir=tmp_path,
        max_epochs=1,
        limit_train_batches=2,
        logger=TensorBoardLogger(tmp_path),
        callbacks=[SampleGrid(num_samples=4, nrow=2), LatentInterpolation(num_rows=2, num_steps=3)],
        enable_checkpointing=False,
    )
    trainer.fit(tiny_gan((1, 6, 6)), datamodule=TinyData(torch.rand(40, 1, 6, 6), torch.rand(10, 1, 6, 6)))
    run = tmp_path / "lightning_logs" / "version_0"
    size = 2 + 2 * (6 + 2), 2 + 3 * (6 + 2)
    assert tensorboard_images(next(run.glob("events.out.tfevents.*"))) == {
        "samples": (size[0], size[0]),
        "interpolations": size,
    }
    for key in ("samples", "interpolations"):
        assert [p.name for p in (run / key).iterdir()] == ["epoch=0000-step=2.png"]  # no temporary file left


@pytest.mark.parametrize(
    ("stop", "last"),
    [({"max_epochs": 3}, "epoch=0002-step=6.png"), ({"max_steps": 5}, "epoch=0002-step=5.png")],  # mid-epoch
)
def test_grids_follow_every_n_epochs_and_one_more_when_training_stops_between(
    tmp_path: Path, stop: dict[str, int], last: str
) -> None:
    folder = tmp_path / "grids"
    trainer = quiet_trainer(
        default_root_dir=tmp_path,
        limit_train_batches=2,
        limit_val_batches=0,
        callbacks=[SampleGrid(num_samples=4, nrow=2, every_n_epochs=2, dirpath=folder)],
        enable_checkpointing=False,
        **stop,
    )
    trainer.fit(tiny_gan((1, 6, 6)), datamodule=TinyData(torch.rand(40, 1, 6, 6), torch.rand(10, 1, 6, 6)))
    # the second epoch (index 1) by every_n_epochs, then once at the end of training, named by its epoch index
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=0001-step=4.png", last]


def test_figures_draw_in_eval_mode_without_autograd() -> None:
    net = nn.Sequential(nn.Linear(2, 3), nn.Dropout(0.5)).train()
    with torch.enable_grad():  # as in on_train_epoch_end
        out = eval_forward(net, torch.ones(4, 2, dtype=torch.float64))
    assert out.grad_fn is None and not out.requires_grad  # no graph kept for the figures
    assert out.dtype == torch.float32 and net.training  # cast to the net's dtype; its mode restored
    assert torch.equal(out, net[0](torch.ones(4, 2)).detach())  # no dropout
