"""Reliability: exact resume, safe interruption, atomic checkpoints, the non-finite guard, DDP resume, seeded
determinism, and the bad-input cases not already covered by test_cli.py / test_module.py / test_data.py /
test_datasets.py."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch
from conftest import TINY_NETS, PlateauOnValidationLoss, quiet_trainer, tiny_nets
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, LightningDataModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor
from torch.utils.data import BatchSampler, DistributedSampler, TensorDataset

from lightning_gan import (
    GAN,
    CollapseMonitor,
    GANDataModule,
    LatentInterpolation,
    MaxoutDiscriminator,
    MLPGenerator,
    ParzenEvaluation,
    SampleGrid,
)
from lightning_gan._lightning import set_sigterm_flag
from lightning_gan.checkpointing import (
    AtomicCheckpointIO,
    InterruptCheckpoint,
    check_writable,
    with_safe_checkpointing,
)
from lightning_gan.cli import build_cli
from lightning_gan.data import InMemoryTensors, _whole_batch
from lightning_gan.guards import NonFiniteError, NonFiniteGuard
from lightning_gan.resume import EpochRandomSampler, ResumableDataLoader

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BATCHES_PER_EPOCH = 5  # odd, so that with k = 2 the generator's phase crosses the epoch boundary


@pytest.fixture(autouse=True)
def default_signal_handlers() -> Iterator[None]:
    """Python's own SIGINT and SIGTERM handlers for each test, whatever pytest was started with (``nohup`` or a
    background shell start it with SIGINT ignored), and the ones before restored afterwards."""
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def tiny_gan(cls: type[GAN] = GAN, **kwargs: Any) -> GAN:
    """Dropout on (the random state matters), k = 2, the lr decay and a momentum ramp that moves every epoch."""
    defaults: dict[str, Any] = {"k": 2, "lr_decay": 1.01, "momentum_final": 0.7, "momentum_saturate_epoch": 3}
    return cls(*tiny_nets(), **{**defaults, **kwargs})


class TinyData(LightningDataModule):
    """In-memory images; the loaders are built in the hooks, as GANDataModule does (Lightning can re-wrap them)."""

    def __init__(self, batches: int = BATCHES_PER_EPOCH, batch_size: int = 4) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.train = torch.rand(batches * batch_size + 2, 1, 2, 2, generator=generator)  # + 2: dropped (drop_last)
        self.val = torch.rand(8, 1, 2, 2, generator=generator)
        self.batch_size = batch_size

    def train_dataloader(self) -> ResumableDataLoader:
        return ResumableDataLoader(TensorDataset(self.train), batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> ResumableDataLoader:
        return ResumableDataLoader(TensorDataset(self.val), batch_size=self.batch_size)


class RecordBatches(Callback):
    """The training batches in the order they were used."""

    def __init__(self) -> None:
        self.batches: list[Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(batch[0].clone())


class SendSignal(Callback):
    """Sends ``signum`` to this process ``times`` times, after the step that brings ``global_step`` to ``at_step``."""

    def __init__(self, at_step: int, signum: int, times: int = 1) -> None:
        self.at_step, self.signum, self.times = at_step, signum, times

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)


def fit(
    root: Path,
    epochs: int = 2,
    ckpt_path: Path | None = None,
    callbacks: tuple[Callback, ...] = (),
    checkpoint: ModelCheckpoint | None = None,
    gan: GAN | None = None,
    plugins: list[Any] | None = None,
    **trainer_kwargs: Any,
) -> tuple[Trainer, GAN, RecordBatches]:
    seed_everything(0, verbose=False)
    gan = gan if gan is not None else tiny_gan()
    record = RecordBatches()
    checkpoint = checkpoint or ModelCheckpoint(dirpath=root / "checkpoints", save_top_k=-1)
    trainer = quiet_trainer(
        max_epochs=epochs,
        default_root_dir=root,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        plugins=plugins or [AtomicCheckpointIO()],
        callbacks=[record, *callbacks, InterruptCheckpoint(), checkpoint],
        **trainer_kwargs,
    )
    trainer.fit(gan, datamodule=TinyData(), ckpt_path=ckpt_path)
    return trainer, gan, record


def training_state(trainer: Trainer, gan: GAN) -> dict[str, Any]:
    """Everything that must match bitwise: weights, optimizer and scheduler states, counters, the random state."""
    return {
        "weights": gan.state_dict(),
        "optimizers": [optimizer.state_dict() for optimizer in trainer.optimizers],
        "schedulers": [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs],
        "global_step": trainer.global_step,
        "generator_updates": gan.generator_updates,
        "rng": torch.get_rng_state(),
    }


def assert_identical(a: Any, b: Any, where: str = "state") -> None:
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two epochs without interruption, with a checkpoint at each epoch's end (saved at the end of validation)."""
    root = tmp_path_factory.mktemp("straight")
    trainer, gan, record = fit(root)
    return {"state": training_state(trainer, gan), "batches": record.batches, "root": root}


# ------------------------------------------------------------------------------------------------- exact resume
def test_resume_from_the_end_of_epoch_one_is_bitwise_exact(straight_run: dict[str, Any], tmp_path: Path) -> None:
    checkpoint = straight_run["root"] / "checkpoints" / f"epoch=0-step={BATCHES_PER_EPOCH}.ckpt"
    trainer, gan, record = fit(tmp_path, ckpt_path=checkpoint)
    assert_identical(training_state(trainer, gan), straight_run["state"])
    assert_identical(record.batches, straight_run["batches"][BATCHES_PER_EPOCH:], "batches")
    assert gan.trainer.optimizers[0].param_groups[0]["momentum"] == pytest.approx(0.7)  # the ramp caught up (epoch 3)


def test_resuming_with_another_number_of_processes_warns(straight_run: dict[str, Any], tmp_path: Path) -> None:
    checkpoint = torch.load(
        straight_run["root"] / "checkpoints" / f"epoch=0-step={BATCHES_PER_EPOCH}.ckpt", weights_only=True
    )
    checkpoint["lightning_gan"]["rng_states"] *= 2  # as if saved by 2 DDP ranks
    torch.save(checkpoint, tmp_path / "two_ranks.ckpt")
    with pytest.warns(UserWarning, match=r"random state of 2 process\(es\), this run has 1"):
        fit(tmp_path / "resumed", ckpt_path=tmp_path / "two_ranks.ckpt")


class HalvingGeneratorLR(GAN):
    """With a scheduler of its own besides the authors': the generator's learning rate halves every epoch."""

    def configure_optimizers(self):
        optimizers, schedulers = super().configure_optimizers()
        return optimizers, [*schedulers, torch.optim.lr_scheduler.StepLR(optimizers[1], step_size=1, gamma=0.5)]


class PlateauLR(PlateauOnValidationLoss, GAN):
    """The discriminator's learning rate on a plateau of the validation loss, given it as the README says."""

    def configure_optimizers(self):
        optimizers, schedulers = super().configure_optimizers()
        return optimizers, [*schedulers, torch.optim.lr_scheduler.ReduceLROnPlateau(optimizers[0], patience=0)]


def test_a_resume_at_validation_end_does_not_step_a_plateau_scheduler_without_its_metric(tmp_path: Path) -> None:
    at_validation_end = ModelCheckpoint(tmp_path / "first", save_top_k=-1, save_on_train_epoch_end=False)
    fit(tmp_path / "first", epochs=1, checkpoint=at_validation_end, gan=tiny_gan(PlateauLR, lr_decay=1.0))
    checkpoint = tmp_path / "first" / f"epoch=0-step={BATCHES_PER_EPOCH}.ckpt"
    resumed, _, _ = fit(tmp_path / "resumed", ckpt_path=checkpoint, gan=tiny_gan(PlateauLR, lr_decay=1.0))
    # stepped at the end of epoch 2 only: epoch 1's end, repeated by the resume, has lost its metric (Lightning's
    # automatic optimization skips plateau schedulers there too)
    assert resumed.current_epoch == 2 and resumed.lr_scheduler_configs[-1].scheduler.last_epoch == 1


def halving_gan() -> GAN:
    torch.manual_seed(0)  # the same initial weights for both runs
    return tiny_gan(HalvingGeneratorLR, lr_decay=1.0)


def test_resume_catches_up_own_per_epoch_schedulers(tmp_path: Path) -> None:
    straight, gan, _ = fit(tmp_path / "straight", gan=halving_gan())
    assert gan.trainer.optimizers[1].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)
    expected = training_state(straight, gan)
    # saved at the end of the epoch's last batch, before the epoch ends and its scheduler steps
    last_batch = ModelCheckpoint(tmp_path / "first", every_n_train_steps=BATCHES_PER_EPOCH, save_top_k=-1)
    fit(tmp_path / "first", epochs=1, checkpoint=last_batch, gan=halving_gan())
    checkpoint = tmp_path / "first" / f"epoch=0-step={BATCHES_PER_EPOCH}.ckpt"
    resumed, gan, _ = fit(tmp_path / "resumed", ckpt_path=checkpoint, gan=halving_gan())
    assert_identical(training_state(resumed, gan), expected)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_mid_epoch_leaves_a_checkpoint_that_resumes_exactly(
    straight_run: dict[str, Any], tmp_path: Path, signum: int, recwarn: pytest.WarningsRecorder
) -> None:
    stop_at = BATCHES_PER_EPOCH + 2  # mid-way through the second epoch
    with pytest.raises(SystemExit):
        fit(tmp_path / "first", callbacks=(SendSignal(stop_at, signum),))
    interrupted = tmp_path / "first" / "checkpoints" / "interrupted.ckpt"
    assert torch.load(interrupted, weights_only=True)["global_step"] == stop_at
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C handling handed back

    trainer, gan, record = fit(tmp_path / "resumed", ckpt_path=interrupted)
    assert_identical(training_state(trainer, gan), straight_run["state"])
    assert_identical(record.batches, straight_run["batches"][stop_at:], "batches")
    assert not [w for w in recwarn if "not resumable" in str(w.message)]


def fake_slurm_job(monkeypatch: pytest.MonkeyPatch, bin_dir: Path) -> Path:
    """Environment variables of a one-task SLURM job step (``srun``), and an ``scontrol`` on the PATH that records
    its arguments in the returned file instead of requeueing anything."""
    for name, value in {
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_JOB_NAME": "gan",
        "SLURM_JOB_ID": "4242",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
    }.items():
        monkeypatch.setenv(name, value)
    bin_dir.mkdir()
    calls = bin_dir / "scontrol-calls"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return calls


def test_under_slurm_the_requeue_signal_leaves_a_checkpoint_that_resumes_exactly(
    straight_run: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = fake_slurm_job(monkeypatch, tmp_path / "bin")
    plugins = with_safe_checkpointing({}, {})["plugins"]  # what the `lightning-gan` command passes
    (slurm,) = [plugin for plugin in plugins if isinstance(plugin, SLURMEnvironment)]
    assert not slurm.auto_requeue  # Lightning's would save hpc_ckpt_1.ckpt inside the signal handler
    stop_at = BATCHES_PER_EPOCH + 2
    with pytest.raises(SystemExit):
        fit(tmp_path / "first", callbacks=(SendSignal(stop_at, signal.SIGUSR1),), plugins=plugins)
    interrupted = tmp_path / "first" / "checkpoints" / "interrupted.ckpt"
    assert torch.load(interrupted, weights_only=True)["global_step"] == stop_at
    assert not list((tmp_path / "first").rglob("hpc_ckpt_*.ckpt")) and not calls.exists()  # no auto-requeue
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handed back

    trainer, gan, record = fit(
        tmp_path / "resumed", ckpt_path=interrupted, plugins=with_safe_checkpointing({}, {})["plugins"]
    )
    assert_identical(training_state(trainer, gan), straight_run["state"])
    assert_identical(record.batches, straight_run["batches"][stop_at:], "batches")


def test_the_slurm_environment_is_added_only_under_slurm_and_only_when_none_is_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    assert not any(isinstance(p, SLURMEnvironment) for p in with_safe_checkpointing({}, {})["plugins"])
    fake_slurm_job(monkeypatch, tmp_path / "bin")
    own = SLURMEnvironment(auto_requeue=True)  # a user who wants Lightning's auto-requeue keeps it
    assert with_safe_checkpointing({"plugins": [own]}, {})["plugins"][0] is own
    assert [
        p for p in with_safe_checkpointing({"plugins": [own]}, {})["plugins"] if isinstance(p, SLURMEnvironment)
    ] == [own]


def test_the_resume_command_quotes_a_path_with_spaces(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "my runs"
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit):
        fit(root, callbacks=(SendSignal(2, signal.SIGTERM),))
    interrupted = root / "checkpoints" / "interrupted.ckpt"
    assert f"Resume with `--ckpt_path '{interrupted}'`" in caplog.text  # pastes into a shell as one argument


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as stopped:
        fit(tmp_path, callbacks=(SendSignal(2, signal.SIGINT, times=2),))
    assert stopped.value.code == 1  # Lightning's exit status for KeyboardInterrupt
    assert not (tmp_path / "checkpoints" / "interrupted.ckpt").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_under_ddp_a_sigterm_waits_for_the_ranks_agreement_wherever_it_arrives(monkeypatch: pytest.MonkeyPatch) -> None:
    killed: list[int] = []
    trainer, step = quiet_trainer(), {"global": 0}
    monkeypatch.setattr(Trainer, "world_size", property(lambda self: 2))
    monkeypatch.setattr(Trainer, "global_step", property(lambda self: step["global"]))
    monkeypatch.setattr(type(trainer.strategy), "launcher", property(lambda self: SimpleNamespace(kill=killed.append)))
    module = SimpleNamespace(device=torch.device("cpu"))

    def lightnings_handler(signum: int, frame: Any) -> None:  # sets the flag that stops this rank alone
        set_sigterm_flag(trainer, True)

    before = signal.signal(signal.SIGTERM, lightnings_handler)
    interrupt = InterruptCheckpoint(sync_every_n_steps=2)
    try:
        interrupt.on_train_start(trainer, module)
        signal.raise_signal(signal.SIGTERM)  # e.g. while another callback ends a validation
        signal.raise_signal(signal.SIGTERM)
        assert not trainer.received_sigterm  # noted, but this rank does not stop alone
        assert killed == [signal.SIGTERM]  # passed on once to the processes this one launched
        step["global"] = 1
        interrupt.on_train_batch_end(trainer, module, None, None, 0)
        assert not trainer.received_sigterm  # between two agreements
        step["global"] = 2
        interrupt.on_train_batch_end(trainer, module, None, None, 1)
        assert trainer.received_sigterm  # the ranks agreed on the noted request (one process here: its own)
        interrupt.on_train_end(trainer, module)
        assert signal.getsignal(signal.SIGTERM) is lightnings_handler
    finally:
        interrupt.teardown(trainer, module, "fit")
        signal.signal(signal.SIGTERM, before)


def test_under_ddp_the_requeue_signal_waits_for_the_ranks_agreement(monkeypatch: pytest.MonkeyPatch) -> None:
    trainer, step = quiet_trainer(), {"global": 0}
    monkeypatch.setattr(Trainer, "world_size", property(lambda self: 2))
    monkeypatch.setattr(Trainer, "global_step", property(lambda self: step["global"]))
    module = SimpleNamespace(device=torch.device("cpu"))
    interrupt = InterruptCheckpoint(sync_every_n_steps=2)
    try:
        interrupt.on_train_start(trainer, module)
        signal.raise_signal(signal.SIGUSR1)  # SLURM's warning, on this rank only
        assert not trainer.received_sigterm  # noted, but this rank does not stop alone
        step["global"] = 1
        interrupt.on_train_batch_end(trainer, module, None, None, 0)
        assert not trainer.received_sigterm
        step["global"] = 2
        interrupt.on_train_batch_end(trainer, module, None, None, 1)
        assert trainer.received_sigterm  # the ranks agreed (one process here: its own request)
    finally:
        interrupt.teardown(trainer, module, "fit")
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_a_signal_stops_validate_without_writing_a_checkpoint(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    trainer = quiet_trainer(
        default_root_dir=tmp_path,
        limit_val_batches=2,
        callbacks=[SignalOnRankZeroWhileValidating("batch"), InterruptCheckpoint(folder)],
    )
    with pytest.raises(SIGTERMException):
        trainer.validate(tiny_gan(), datamodule=TinyData())
    assert not folder.exists()  # a fit's interrupted.ckpt there would have been overwritten


def test_a_fit_starts_by_removing_temporary_files_of_killed_checkpoint_writers(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())
    orphan = folder / f".last.ckpt.{host}.{int(gone.stdout)}.0123abcd.tmp"  # ~18 MB each on MNIST
    orphan.write_bytes(b"half a checkpoint")
    os.utime(orphan, (time.time() - 120, time.time() - 120))  # its writer was killed two minutes ago
    InterruptCheckpoint(folder).setup(quiet_trainer(default_root_dir=tmp_path), tiny_gan(), "fit")
    assert not orphan.exists()


def test_the_loader_position_survives_a_state_dict_round_trip() -> None:
    data = TensorDataset(torch.arange(18.0))

    def loader() -> ResumableDataLoader:
        return ResumableDataLoader(data, batch_size=3, shuffle=True, drop_last=True, seed=7)

    full = loader()
    epochs = [[b[0].tolist() for b in full] for _ in range(2)]  # by hand, without set_epoch: the epoch advances
    assert epochs[0] != epochs[1]
    assert sorted(x for batch in epochs[1] for x in batch) == list(range(18))
    partial = loader()
    iterator = iter(partial)
    _ = [next(iterator) for _ in range(4)]
    resumed = loader()
    resumed.load_state_dict(partial.state_dict())
    assert [b[0].tolist() for b in resumed] == epochs[0][4:]
    assert isinstance(resumed.sampler, EpochRandomSampler) and len(resumed) == 6
    in_order = ResumableDataLoader(data, batch_size=3)  # no shuffling: no epoch to count
    in_order.load_state_dict({"epoch": None, "batches": 6, "seed": None})  # a finished pass: the next is whole
    assert len([batch for batch in in_order]) == 6


def test_a_loader_given_a_batch_sampler_keeps_its_own_stacks_device_indices_and_skipping() -> None:
    # how Lightning re-creates the loader under DDP: around a batch sampler of its DistributedSampler
    data = InMemoryTensors(torch.arange(40.0))
    shard = DistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=5)

    def loader() -> ResumableDataLoader:
        return ResumableDataLoader(
            data,
            batch_sampler=BatchSampler(shard, batch_size=2, drop_last=True),
            collate_fn=_whole_batch,
            stack_batches=2,
            index_device=torch.device("cpu"),
        )

    order = list(shard)  # this rank's 20 examples of epoch 0
    full = loader()
    assert full.sampler is shard and full.batch_size == 2 and full.drop_last and len(full) == 5
    stacks = [images for (images,) in full]
    assert [s.tolist() for s in stacks] == [torch.tensor(order[i : i + 4]).view(2, 2).tolist() for i in range(0, 20, 4)]
    partial = loader()
    iterator = iter(partial)
    _ = [next(iterator) for _ in range(2)]
    resumed = loader()
    resumed.load_state_dict(partial.state_dict())
    assert [images.tolist() for (images,) in resumed] == [s.tolist() for s in stacks[2:]]


def test_the_loader_refuses_what_it_cannot_resume() -> None:
    data = TensorDataset(torch.arange(6.0))
    with pytest.raises(ValueError, match="hands out batches: pass a `batch_size`"):
        ResumableDataLoader(data, batch_size=None)
    with pytest.raises(TypeError, match="pass a `BatchSampler`"):
        ResumableDataLoader(data, batch_sampler=[[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="mutually exclusive"):
        ResumableDataLoader(data, batch_size=2, batch_sampler=BatchSampler(range(6), 2, drop_last=False))


def test_runs_built_in_python_resume_with_weights_only_loading(tmp_path: Path) -> None:
    # A partial optimizer factory and a Path data folder are natural from Python; neither may reach the checkpoint's
    # pickle, which Lightning (like torch.load by default) reads with weights_only=True.
    def partial_sgd() -> GAN:
        return tiny_gan(generator_optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.5))

    fit(tmp_path, epochs=1, gan=partial_sgd())
    path = tmp_path / "checkpoints" / f"epoch=0-step={BATCHES_PER_EPOCH}.ckpt"
    assert torch.load(path, weights_only=True)["hyper_parameters"]["k"] == 2
    loaded = GAN.load_from_checkpoint(path, generator=tiny_nets()[0], discriminator=tiny_nets()[1])
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert loaded.k == 2 and all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())
    trainer, gan, _ = fit(tmp_path / "resumed", epochs=2, ckpt_path=path, gan=partial_sgd())
    assert trainer.global_step == 2 * BATCHES_PER_EPOCH
    assert gan.trainer.optimizers[1].param_groups[0]["lr"] < 0.05  # the user's generator optimizer, decayed

    hparams = GANDataModule(data_dir=tmp_path, download=False).hparams
    torch.save(dict(hparams), tmp_path / "hparams.pt")
    assert torch.load(tmp_path / "hparams.pt", weights_only=True)["data_dir"] == str(tmp_path)


class WithAuxiliaryHead(GAN):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.aux_head = torch.nn.Linear(2, 2)


def test_a_checkpoint_of_other_networks_loads_with_strict_false_and_is_named_otherwise(tmp_path: Path) -> None:
    fit(tmp_path, epochs=1)
    path = tmp_path / "checkpoints" / f"epoch=0-step={BATCHES_PER_EPOCH}.ckpt"
    nets = {"generator": tiny_nets()[0], "discriminator": tiny_nets()[1]}
    with pytest.raises(ValueError, match=r"another architecture: aux_head.weight is missing from the checkpoint"):
        WithAuxiliaryHead.load_from_checkpoint(path, **nets)
    loaded = WithAuxiliaryHead.load_from_checkpoint(path, strict=False, **nets)
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in saved.items())


def test_evaluation_and_figures_leave_the_training_random_stream_alone(mnist_root: Path, tmp_path: Path) -> None:
    def trained_weights(evaluate: bool) -> dict[str, Tensor]:
        seed_everything(0, verbose=False)
        gan = GAN(
            MLPGenerator(noise_dim=8, hidden_sizes=(16,), hidden_activations=("relu",)),
            MaxoutDiscriminator(units=(8,), pieces=2),  # dropout on: every random draw shows in the weights
        )
        callbacks = [
            ParzenEvaluation(num_samples=200, val_size=20, test_size=20, chunk_size=100),
            SampleGrid(num_samples=4, nrow=2, nearest_neighbours=True),
            LatentInterpolation(num_rows=2, num_steps=3),
            CollapseMonitor(num_samples=20, num_reference=50),
        ]
        trainer = quiet_trainer(
            max_epochs=2,
            limit_train_batches=3,
            limit_val_batches=2 if evaluate else 0,
            num_sanity_val_steps=2 if evaluate else 0,
            callbacks=callbacks if evaluate else [],
            default_root_dir=tmp_path / str(evaluate),
            enable_checkpointing=False,
        )
        trainer.fit(gan, datamodule=GANDataModule(data_dir=mnist_root, download=False))
        if evaluate:
            assert "parzen/val_ll" in trainer.callback_metrics and "monitor/d_real" in trainer.callback_metrics
        return gan.state_dict()

    assert_identical(trained_weights(evaluate=False), trained_weights(evaluate=True), "weights")


def test_gan_datamodule_uses_the_resumable_loader_and_sampler(mnist_root: Path) -> None:
    dm = GANDataModule(data_dir=mnist_root, download=False)
    assert isinstance(dm.train_dataloader(), ResumableDataLoader)
    assert isinstance(dm.train_dataloader().sampler, EpochRandomSampler)


# ------------------------------------------------------------------------------------------------- atomic files
def test_checkpoint_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io, path = AtomicCheckpointIO(), tmp_path / "run" / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    renames: list[tuple[Path, Path]] = []
    real_replace = os.replace
    monkeypatch.setattr(
        os, "replace", lambda src, dst: renames.append((Path(src), Path(dst))) or real_replace(src, dst)
    )
    io.save_checkpoint({"step": 2}, path)
    assert renames[0][0].parent == path.parent and renames[0][1] == path  # temporary file in the same folder

    def torch_save_killed_half_way(obj: Any, file: Any) -> None:
        file.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # e.g. killed while writing

    monkeypatch.setattr(torch, "save", torch_save_killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 3}, path)
    assert torch.load(path, weights_only=True) == {"step": 2}  # the previous file, whole
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left


# ------------------------------------------------------------------------------------------------- non-finite guard
class NaNGAN(GAN):
    """Returns a NaN loss for ``network`` in the batches of the given global steps."""

    nan_at: ClassVar[dict[str, set[int]]] = {}

    def training_step(self, batch: Any, batch_idx: int) -> None:
        self._batch_step = self.global_step
        super().training_step(batch, batch_idx)

    def _maybe_nan(self, network: str, loss: Tensor) -> Tensor:
        return loss * float("nan") if self.training and self._batch_step in self.nan_at.get(network, ()) else loss

    def discriminator_loss(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        return self._maybe_nan("discriminator", super().discriminator_loss(real_logits, fake_logits))

    def generator_loss_fn(self, fake_logits: Tensor) -> Tensor:
        return self._maybe_nan("generator", super().generator_loss_fn(fake_logits))


def nan_gan(nan_at: dict[str, set[int]], **kwargs: Any) -> GAN:
    gan = tiny_gan(NaNGAN, **{"k": 1, **kwargs})
    gan.nan_at = nan_at
    return gan


def every_step(root: Path) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=1, save_top_k=-1)


def saved_steps(root: Path) -> list[int]:
    return sorted(torch.load(p, weights_only=True)["global_step"] for p in (root / "checkpoints").glob("*.ckpt"))


def assert_finite(gan: GAN) -> None:
    assert all(torch.isfinite(p).all() for p in gan.parameters())


@pytest.mark.parametrize(
    ("nan_at", "schedule", "message"),
    [
        ({"discriminator": {3}}, "alternating", r"Non-finite discriminator loss \(nan\) at global step 3 "),
        ({"generator": {3}}, "alternating", r"Non-finite generator loss \(nan\) at global step 3 "),
        ({"generator": {3}}, "simultaneous", r"Non-finite generator loss \(\S+, nan\) at global step 3 "),
    ],
)
def test_stop_names_the_step_and_network_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, nan_at: dict[str, set[int]], schedule: str, message: str
) -> None:
    with pytest.raises(NonFiniteError, match=message) as error:
        fit(tmp_path, gan=nan_gan(nan_at, schedule=schedule), checkpoint=every_step(tmp_path))
    assert "lower learning rate" in str(error.value) and "nonfinite=skip" in str(error.value)
    assert saved_steps(tmp_path) == [1, 2, 3]  # nothing after the bad step; no interruption checkpoint either
    last = torch.load(tmp_path / "checkpoints" / "epoch=0-step=3.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


class StateAtStart(Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.lr = pl_module.trainer.optimizers[0].param_groups[0]["lr"]
        self.weights = {k: v.clone() for k, v in pl_module.state_dict().items()}


def test_the_stop_advice_gives_a_new_fit_from_the_last_weights_at_a_lower_learning_rate(tmp_path: Path) -> None:
    advice = re.escape("GAN.load_from_checkpoint(path, discriminator_optimizer=..., nonfinite='skip')")
    with pytest.raises(NonFiniteError, match=advice):
        fit(tmp_path, gan=nan_gan({"discriminator": {3}}), checkpoint=every_step(tmp_path))
    path = tmp_path / "checkpoints" / "epoch=0-step=3.ckpt"
    lower = functools.partial(torch.optim.SGD, lr=0.001, momentum=0.5)
    nets = {"generator": tiny_nets()[0], "discriminator": tiny_nets()[1]}
    gan = GAN.load_from_checkpoint(path, **nets, discriminator_optimizer=lower, nonfinite="skip")
    start = StateAtStart()
    quiet_trainer(max_steps=2, callbacks=[start], default_root_dir=tmp_path / "new").fit(gan, datamodule=TinyData())
    assert start.lr == 0.001 and gan.nonfinite == "skip"
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert all(torch.equal(start.weights[key], value) for key, value in saved.items())


def test_skip_leaves_updates_out_counts_them_and_resumes_the_count(tmp_path: Path) -> None:
    nan_at = {"discriminator": {2, 5}, "generator": {6}}
    trainer, gan, _ = fit(tmp_path, gan=nan_gan(nan_at, nonfinite="skip"), log_every_n_steps=5)
    assert gan.skipped_updates == 3
    assert trainer.callback_metrics["train/skipped_updates"] == 3  # logged at step 10
    assert trainer.global_step == 2 * BATCHES_PER_EPOCH  # a skipped batch still counts as a training batch
    assert gan.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(
        0.1 / 1.01**8
    )  # 8 real discriminator updates
    assert_finite(gan)
    checkpoint = torch.load(tmp_path / "checkpoints" / "epoch=1-step=10.ckpt", weights_only=True)
    assert checkpoint["lightning_gan"]["skipped_updates"] == 3
    resumed = nan_gan({}, nonfinite="skip")
    fit(tmp_path / "more", epochs=3, gan=resumed, ckpt_path=tmp_path / "checkpoints" / "epoch=1-step=10.ckpt")
    assert resumed.skipped_updates == 3


def test_skipped_updates_are_reported_once_on_the_console(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    nan_at = {"discriminator": {2, 5}, "generator": {6}}  # one skip in epoch 0, two in epoch 1
    fit(tmp_path, gan=nan_gan(nan_at, nonfinite="skip"))
    (warning,) = [str(w.message) for w in recwarn if "nonfinite='skip' left out" in str(w.message)]
    # epoch 0: 5 discriminator and 5 generator updates (k = 1) checked, one skipped
    assert warning.startswith("nonfinite='skip' left out 1 of the 10 updates checked so far in this run (10%)")
    assert "by epoch 0, global step 5; 1 in all, logged as train/skipped_updates" in warning


class PoisonGenerator(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 3:
            next(pl_module.generator.parameters()).data[0] = float("inf")


@pytest.mark.parametrize("nonfinite", ["stop", "skip"])
def test_non_finite_parameters_are_never_checkpointed_and_stop_training(tmp_path: Path, nonfinite: str) -> None:
    with pytest.raises(NonFiniteError, match="Not writing a checkpoint at global step 3: the generator parameters"):
        fit(
            tmp_path, gan=tiny_gan(nonfinite=nonfinite), callbacks=(PoisonGenerator(),), checkpoint=every_step(tmp_path)
        )
    assert saved_steps(tmp_path) == [1, 2]
    # without a checkpoint at that step, the next loss is NaN; skipping cannot help, so "skip" stops as well
    with pytest.raises(NonFiniteError, match="generator parameters are non-finite already"):
        fit(tmp_path / "no-checkpoints", gan=tiny_gan(nonfinite="skip"), callbacks=(PoisonGenerator(),))


def test_the_deferred_check_for_accelerators_still_names_the_first_bad_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(NonFiniteGuard, "deferred", lambda self, device: True)  # as on a GPU: no host sync per step
    with pytest.raises(NonFiniteError, match=r"discriminator loss at global step 3 .*stopped at step 4"):
        fit(tmp_path, gan=nan_gan({"discriminator": {3}}), checkpoint=every_step(tmp_path), log_every_n_steps=50)
    assert saved_steps(tmp_path) == [1, 2, 3]  # the checkpoint of step 4 checked first, and was not written


# ------------------------------------------------------------------------------------------------- DDP
class SaveFinalState(Callback):
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:
        state = {"weights": pl_module.state_dict(), "optimizers": [o.state_dict() for o in trainer.optimizers]}
        torch.save(state, self.folder / f"rank{trainer.global_rank}.pt")


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Fail instead of hanging (a forked process can deadlock on some OpenMP runtimes)."""

    def expired(signum: int, frame: Any) -> None:
        raise TimeoutError(f"the 2-process run took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def ddp_fit(root: Path, ckpt_path: Path | None = None) -> list[dict[str, Any]]:
    """Two CPU processes (gloo). `ddp_fork`: the same DDP strategy as `ddp`/`ddp_spawn` (test_ddp.py), started by
    fork, which spares the children re-importing everything (about 1 s a run instead of 25 s here)."""
    root.mkdir(parents=True, exist_ok=True)
    seed_everything(0, verbose=False)
    trainer = quiet_trainer(
        devices=2,
        strategy="ddp_fork_find_unused_parameters_true",
        max_epochs=2,
        limit_val_batches=0,
        plugins=[AtomicCheckpointIO()],
        callbacks=[SaveFinalState(root), ModelCheckpoint(root / "checkpoints", every_n_train_steps=3, save_top_k=-1)],
    )
    with time_limit(120):
        trainer.fit(tiny_gan(), datamodule=TinyData(batches=2 * BATCHES_PER_EPOCH), ckpt_path=ckpt_path)
    return [torch.load(root / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]


def test_ddp_resume_mid_epoch_is_exact_and_ranks_stay_identical(tmp_path: Path) -> None:
    # 2 ranks x 5 batches per epoch; the checkpoint at step 6 is mid-way through the second epoch
    straight = ddp_fit(tmp_path / "straight")
    checkpoint = torch.load(tmp_path / "straight" / "checkpoints" / "epoch=1-step=6.ckpt", weights_only=True)
    states = checkpoint["lightning_gan"]["rng_states"]
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])  # one per rank
    resumed = ddp_fit(tmp_path / "resumed", ckpt_path=tmp_path / "straight" / "checkpoints" / "epoch=1-step=6.ckpt")
    assert_identical(straight[0], straight[1], "straight rank 0 vs 1")
    assert_identical(resumed[0], straight[0], "resumed vs straight, rank 0")
    assert_identical(resumed[1], straight[1], "resumed vs straight, rank 1")


# ------------------------------------------------------------------------------------------------- determinism
def sample_after_training(seed: int, root: Path) -> Tensor:
    seed_everything(seed, verbose=False)
    gan = tiny_gan()
    quiet_trainer(max_epochs=1, enable_checkpointing=False, default_root_dir=root, limit_val_batches=0).fit(
        gan, datamodule=TinyData()
    )
    return gan.sample(6)


def test_the_same_seed_gives_the_same_samples(tmp_path: Path) -> None:
    first = sample_after_training(3, tmp_path)
    assert torch.equal(first, sample_after_training(3, tmp_path))
    assert not torch.equal(first, sample_after_training(4, tmp_path))


# ------------------------------------------------------------------------------------------------- bad input (CLI)
def cli_args(data_dir: Path, root: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", str(CONFIGS / "mnist.yaml"), f"--data.init_args.data_dir={data_dir}",
        "--data.init_args.download=false", f"--trainer.default_root_dir={root}", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
        "--trainer.accelerator=cpu", *TINY_NETS, *extra,
    ]  # fmt: skip


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.mark.parametrize(
    ("yaml", "message"),
    [
        ("model:\n  init_args:\n    kk: 3\n", "Option 'kk' is not accepted"),
        ("trainer:\n  max_epoch: 3\n", "does not accept option 'trainer.max_epoch'"),
        ("model:\n  init_args:\n    k: two\n", "Expected a <class 'int'>. Got value: two"),
        ("data:\n  init_args:\n    batch_size: [100]\n", "batch_size"),
        ("model:\n  init_args:\n    nonfinite: ignore\n", "nonfinite"),
    ],
    ids=["unknown-model-key", "unknown-trainer-key", "k-not-an-int", "batch-size-a-list", "unknown-nonfinite"],
)
def test_unknown_yaml_keys_and_wrong_types_fail_before_anything_is_written(
    yaml: str, message: str, mnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bad.yaml").write_text(yaml)
    with pytest.raises(SystemExit):
        build_cli(cli_args(mnist_root, tmp_path / "run", "--config", str(tmp_path / "bad.yaml")))
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("problem", ["missing", "truncated"])
def test_bad_dataset_files_fail_through_the_cli_before_anything_is_written(
    problem: str, mnist_root: Path, tmp_path: Path
) -> None:
    # the IDX checks themselves are tested in test_data.py; here: they stop the CLI before training and writing
    data = tmp_path / "data"
    if problem == "truncated":
        shutil.copytree(mnist_root / "MNIST", data / "MNIST")
        images = data / "MNIST" / "raw" / "train-images-idx3-ubyte"
        images.write_bytes(images.read_bytes()[:-100])
    with pytest.raises((FileNotFoundError, ValueError), match="train-images-idx3-ubyte"):
        build_cli(cli_args(data, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_of_other_networks_is_named_with_the_fix_before_training(mnist_root: Path, tmp_path: Path) -> None:
    cli = build_cli(cli_args(mnist_root, tmp_path / "first"))
    # the CLI's defaults: atomic checkpoint files, a checkpoint on SIGTERM / Ctrl-C
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert any(isinstance(c, InterruptCheckpoint) for c in cli.trainer.callbacks)
    checkpoint = next((tmp_path / "first").rglob("*.ckpt"))
    # through the CLI the checkpoint's own network configuration wins (LightningCLI re-reads its hyperparameters)
    bigger = "--model.init_args.generator.init_args.hidden_sizes=[32,16]"
    resumed = build_cli(cli_args(mnist_root, tmp_path / "second", bigger, f"--ckpt_path={checkpoint}"))
    assert resumed.model.generator.net[0].out_features == 16
    # from Python, other networks are refused before training, naming the mismatch and the fix
    generator = MLPGenerator(hidden_sizes=(32, 16), hidden_activations=("relu", "relu"))
    gan = GAN(generator, MaxoutDiscriminator(units=(8, 8)))
    trainer = Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
                      default_root_dir=tmp_path / "third")  # fmt: skip
    with pytest.raises(ValueError, match="another architecture") as error:
        trainer.fit(gan, datamodule=GANDataModule(data_dir=mnist_root, download=False), ckpt_path=checkpoint)
    message = str(error.value)
    assert "generator.net.0.weight has shape (16, 100) in the checkpoint but (32, 100) in this model" in message
    assert "config.yaml" in message and str(checkpoint) in message
    assert not list((tmp_path / "third").rglob("*.ckpt"))


def test_an_unwritable_output_folder_fails_before_training_with_nothing_written(
    mnist_root: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match=r"Cannot write checkpoints to .*--trainer\.default_root_dir"):
        build_cli(cli_args(mnist_root, blocker / "run"))
    assert files_under(tmp_path) == [blocker] and blocker.read_text() == "not a folder"


def test_a_folder_without_write_permission_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # (chmod cannot show it when the tests run as root, so the permission error is simulated)
    def denied(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr("lightning_gan.checkpointing.tempfile.TemporaryFile", denied)
    with pytest.raises(PermissionError, match=r"Cannot write checkpoints to .*out.*Permission denied"):
        check_writable(tmp_path / "out", "checkpoints")
    assert not (tmp_path / "out").exists()


class SignalOnRankZero(Callback):
    """Rank 0 alone gets the stop signal at global step 4 (as a Ctrl-C / SIGTERM reaching one process first)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank == 0 and trainer.global_step == 4:
            set_sigterm_flag(trainer, True)


class RecordStop(Callback):
    """Records the step at which each rank would stop, then stops cleanly (the fork launcher used here cannot end a
    run by Lightning's SIGTERMException; `ddp` processes started by torchrun or SLURM do)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.received_sigterm:
            (self.folder / f"stop{trainer.global_rank}").write_text(str(trainer.global_step))
            set_sigterm_flag(trainer, False)
            trainer.should_stop = True


def test_a_signal_on_one_ddp_rank_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    seed_everything(0, verbose=False)
    trainer = quiet_trainer(
        devices=2, strategy="ddp_fork_find_unused_parameters_true", max_epochs=3, limit_val_batches=0,
        default_root_dir=tmp_path, enable_checkpointing=False,
        callbacks=[SignalOnRankZero(), InterruptCheckpoint(sync_every_n_steps=3), RecordStop(tmp_path)],
    )  # fmt: skip
    with time_limit(120):
        trainer.fit(tiny_gan(), datamodule=TinyData(batches=2 * BATCHES_PER_EPOCH))
    # without the agreement rank 0 would stop alone at step 4 and hang in the checkpoint's collectives
    assert (tmp_path / "stop0").read_text() == (tmp_path / "stop1").read_text() == "6"


class SignalOnRankZeroWhileValidating(Callback):
    """Rank 0 alone gets the stop signal in the first validation: after its first batch, or as it ends."""

    def __init__(self, when: str) -> None:
        self.when = when

    def _signal(self, trainer: Trainer) -> None:
        if trainer.global_rank == 0 and not trainer.sanity_checking and trainer.current_epoch == 0:
            set_sigterm_flag(trainer, True)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.when == "batch" and batch_idx == 0:
            self._signal(trainer)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.when == "epoch_end":  # where ParzenEvaluation spends its time
            self._signal(trainer)


@pytest.mark.parametrize("when", ["batch", "epoch_end"])
def test_a_signal_on_one_ddp_rank_while_validating_stops_every_rank_at_the_same_step(tmp_path: Path, when: str) -> None:
    seed_everything(0, verbose=False)
    signal_it = SignalOnRankZeroWhileValidating(when)
    trainer = quiet_trainer(
        devices=2, strategy="ddp_fork_find_unused_parameters_true", max_epochs=3, limit_val_batches=2,
        num_sanity_val_steps=0, default_root_dir=tmp_path, enable_checkpointing=False,
        callbacks=[signal_it, InterruptCheckpoint(sync_every_n_steps=2), RecordStop(tmp_path)],
    )  # fmt: skip
    with time_limit(120):
        trainer.fit(tiny_gan(), datamodule=TinyData(batches=2 * BATCHES_PER_EPOCH, batch_size=2))
    # without holding the flag back rank 0 would leave validation alone and hang in the checkpoint's collectives
    # each rank's epoch is BATCHES_PER_EPOCH steps (5): the ranks agree at the next multiple of 2
    assert (tmp_path / "stop0").read_text() == (tmp_path / "stop1").read_text() == "6"


def test_resume_from_the_last_batch_of_an_epoch_is_bitwise_exact(straight_run: dict[str, Any], tmp_path: Path) -> None:
    # saved at the end of the epoch's last batch, before the epoch ends: Lightning then starts the next epoch
    # without its on_train_epoch_start
    every_epoch_of_steps = ModelCheckpoint(tmp_path / "first", every_n_train_steps=BATCHES_PER_EPOCH, save_top_k=-1)
    fit(tmp_path / "first", epochs=1, checkpoint=every_epoch_of_steps)
    last_batch = tmp_path / "first" / f"epoch=0-step={BATCHES_PER_EPOCH}.ckpt"
    trainer, gan, record = fit(tmp_path / "resumed", ckpt_path=last_batch)
    assert_identical(training_state(trainer, gan), straight_run["state"])
    assert_identical(record.batches, straight_run["batches"][BATCHES_PER_EPOCH:], "batches")
