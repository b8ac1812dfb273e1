"""The ``lightning-gan`` command: LightningCLI over :class:`GAN` and :class:`GANDataModule` (or subclasses).

Runs log to Weights & Biases (project ``lightning-gan``), offline without credentials (:mod:`.wandb_setup`)."""

from __future__ import annotations

from typing import Any

from jsonargparse import lazy_instance
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_gan import cli_checks, quiet, summary
from lightning_gan.checkpointing import with_safe_checkpointing
from lightning_gan.ckpt_settings import CheckpointSettingsNotice
from lightning_gan.data import GANDataModule
from lightning_gan.errors import run_command
from lightning_gan.module import GAN
from lightning_gan.monitor import GANProgressBar
from lightning_gan.vetting import VettedCheckpoints
from lightning_gan.wandb_setup import (
    WANDB_PROJECT,
    SaveRunConfig,
    continue_wandb_runs,
    finish_wandb_run,
    prepare_wandb,
    use_wandb_offline_without_credentials,
    wandb_credentials_found,
)

__all__ = ["GANCLI", "WANDB_PROJECT", "SaveRunConfig", "build_cli", "main"]  # with W&B helpers tests import from here
__all__ += ["use_wandb_offline_without_credentials", "wandb_credentials_found"]

# Each backward pass trains one network, so the other's parameters get no gradient in it: DDP must be told, or it
# waits for them (Lightning-AI/pytorch-lightning#20328). Each of these has a registered `_find_unused_parameters_true`.
_DDP_STRATEGIES = ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")


class GANCLI(VettedCheckpoints, CheckpointSettingsNotice, LightningCLI):
    """LightningCLI with lightning-gan's defaults: the W&B logger (project ``lightning-gan``, files under
    ``lightning_logs/``), offline without credentials, :class:`~lightning_gan.monitor.GANProgressBar`, and DDP's
    ``find_unused_parameters`` for the ``ddp`` strategies named by a string."""

    _continued_run: str | None = None  # the W&B run id read from --ckpt_path's checkpoint, if it continues one

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        """``fit``, ``validate`` and ``test``: a GAN has nothing to ``predict`` from data (sample with
        :meth:`GAN.sample`)."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name != "predict"}

    @override
    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        super().setup_parser(add_subcommands, main_kwargs, cli_checks.describe_subcommands(subparser_kwargs))
        cli_checks.whole_subcommand_help(self.parser)

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults(
            {"trainer.logger": lazy_instance(WandbLogger, project=WANDB_PROJECT, save_dir="lightning_logs")}
        )
        cli_checks.add_test_after_fit(parser)

    @override
    def before_instantiate_classes(self) -> None:
        """Check the W&B loggers' project names (a usage error, not a traceback at the first log), and with a
        ``ckpt_path``, log to the W&B run of the checkpoint's training unless the logger's ``id`` is set: a resume
        continues its run, and ``validate``/``test`` add their metrics to it, at the checkpoint's step. A ``ddp``
        strategy becomes its ``find_unused_parameters_true`` variant."""
        config = cli_checks.subcommand_config(self.config)
        quiet.quiet_known_warnings(resuming=self.subcommand == "fit" and bool(config.get("ckpt_path")))
        self._continued_run = continue_wandb_runs(config, self.parser.error)
        if config.get("trainer", {}).get("strategy") in _DDP_STRATEGIES:
            config.trainer.strategy = f"{config.trainer.strategy}_find_unused_parameters_true"
            rank_zero_info("GAN: enabling DDP `find_unused_parameters`, as each backward pass trains one network.")

    @override
    def instantiate_classes(self) -> None:
        """Instantiate the config's classes; a value that one refuses (a ``ValueError`` from its ``__init__``, which
        jsonargparse wraps in its own) ends as a mistyped key does: a usage error naming the problem, no traceback."""
        try:
            super().instantiate_classes()
        except ValueError as err:
            root = err
            while root.__cause__ is not None:
                root = root.__cause__
            if root is err or not isinstance(root, ValueError):
                raise
            self.parser.error(str(root))

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer, with a :class:`GANProgressBar` unless the config has a progress bar or turns it off, without
        the config's ``ModelCheckpoint`` callbacks when ``enable_checkpointing`` is false, and safe checkpointing
        (:func:`~lightning_gan.checkpointing.with_safe_checkpointing`: atomic files, a checkpoint on SIGTERM or
        Ctrl-C)."""
        trainer = cli_checks.subcommand_config(self.config_init).get("trainer") or {}
        if "callbacks" not in kwargs:
            callbacks = trainer.get("callbacks") or []
            callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
            if trainer.get("enable_checkpointing") is False:
                # the config's checkpoints, switched off by a flag (Lightning would refuse the combination)
                callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
            if trainer.get("enable_progress_bar") is not False and not any(
                isinstance(c, ProgressBar) for c in callbacks
            ):
                callbacks.append(GANProgressBar())
            kwargs["callbacks"] = callbacks
        built = super().instantiate_trainer(**with_safe_checkpointing(trainer, kwargs))
        prepare_wandb(built, continues_run=self._continued_run is not None)
        quiet.quiet_wandb_loggers(built.loggers)
        return built

    def after_fit(self) -> None:
        """With ``--test_after_fit``, test the best checkpoint; then say where everything went (rank zero)."""
        config = cli_checks.subcommand_config(self.config)
        if config.get("test_after_fit"):
            summary.run_test_after_fit(self.trainer, self.model, self.datamodule)
        summary.print_fit_summary(self.trainer, [str(path) for path in config.get("config") or []])


def build_cli(args: ArgsType = None, **kwargs: Any) -> LightningCLI:
    """Parse ``args`` (default: ``sys.argv``) and, unless ``run=False`` is passed, run the subcommand."""
    cli_checks.refuse_single_optimizer_flags(args)
    cli_checks.importable_from_working_directory()
    kwargs.setdefault("save_config_callback", SaveRunConfig)
    kwargs.setdefault("save_config_kwargs", {"save_to_log_dir": False})
    return GANCLI(
        model_class=GAN,
        datamodule_class=GANDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        auto_configure_optimizers=False,  # a GAN has two optimizers, set on the model (see cli_checks)
        args=args,
        **kwargs,
    )


def main(args: ArgsType = None) -> None:
    """Run ``lightning-gan fit|validate|test --config CONFIG [--key value ...]`` (exit codes: :mod:`.errors`)."""
    run_command(lambda: build_cli(args), finish_wandb_run)
