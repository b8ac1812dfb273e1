"""Stacked steps (``GANDataModule(steps_per_batch=S)``): S minibatches per Lightning batch train exactly as S batches
would (weights, step counts, logged metrics and their x-axis, max_steps, resume), and step counts that a stack would
skip over are refused."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_NETS, quiet_trainer, tiny_nets
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_gan import GAN, GANDataModule
from lightning_gan.checkpointing import InterruptCheckpoint
from lightning_gan.cli import build_cli
from lightning_gan.data import InMemoryTensors, _whole_batch
from lightning_gan.resume import ResumableDataLoader

BATCHES, BATCH = 6, 4  # per epoch
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def data() -> torch.Tensor:
    return torch.rand(BATCHES * BATCH, 1, 2, 2, generator=torch.Generator().manual_seed(0))


def loader(stack: int) -> DataLoader:
    """The same batches in the same order (resumable mid-epoch): one at a time, or ``stack`` at a time as
    ``(stack, B, C, H, W)``."""
    return ResumableDataLoader(
        InMemoryTensors(data()), batch_size=BATCH, drop_last=True, collate_fn=_whole_batch, stack_batches=stack
    )


def make_gan(**kwargs: Any) -> GAN:
    seed_everything(0, verbose=False)
    return GAN(*tiny_nets(), **{"lr_decay": 1.01, "ema_decay": 0.9, **kwargs})


def fit(gan: GAN, stack: int, root: Path, ckpt_path: Path | None = None, **kwargs: Any) -> Trainer:
    seed_everything(0, verbose=False)
    options = {"max_epochs": 2, "log_every_n_steps": 3, "enable_checkpointing": False, **kwargs}
    trainer = quiet_trainer(default_root_dir=root, logger=CSVLogger(root, name="", version=""), **options)
    trainer.fit(gan, loader(stack), ckpt_path=ckpt_path)
    return trainer


def logged(root: Path, key: str = "train/d_loss") -> list[tuple[int, str]]:
    """(step, value) of every row with ``key``, as the logger wrote them."""
    with (root / "metrics.csv").open() as file:
        return [(int(row["step"]), row[key]) for row in csv.DictReader(file) if row.get(key)]


@pytest.mark.parametrize(
    ("options", "stack"),
    [
        ({"schedule": "alternating", "k": 2}, 3),
        ({"schedule": "simultaneous"}, 3),
        ({"schedule": "alternating", "k": 2, "cuda_graph": True}, 3),
    ],
    ids=["alternating", "simultaneous", "fast-path"],
)
@pytest.mark.usefixtures("fast_path_on_cpu")
def test_a_stack_trains_as_its_batches_one_by_one(tmp_path: Path, options: dict[str, Any], stack: int) -> None:
    single, stacked = make_gan(**options), make_gan(**options)
    # LearningRateMonitor logs from on_train_batch_start, before the training step
    single_trainer = fit(single, 1, tmp_path / "single", callbacks=[LearningRateMonitor("step")])
    stacked_trainer = fit(stacked, stack, tmp_path / "stacked", callbacks=[LearningRateMonitor("step")])
    assert stacked_trainer.global_step == single_trainer.global_step == 2 * BATCHES
    assert stacked.generator_updates == single.generator_updates == 2 * BATCHES // options.get("k", 1)
    assert (stacked.graph_runner is not None) == options.get("cuda_graph", False)
    for name, tensor in single.state_dict().items():
        torch.testing.assert_close(stacked.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    # the same steps logged, with the same values, at the same x-axis positions
    assert logged(tmp_path / "stacked") == logged(tmp_path / "single")
    assert [step for step, _ in logged(tmp_path / "single")] == [2, 5, 8, 11]
    # at the same steps (with the learning rate at the start of the stack: its hook runs once per batch)
    lr_steps = [[step for step, _ in logged(tmp_path / run, "lr-SGD")] for run in ("stacked", "single")]
    assert lr_steps[0] == lr_steps[1] == [2, 5, 8, 11]


def test_a_run_resumed_between_stacks_is_exact(tmp_path: Path) -> None:
    straight = make_gan()
    fit(straight, 3, tmp_path / "straight")
    first = make_gan()
    every_stack = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=3, save_top_k=-1)
    fit(first, 3, tmp_path / "first", max_epochs=1, callbacks=[every_stack], enable_checkpointing=True)
    mid_epoch = tmp_path / "checkpoints" / "epoch=0-step=3.ckpt"  # the first of the epoch's two stacks
    assert mid_epoch.is_file()
    resumed = make_gan()
    trainer = fit(resumed, 3, tmp_path / "resumed", ckpt_path=mid_epoch)
    assert trainer.global_step == 2 * BATCHES
    for name, tensor in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


def test_a_run_resumes_only_with_its_own_stack_size(tmp_path: Path) -> None:
    every_stack = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=3, save_top_k=-1)
    fit(make_gan(), 3, tmp_path / "first", max_epochs=1, callbacks=[every_stack], enable_checkpointing=True)
    resumed = make_gan()
    with pytest.raises(
        ValueError, match=r"stacks of 3 steps, these are stacks of 1: resume with .*`steps_per_batch: 3`"
    ):
        fit(resumed, 1, tmp_path / "resumed", ckpt_path=tmp_path / "checkpoints" / "epoch=0-step=3.ckpt")


def test_stacks_of_unequal_size_are_refused(tmp_path: Path) -> None:
    batches = data().view(-1, BATCH, 1, 2, 2)
    stacks = [batches[0:3], batches[3:6], batches[0:2], batches[0:3]]  # 3 steps, 3, 2, then 3 from step 8
    gan = make_gan()
    trainer = quiet_trainer(max_epochs=1, log_every_n_steps=6, enable_checkpointing=False)
    with pytest.raises(ValueError, match="A stack of 3 steps starts at global step 8, which is no multiple of 3"):
        trainer.fit(gan, DataLoader(stacks, batch_size=None))
    assert gan.global_step == 8


def test_each_trainer_s_step_counts_are_checked(tmp_path: Path) -> None:
    gan = make_gan()
    fit(gan, 3, tmp_path / "first", max_epochs=1)  # log_every_n_steps=3
    with pytest.raises(ValueError, match=r"trainer\.log_every_n_steps=2"):
        fit(gan, 3, tmp_path / "second", max_epochs=2, log_every_n_steps=2)


def test_the_interruption_checkpoint_takes_any_stack_size(tmp_path: Path) -> None:
    # its ranks agree every 10 steps (under DDP), which stacks of 3 pass over rather than land on
    trainer = fit(make_gan(), 3, tmp_path, callbacks=[InterruptCheckpoint(dirpath=tmp_path)])
    assert trainer.global_step == 2 * BATCHES


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"log_every_n_steps": 2}, "trainer.log_every_n_steps=2"),
        ({"callbacks": [ModelCheckpoint(every_n_train_steps=4)]}, "ModelCheckpoint.every_n_train_steps=4"),
        ({"max_steps": 4}, "trainer.max_steps=4"),
    ],
)
def test_step_counts_that_a_stack_skips_over_are_refused(tmp_path: Path, kwargs: dict[str, Any], named: str) -> None:
    gan = make_gan()
    with pytest.raises(ValueError, match=f"multiples of 3, but {named}"):
        fit(gan, 3, tmp_path, **{"enable_checkpointing": "callbacks" in kwargs, **kwargs})
    assert gan.global_step == 0


@pytest.mark.usefixtures("fast_path_on_cpu")
def test_the_fast_mnist_config_trains_the_same_stacked_on_real_mnist(real_mnist_root: Path, tmp_path: Path) -> None:
    def weights(steps_per_batch: int) -> dict[str, torch.Tensor]:
        cli = build_cli(
            [
                "fit", "--config", str(CONFIGS / "mnist_fast.yaml"), f"--data.init_args.data_dir={real_mnist_root}",
                f"--data.init_args.steps_per_batch={steps_per_batch}",
                f"--trainer.default_root_dir={tmp_path / str(steps_per_batch)}",
                "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.max_steps=20",
                "--trainer.limit_val_batches=0", "--trainer.accelerator=cpu",
                *TINY_NETS,  # the config's training (Adam, alternating, EMA, stacks of 10) with toy networks
            ]
        )  # fmt: skip
        assert cli.trainer.global_step == 20  # two stacks of 10 steps
        return cli.model.state_dict()

    stacked, single = weights(10), weights(1)
    for name, tensor in single.items():
        torch.testing.assert_close(stacked[name], tensor, rtol=0, atol=0, msg=name)


# ------------------------------------------------------------------------------------------------------------ data
@pytest.mark.parametrize("device_resident", [False, True])
def test_the_datamodule_stacks_its_training_batches_in_order(mnist_root: Path, device_resident: bool) -> None:
    def datamodule(steps_per_batch: int) -> GANDataModule:
        dm = GANDataModule(
            data_dir=mnist_root,
            download=False,
            batch_size=100,
            device_resident=device_resident,
            steps_per_batch=steps_per_batch,
        )
        dm.trainer = quiet_trainer()  # device-resident splits go to the trainer's device
        dm.setup("fit")
        return dm

    stacked, single = datamodule(5), datamodule(1)
    batches = [images for images, _ in single.train_dataloader()]
    stacks = list(stacked.train_dataloader())
    assert len(stacked.train_dataloader()) == len(stacks) == 100
    images, labels = stacks[0]
    assert images.shape == (5, 100, 1, 28, 28) and labels.shape == (5, 100)
    assert all(torch.equal(stack[0], torch.stack(batches[5 * i : 5 * i + 5])) for i, stack in enumerate(stacks))
    assert next(iter(stacked.val_dataloader()))[0].shape == (100, 1, 28, 28)  # evaluation is not stacked


def test_a_stack_size_that_leaves_batches_out_is_said(mnist_root: Path) -> None:
    dm = GANDataModule(data_dir=mnist_root, download=False, batch_size=100, steps_per_batch=7)
    with pytest.warns(UserWarning, match="the last 3 are left out of every epoch"):
        assert len(dm.train_dataloader()) == 71  # 500 batches: 71 stacks of 7, 3 left over
    with pytest.raises(ValueError, match="steps_per_batch"):
        GANDataModule(steps_per_batch=0)


def test_the_loader_stacks_its_batches_and_keeps_its_place_in_stacks() -> None:
    dataset = InMemoryTensors(torch.arange(24.0))

    def make(stack: int) -> ResumableDataLoader:
        return ResumableDataLoader(
            dataset, batch_size=2, shuffle=True, drop_last=True, seed=3, stack_batches=stack, collate_fn=_whole_batch
        )

    order = [batch for (batch,) in make(1)]  # 12 batches of 2
    stacks = [stack for (stack,) in make(3)]
    assert len(stacks) == 4 and all(torch.equal(s, torch.stack(order[3 * i : 3 * i + 3])) for i, s in enumerate(stacks))
    partial = make(3)
    iterator = iter(partial)
    _ = next(iterator)
    resumed = make(3)
    resumed.load_state_dict(partial.state_dict())
    rest = [stack for (stack,) in resumed]
    assert len(rest) == 3 and all(torch.equal(a, b) for a, b in zip(rest, stacks[1:], strict=True))
    with pytest.raises(ValueError, match="stacks of 3 steps, these are stacks of 1"):
        make(1).load_state_dict(partial.state_dict())
    with pytest.raises(ValueError, match="drop_last"):
        ResumableDataLoader(dataset, batch_size=2, stack_batches=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_stacks_replay_the_captured_update_without_waiting(tmp_path: Path) -> None:
    from test_graphed import NoHostSync  # the fast path's own check that no batch waits for the device

    def fit_on_gpu(gan: GAN, stack: int, callbacks: list[Any]) -> Trainer:
        images = data().cuda().view(-1, stack, BATCH, 1, 2, 2).squeeze(1)  # batches on the GPU, stacked or not
        seed_everything(0, verbose=False)
        trainer = quiet_trainer(
            accelerator="cuda",
            devices=1,
            max_epochs=3,
            log_every_n_steps=999,  # a multiple of the stack; no logging step in the run
            callbacks=callbacks,
            enable_checkpointing=False,
            default_root_dir=tmp_path,
        )
        trainer.fit(gan, DataLoader(TensorDataset(images), batch_size=None))
        return trainer

    options = {"cuda_graph": True, "momentum_final": None, "ema_decay": 0.999}  # no per-epoch recapture
    single, stacked = make_gan(**options), make_gan(**options)
    fit_on_gpu(single, 1, [])
    check = NoHostSync(after=6)  # the first stack warms up, the second is captured at its first step
    try:
        trainer = fit_on_gpu(stacked, 3, [check])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert trainer.global_step == 3 * BATCHES and check.checked == 3 * BATCHES // 3 - 2
    assert stacked.graph_runner.graphs.captures == single.graph_runner.graphs.captures == 1
    for name, tensor in single.state_dict().items():
        torch.testing.assert_close(stacked.state_dict()[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
