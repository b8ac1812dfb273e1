"""Two CPU processes (gloo) under `strategy="ddp_spawn_find_unused_parameters_true"`, and under its `ddp_fork` variant
(the same DDP strategy, its processes started by fork: no re-import, seconds faster): identical weights. DDP that is
not told about unused parameters is refused before training, naming the strategy to use."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import quiet_trainer, tiny_nets
from lightning.pytorch import Callback, LightningDataModule
from test_reliability import time_limit

from lightning_gan import GAN
from lightning_gan.data import InMemoryTensors, _whole_batch
from lightning_gan.module import check_ddp
from lightning_gan.resume import ResumableDataLoader


class SaveRankState(Callback):
    """Each rank saves its weights and the first noise it drew, for the parent process to compare."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.shape = tuple(batch[0].shape)
            state = torch.random.get_rng_state()
            self.noise = pl_module.generator.sample_noise(4, pl_module.device)
            torch.random.set_rng_state(state)

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(
            {
                "state_dict": pl_module.state_dict(),
                "noise": self.noise,
                "global_step": trainer.global_step,
                "shape": self.shape,
            },
            self.folder / f"rank{trainer.global_rank}.pt",
        )


class Stacks(LightningDataModule):
    """Batches of 4, or stacks of ``stack`` of them (each a training step), from each rank's shard; the loader is
    built in the spawned process, as GANDataModule's."""

    def __init__(self, data: torch.Tensor, stack: int) -> None:
        super().__init__()
        self.data, self.stack = data, stack

    def train_dataloader(self) -> ResumableDataLoader:
        dataset = InMemoryTensors(self.data)
        return ResumableDataLoader(
            dataset, batch_size=4, drop_last=True, collate_fn=_whole_batch, stack_batches=self.stack
        )


def tiny_gan(schedule: str, k: int) -> GAN:
    return GAN(*tiny_nets(), schedule=schedule, k=k, ema_decay=0.9)  # the average stays identical too


@pytest.mark.parametrize(
    ("schedule", "k", "stack", "strategy"),
    [
        ("alternating", 2, 1, "ddp_spawn_find_unused_parameters_true"),
        ("simultaneous", 1, 2, "ddp_fork_find_unused_parameters_true"),
    ],
)
def test_ddp_fit_keeps_ranks_identical(tmp_path: Path, schedule: str, k: int, stack: int, strategy: str) -> None:
    data = torch.rand(64, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    trainer = quiet_trainer(
        devices=2,
        strategy=strategy,
        max_epochs=1,
        enable_checkpointing=False,
        log_every_n_steps=100,  # a multiple of the stack; no metrics to send back from the spawned ranks
        callbacks=[SaveRankState(tmp_path)],
    )
    with time_limit(120):  # fail rather than hang
        trainer.fit(tiny_gan(schedule, k), datamodule=Stacks(data, stack))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert rank0["global_step"] == rank1["global_step"] == 8  # 64 examples / 2 ranks / batch 4
    assert rank0["shape"] == rank1["shape"] == ((stack,) if stack > 1 else ()) + (4, 1, 2, 2)
    assert not torch.equal(rank0["noise"], rank1["noise"])  # each rank draws its own noise
    for name, tensor in rank0["state_dict"].items():
        torch.testing.assert_close(tensor, rank1["state_dict"][name], rtol=0, atol=0, msg=name)


def test_ddp_without_find_unused_parameters_is_refused_naming_the_strategy(tmp_path: Path) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        strict = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 1))
        with pytest.raises(ValueError, match=r'strategy="ddp_find_unused_parameters_true"'):
            check_ddp(strict)
        check_ddp(torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 1), find_unused_parameters=True))
    finally:
        torch.distributed.destroy_process_group()
