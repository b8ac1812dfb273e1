"""The CUDA-graph fast path (``cuda_graph=True``): unchanged eager training on the CPU, the fast path's bookkeeping
(steps, schedules, logging, checkpoints) against the eager update, clear errors, and on a GPU the replayed graph
against the eager update."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import quiet_trainer, tiny_nets
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_gan import GAN, MatmulPrecision
from lightning_gan.graphed import GraphedUpdates, check_graph_fits, make_graph_safe, restore_settings
from lightning_gan.guards import NonFiniteError, NonFiniteGuard

BATCHES = 6


def make_gan(cls: type[GAN] = GAN, **kwargs: Any) -> GAN:
    """Equal initial weights every call; dropout on (the two paths' random streams must match too); a decay and a
    momentum ramp that move visibly."""
    seed_everything(0, verbose=False)
    defaults: dict[str, Any] = {"lr_decay": 1.01, "momentum_final": 0.7, "momentum_saturate_epoch": 3}
    return cls(*tiny_nets(), **{**defaults, **kwargs})


def loader(device: str = "cpu") -> DataLoader:
    data = torch.rand(BATCHES * 4, 1, 2, 2, generator=torch.Generator().manual_seed(0)).to(device)
    return DataLoader(TensorDataset(data), batch_size=4)


class RecordStep(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.graphed = pl_module.graph_runner is not None


def fit(
    gan: GAN, root: Path, device: str = "cpu", epochs: int = 2, ckpt_path: Path | None = None, **kwargs: Any
) -> Trainer:
    seed_everything(0, verbose=False)
    trainer = quiet_trainer(
        accelerator=device,
        devices=1,
        max_epochs=epochs,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in kwargs.get("callbacks", [])),
        default_root_dir=root,
        **{"log_every_n_steps": 2, **kwargs},
    )
    trainer.fit(gan, loader(device), ckpt_path=ckpt_path)
    return trainer


def flat(gan: GAN) -> torch.Tensor:
    return torch.cat([p.detach().flatten().cpu() for p in gan.parameters()])


def test_on_a_cpu_cuda_graph_trains_eagerly_with_identical_results(tmp_path: Path) -> None:
    eager = make_gan()
    fit(eager, tmp_path)
    graphed = make_gan(cuda_graph=True)
    record = RecordStep()
    fit(graphed, tmp_path, callbacks=[record])
    assert not record.graphed
    assert torch.equal(flat(eager), flat(graphed))


@pytest.mark.usefixtures("fast_path_on_cpu")
@pytest.mark.parametrize(
    ("schedule", "k", "optimizer"),
    [
        ("simultaneous", 1, None),
        ("alternating", 1, None),
        ("alternating", 2, None),
        ("alternating", 2, partial(torch.optim.Adam, lr=1e-3, betas=(0.5, 0.999))),
    ],
)
def test_fast_path_makes_the_eager_update(tmp_path: Path, schedule: str, k: int, optimizer: Any) -> None:
    ramp = {"momentum_final": None} if optimizer is not None else {}
    options = {"schedule": schedule, "k": k, "discriminator_optimizer": optimizer, "generator_optimizer": optimizer}
    eager = make_gan(**options, **ramp)
    eager_trainer = fit(eager, tmp_path)
    graphed = make_gan(**options, **ramp, cuda_graph=True)
    record = RecordStep()
    graphed_trainer = fit(graphed, tmp_path, callbacks=[record])
    assert record.graphed
    # fused optimizer steps round differently from torch's default (foreach) ones: equal to float32 rounding
    torch.testing.assert_close(flat(graphed), flat(eager), rtol=1e-5, atol=1e-6)
    assert graphed_trainer.global_step == eager_trainer.global_step == 2 * BATCHES
    assert graphed.generator_updates == eager.generator_updates
    for index in (0, 1):
        graphed_group, eager_group = (
            graphed.trainer.optimizers[index].param_groups[0],
            eager.trainer.optimizers[index].param_groups[0],
        )
        assert float(graphed_group["lr"]) == pytest.approx(eager_group["lr"], rel=1e-6)
        assert graphed_group.get("momentum") == eager_group.get("momentum")
    logged = graphed_trainer.callback_metrics
    assert {"train/d_loss", "train/d_real", "train/d_fake", "train/lr_d"} <= set(logged)
    assert torch.isfinite(logged["train/d_loss"])
    assert torch.isfinite(logged["train/g_loss"])  # with k = 2 the logged (odd) steps make none: the latest is logged
    torch.testing.assert_close(
        logged["train/d_loss"], eager_trainer.callback_metrics["train/d_loss"], rtol=1e-4, atol=0
    )


def test_graph_safe_settings_and_their_restoration() -> None:
    params = [torch.nn.Parameter(torch.ones(3))]
    sgd = torch.optim.SGD(params, lr=torch.tensor(0.1, dtype=torch.float64), momentum=0.5)
    saved = make_graph_safe(sgd, torch.device("cpu"))
    group = sgd.param_groups[0]
    assert group["lr"].dtype == torch.float32 and group["fused"] and group["foreach"] is False
    adam = torch.optim.Adam(params, lr=1e-3)
    params[0].grad = torch.ones(3)
    adam.step()
    saved = make_graph_safe(adam, torch.device("cpu"))
    assert adam.param_groups[0]["capturable"] and adam.param_groups[0]["fused"]
    live_step = adam.state[params[0]]["step"]
    state = adam.state_dict()
    restore_settings(state, saved)
    group = state["param_groups"][0]
    assert isinstance(group["lr"], float) and group["fused"] is None and group["capturable"] is False
    assert state["state"][0]["step"].device.type == "cpu" and state["state"][0]["step"] is not live_step
    # the running optimizer is untouched: still on the fast path's settings and its own step tensor
    assert adam.state[params[0]]["step"] is live_step and adam.param_groups[0]["fused"]


@pytest.mark.usefixtures("fast_path_on_cpu")
def test_fast_path_checkpoints_are_eager_checkpoints_and_resume_both_ways(tmp_path: Path) -> None:
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_top_k=-1)
    fit(make_gan(cuda_graph=True), tmp_path, callbacks=[checkpoints])
    path = tmp_path / "checkpoints" / "epoch=1-step=12.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    for state in checkpoint["optimizer_states"]:
        group = state["param_groups"][0]
        assert isinstance(group["lr"], float) and group["fused"] is None and group["foreach"] is None
    assert all(isinstance(lr, float) for s in checkpoint["lr_schedulers"] for lr in s.get("_last_lr", []))
    # resumed eagerly, and by the fast path, both continue the same run
    eager = make_gan()
    fit(eager, tmp_path / "eager", epochs=3, ckpt_path=path)
    graphed = make_gan(cuda_graph=True)
    fit(graphed, tmp_path / "graphed", epochs=3, ckpt_path=path)
    torch.testing.assert_close(flat(graphed), flat(eager), rtol=1e-5, atol=1e-6)
    assert isinstance(graphed.trainer.optimizers[0].param_groups[0]["lr"], torch.Tensor)  # on the fast path again


class NaNAtStep3(GAN):
    def training_step(self, batch: Any, batch_idx: int) -> None:
        self._batch_step = self.global_step
        super().training_step(batch, batch_idx)

    def discriminator_loss(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        loss = super().discriminator_loss(real_logits, fake_logits)
        return loss * float("nan") if self.training and self._batch_step == 3 else loss


@pytest.mark.usefixtures("fast_path_on_cpu")
def test_fast_path_records_the_first_non_finite_step_on_the_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(NonFiniteGuard, "deferred", lambda self, device: True)  # as on a GPU: recorded by the update
    with pytest.raises(NonFiniteError, match=r"discriminator loss at global step 3 .*stopped at step 4"):
        fit(make_gan(NaNAtStep3, cuda_graph=True), tmp_path, log_every_n_steps=4)


def test_fast_path_refuses_what_a_graph_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"nonfinite='skip'.*use `nonfinite: stop`"):
        make_gan(cuda_graph=True, nonfinite="skip")
    rmsprop = make_gan(cuda_graph=True, discriminator_optimizer=partial(torch.optim.RMSprop, lr=1e-3))
    with pytest.raises(ValueError, match=r"discriminator optimizer is torch\.optim\.rmsprop\.RMSprop: choose one"):
        fit(rmsprop, tmp_path)
    with pytest.raises(ValueError, match=r"does not support mixed precision.*cuda_graph: false"):
        fit(make_gan(cuda_graph=True), tmp_path, precision="bf16-mixed")
    with pytest.raises(ValueError, match="runs on one device, but this run has 2 processes"):
        check_graph_fits(world_size=2, precision="32-true")


def test_graphed_updates_run_eagerly_off_cuda() -> None:
    calls = []
    updates = GraphedUpdates(lambda real, variant: calls.append(variant) or real.sum())
    assert updates(torch.ones(3), "dg", ()) == 3
    assert calls == ["dg"] and updates.captures == 0


class RecordedUpdates(GraphedUpdates):
    """GraphedUpdates as on CUDA, with warm-up calls, captures and replays recorded instead of run."""

    def __init__(self) -> None:
        super().__init__(lambda real, variant: real, warmup=2)
        self.log: list[str] = []

    capturable = staticmethod(lambda real: True)

    def _run_on_side_stream(self, real: torch.Tensor, variant: Any) -> torch.Tensor:
        self.log.append(f"eager {variant}")
        return real

    def _capture(self, real: torch.Tensor, variant: Any) -> tuple[Any, torch.Tensor, torch.Tensor]:
        self.log.append(f"capture {variant}")
        self.captures += 1
        return SimpleNamespace(replay=lambda: self.log.append(f"replay {variant}")), real.clone(), real


def test_graphed_updates_warm_up_each_variant_and_shape_and_recapture_when_constants_change() -> None:
    updates, batch, last = RecordedUpdates(), torch.zeros(4), torch.zeros(2)
    for variant in ("d", "dg", "d", "dg", "d", "dg"):
        updates(batch, variant, ("momentum", 0.0))
    assert updates.log == ["eager d", "eager dg", "eager d", "eager dg", "capture d", "replay d", "capture dg",
                           "replay dg"]  # fmt: skip
    updates.log.clear()
    updates(last, "d", ("momentum", 0.0))  # a new batch shape warms up too
    updates(batch, "d", ("momentum", 0.0))
    assert updates.log == ["eager d", "replay d"]
    updates.log.clear()
    # a new constant (the momentum ramp leaving 0): one eager call per variant and shape (its buffers appear), then
    # a new capture
    for variant in ("d", "dg", "d", "dg"):
        updates(batch, variant, ("momentum", 0.5))
    assert updates.log == ["eager d", "eager dg", "capture d", "replay d", "capture dg", "replay dg"]


class NeverCaptured(GAN):
    """The fast path's update and bookkeeping, every call run eagerly (on the default stream)."""

    def on_train_start(self) -> None:
        super().on_train_start()
        # not a long warm-up: after a new optimizer constant (the momentum ramp), one eager call precedes a capture
        self.graph_runner.graphs.capturable = lambda real: False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("schedule", "k"), [("simultaneous", 1), ("alternating", 2)])
def test_on_a_gpu_the_replayed_graph_makes_the_eager_update(tmp_path: Path, schedule: str, k: int) -> None:
    # with the generator's weight average, updated inside the graph
    eager = make_gan(NeverCaptured, schedule=schedule, k=k, cuda_graph=True, ema_decay=0.9)
    fit(eager, tmp_path, device="cuda", epochs=3)
    graphed = make_gan(schedule=schedule, k=k, cuda_graph=True, ema_decay=0.9)
    fit(graphed, tmp_path, device="cuda", epochs=3)
    assert eager.graph_runner.graphs.captures == 0
    # Each epoch's momentum is a new constant: one capture per variant and epoch, after each variant's 3 warm-up
    # batches (6 batches an epoch: k=1 has one variant; k=2 has two of 3 batches each, all warm-up in epoch 1).
    assert graphed.graph_runner.graphs.captures == (3 if k == 1 else 4)
    # the same kernels on the same random stream (CUDA graphs advance the generator as the eager kernels do)
    torch.testing.assert_close(flat(graphed), flat(eager), rtol=1e-4, atol=1e-5)


class NoHostSync(Callback):
    """Makes any host-device synchronisation an error inside training batches from ``after`` on."""

    def __init__(self, after: int) -> None:
        self.after, self.checked = after, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.after:
            torch.cuda.set_sync_debug_mode("error")
            self.checked += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_the_fast_path_never_waits_for_the_device(tmp_path: Path) -> None:
    # no momentum ramp (its per-epoch capture synchronises by design), no logging step in the run
    gan = make_gan(cuda_graph=True, momentum_final=None, ema_decay=0.999)
    check = NoHostSync(after=4)  # batches 0-2 warm up, batch 3 is captured
    try:
        fit(gan, tmp_path, device="cuda", epochs=3, log_every_n_steps=1000, callbacks=[check])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert check.checked == 3 * BATCHES - 4 and gan.graph_runner.graphs.captures == 1


class RecordMatmulPrecision(Callback):
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen = torch.get_float32_matmul_precision()
        if self.fail:
            raise RuntimeError("a run that fails")


def test_matmul_precision_holds_for_the_run_and_is_put_back(tmp_path: Path) -> None:
    torch.set_float32_matmul_precision("high")  # not torch's default: the one in place before the run comes back
    try:
        record = RecordMatmulPrecision()
        fit(make_gan(), tmp_path, callbacks=[MatmulPrecision("medium"), record])
        assert record.seen == "medium"
        assert torch.get_float32_matmul_precision() == "high"
        failing = RecordMatmulPrecision(fail=True)
        with pytest.raises(RuntimeError, match="a run that fails"):
            fit(make_gan(), tmp_path, callbacks=[MatmulPrecision("medium"), failing])
        assert failing.seen == "medium"
        assert torch.get_float32_matmul_precision() == "high"  # also after a failed run
    finally:
        torch.set_float32_matmul_precision("highest")
    with pytest.raises(ValueError, match="precision must be 'highest', 'high' or 'medium', got 'tf32'"):
        MatmulPrecision("tf32")  # type: ignore[arg-type]
