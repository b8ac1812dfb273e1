"""Each Lightning (and torch) internal that lightning_gan/_lightning.py uses still behaves as it was written against:
a failure here names the function to update for a new release."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

import pytest
import torch
from conftest import quiet_trainer
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_gan import _lightning


@contextlib.contextmanager
def internal(name: str) -> Iterator[None]:
    """Turn an error from a changed internal into a failure naming the function of ``_lightning`` to update."""
    try:
        yield
    except (AttributeError, TypeError, KeyError, ImportError) as err:
        pytest.fail(f"A Lightning or torch internal changed: update `lightning_gan._lightning.{name}` ({err!r}).")


class CountsByHand(LightningModule):
    """Manual optimization that counts its steps without stepping, and records what the internals say."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[tuple[int, bool, int]] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        trainer = self.trainer
        self.seen.append(
            (trainer.global_step, _lightning.should_update_logs(trainer), _lightning.logged_steps(trainer))
        )
        _lightning.count_optimizer_step(trainer)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.zeros(4, 1), batch_size=1)


def test_step_counting_and_logging() -> None:
    module = CountsByHand()
    trainer = quiet_trainer(max_epochs=1, log_every_n_steps=2, enable_checkpointing=False)
    with internal("count_optimizer_step / should_update_logs / logged_steps"):
        trainer.fit(module)
    assert trainer.global_step == 4, "count_optimizer_step no longer advances global_step"
    assert [step for step, _, _ in module.seen] == [0, 1, 2, 3]
    assert [log for _, log, _ in module.seen] == [False, True, False, True], "should_update_logs changed"
    assert [logged for _, _, logged in module.seen] == [0, 1, 2, 3], "logged_steps changed"
    with internal("set_logged_steps"):
        _lightning.set_logged_steps(trainer, 7)
        assert _lightning.logged_steps(trainer) == 7


def test_checkpoint_cadence() -> None:
    with internal("checkpoint_cadence"):
        assert _lightning.checkpoint_cadence(ModelCheckpoint(every_n_train_steps=3)) == (3, 0, None)
        assert _lightning.checkpoint_cadence(ModelCheckpoint(every_n_epochs=2)) == (0, 2, None)


def test_the_sigterm_flag_and_the_handler_before_lightning() -> None:
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    with internal("sigterm_flag / set_sigterm_flag / sigterm_handler_before_lightning"):
        assert not _lightning.sigterm_flag(trainer)
        _lightning.set_sigterm_flag(trainer, True)
        assert _lightning.sigterm_flag(trainer) and trainer.received_sigterm
        assert _lightning.sigterm_handler_before_lightning(trainer) is None  # none registered yet
        trainer._signal_connector._original_handlers[signal.SIGTERM] = print
        assert _lightning.sigterm_handler_before_lightning(trainer) is print


def test_instantiated_by_cli() -> None:
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context

    with internal("instantiated_by_cli"):
        assert not _lightning.instantiated_by_cli()
        with _given_hyperparameters_context(hparams={"k": 1}, instantiator="lightning.pytorch.cli.instantiate_module"):
            assert _lightning.instantiated_by_cli()


class Loadable(LightningModule):
    def __init__(self, width: int = 1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(width, 1)


def test_load_from_checkpoint_as_and_the_instantiator_key(tmp_path) -> None:
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context

    path = tmp_path / "loadable.ckpt"
    with _given_hyperparameters_context(hparams={"width": 3}, instantiator="lightning.pytorch.cli.instantiate_module"):
        module = Loadable(width=3)
    import lightning

    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    torch.save({**checkpoint, "pytorch-lightning_version": lightning.__version__}, path)
    with internal("HPARAMS_INSTANTIATOR_KEY"):
        assert _lightning.HPARAMS_INSTANTIATOR_KEY in torch.load(path, weights_only=True)["hyper_parameters"]
    with internal("load_from_checkpoint_as"):
        loaded = _lightning.load_from_checkpoint_as(Loadable, path)
        assert type(loaded) is Loadable and loaded.layer.in_features == 3


def test_foreach_move_towards_rounds_as_the_per_tensor_operations() -> None:
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(5, 3, generator=generator), torch.randn(7, generator=generator)]
    targets = [torch.randn(5, 3, generator=generator), torch.randn(7, generator=generator)]
    weight = torch.tensor(0.3)
    expected = [tensor + (target - tensor) * weight for tensor, target in zip(tensors, targets, strict=True)]
    with internal("foreach_move_towards"):
        _lightning.foreach_move_towards(tensors, targets, weight)
    for tensor, want in zip(tensors, expected, strict=True):
        torch.testing.assert_close(tensor, want, rtol=0, atol=0)


def test_callback_state_key_is_the_class_name_and_the_key() -> None:
    from lightning.pytorch import Callback

    with internal("callback_state_key"):
        assert _lightning.callback_state_key(Callback(), key="a") == "Callback{'key': 'a'}"


def test_float_last_lrs_reads_the_key_a_scheduler_saves() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=torch.tensor(0.5))
    state = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.5).state_dict()
    with internal("float_last_lrs"):
        _lightning.float_last_lrs(state)
        assert state["_last_lr"] == [0.5] and all(type(lr) is float for lr in state["_last_lr"])


def test_drop_unset_wandb_anonymous_leaves_it_out_of_wandb_init(tmp_path) -> None:
    from lightning.pytorch.loggers import WandbLogger

    unset, chosen = WandbLogger(save_dir=tmp_path, offline=True), WandbLogger(save_dir=tmp_path, anonymous=True)
    with internal("drop_unset_wandb_anonymous"):
        assert unset._wandb_init["anonymous"] is None  # what makes wandb warn
        _lightning.drop_unset_wandb_anonymous(unset)
        _lightning.drop_unset_wandb_anonymous(chosen)
        assert "anonymous" not in unset._wandb_init and chosen._wandb_init["anonymous"] == "allow"


def test_set_subcommand_help_replaces_the_top_level_help_lines(capsys: pytest.CaptureFixture[str]) -> None:
    from lightning.pytorch.cli import LightningCLI

    cli = LightningCLI(LightningModule, run=False, args=[])  # a parser with subcommands is built only for `run=True`
    parser = cli.init_parser()
    parser.add_subcommands().add_subcommand("fit", cli.init_parser(), help="cut off in the mid")
    with internal("set_subcommand_help"):
        _lightning.set_subcommand_help(parser, {"fit": "A whole sentence."})
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    assert "A whole sentence." in capsys.readouterr().out
