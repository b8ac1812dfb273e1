"""The ``lightning-gan`` command: LightningCLI over :class:`GAN` and :class:`GANDataModule` (or subclasses).

Runs log to Weights & Biases by default (project ``lightning-gan``). Without W&B credentials, and with
``WANDB_MODE`` unset, the run is logged offline, with one notice saying where it is and how to upload it.
"""

from __future__ import annotations

import configparser
import netrc
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_gan.checkpointing import with_safe_checkpointing
from lightning_gan.data import GANDataModule
from lightning_gan.figures import run_dir
from lightning_gan.module import GAN
from lightning_gan.monitor import GANProgressBar

WANDB_PROJECT = "lightning-gan"


def wandb_credentials_found() -> bool:
    """Whether W&B could log in without asking: ``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE``, or a netrc entry
    (``$NETRC``, ``~/.netrc``, ``~/_netrc``, as written by ``wandb login``) for the W&B host (``WANDB_BASE_URL``, the
    ``base_url`` in W&B's settings file, or api.wandb.ai)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    settings = configparser.ConfigParser()
    settings.read(Path(os.environ.get("WANDB_CONFIG_DIR", "~/.config/wandb")).expanduser() / "settings")
    base_url = os.environ.get("WANDB_BASE_URL") or settings.get("default", "base_url", fallback="https://api.wandb.ai")
    host = urlsplit(base_url).netloc
    candidates = [os.environ["NETRC"]] if os.environ.get("NETRC") else ["~/.netrc", "~/_netrc"]
    for candidate in candidates:
        path = Path(candidate).expanduser()
        try:
            if path.is_file() and netrc.netrc(path).authenticators(host):
                return True
        except (OSError, netrc.NetrcParseError):
            continue
    return False


def use_wandb_offline_without_credentials() -> bool:
    """Set ``WANDB_MODE=offline`` when it is unset and no W&B credentials are found (so W&B never prompts).

    Returns:
        Whether the mode was switched.
    """
    if "WANDB_MODE" in os.environ or os.environ.get("WANDB_DISABLED") or wandb_credentials_found():
        return False
    os.environ["WANDB_MODE"] = "offline"
    return True


class SaveRunConfig(SaveConfigCallback):
    """Save the full resolved config as ``config.yaml`` in the run directory (beside ``checkpoints/``) and into the
    config of every attached W&B run; with ``offline_notice`` (set by the CLI when it switched W&B offline), also
    say where the offline W&B run is saved and how to upload it."""

    offline_notice: bool = False

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not trainer.loggers and not self.already_saved:
            # Without a logger every run writes into `default_root_dir`, with no folder of its own.
            if stage != "fit":
                return  # `validate`/`test` there would overwrite the config of the fit they evaluate
            if not self.config.get("ckpt_path"):  # a resume goes on in the folder of the run it resumes
                path = run_dir(trainer) / self.config_filename
                if trainer.strategy.broadcast(path.is_file() if trainer.is_global_zero else False):
                    raise RuntimeError(
                        f"{path} holds the config of an earlier run: without a logger (`--trainer.logger=false`) runs "
                        "write their config.yaml, checkpoints and figures into `--trainer.default_root_dir`. Give "
                        "this run a folder of its own (`--trainer.default_root_dir=DIR`), resume the earlier run "
                        "(`--ckpt_path`), or remove that folder's files."
                    )
        super().setup(trainer, pl_module, stage)

    @override
    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        folder = run_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        try:  # None values are kept, for reproducibility; jsonargparse >= 4.49 renamed `skip_none` to `skip_unset`
            keep_none: dict[str, bool] = {"skip_unset": False}
            text = self.parser.dump(self.config, **keep_none)
        except TypeError:
            keep_none = {"skip_none": False}
            text = self.parser.dump(self.config, **keep_none)
        self.parser.save(
            self.config, folder / self.config_filename, overwrite=True, multifile=self.multifile, **keep_none
        )
        config = yaml.safe_load(text)
        for logger in trainer.loggers:
            if not isinstance(logger, WandbLogger):
                continue
            logger.experiment.config.update(config, allow_val_change=True)
            if self.offline_notice:
                sync_dir = Path(logger.experiment.dir).parent.resolve()
                rank_zero_info(
                    "W&B: no credentials found (no WANDB_API_KEY, no W&B entry in ~/.netrc), so this run is logged "
                    f"offline to {sync_dir}\nTo upload it: `wandb login`, then `wandb sync {sync_dir}`. "
                    "(Set WANDB_MODE=offline to skip this notice, or WANDB_MODE=disabled to turn W&B off.)"
                )


def _wandb_offline_fallback(trainer: Trainer) -> None:
    """Go offline without credentials when a W&B logger is attached (before any run starts); flag the notice."""
    if any(isinstance(logger, WandbLogger) for logger in trainer.loggers) and use_wandb_offline_without_credentials():
        for callback in trainer.callbacks:
            if isinstance(callback, SaveRunConfig):
                callback.offline_notice = True


class GANCLI(LightningCLI):
    """LightningCLI with lightning-gan's defaults: the W&B logger (project ``lightning-gan``, files under
    ``lightning_logs/``), offline without credentials, and :class:`~lightning_gan.monitor.GANProgressBar`."""

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        """``fit``, ``validate`` and ``test``: a GAN has nothing to ``predict`` from data (sample with
        :meth:`GAN.sample`)."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name != "predict"}

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        from jsonargparse import lazy_instance

        parser.set_defaults(
            {"trainer.logger": lazy_instance(WandbLogger, project=WANDB_PROJECT, save_dir="lightning_logs")}
        )

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
        """The trainer, with a :class:`GANProgressBar` unless the config has a progress bar or turns it off, and safe
        checkpointing (:func:`~lightning_gan.checkpointing.with_safe_checkpointing`: atomic files, a checkpoint on
        SIGTERM or Ctrl-C)."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer = config.get("trainer") or {}
        callbacks = trainer.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        wanted = trainer.get("enable_progress_bar") is not False and "callbacks" not in kwargs
        if wanted and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs["callbacks"] = [*callbacks, GANProgressBar()]
        built = super().instantiate_trainer(**with_safe_checkpointing(trainer, kwargs))
        _wandb_offline_fallback(built)
        return built


def _importable_from_working_directory() -> None:
    """Let a config's ``class_path`` name a module in the working directory (``my_gan.MyGAN``), as it can under
    ``python -m lightning_gan``: the console script puts only its own folder on ``sys.path``. Appended, so the
    working directory never shadows an installed package."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())


def build_cli(args: ArgsType = None, **kwargs: Any) -> LightningCLI:
    """Parse ``args`` (default: ``sys.argv``) and, unless ``run=False`` is passed, run the subcommand."""
    _importable_from_working_directory()
    kwargs.setdefault("save_config_callback", SaveRunConfig)
    kwargs.setdefault("save_config_kwargs", {"save_to_log_dir": False})
    return GANCLI(
        model_class=GAN,
        datamodule_class=GANDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        args=args,
        **kwargs,
    )


def main(args: ArgsType = None) -> None:
    """Run ``lightning-gan fit|validate|test --config configs/<name>.yaml [--key value ...]``."""
    build_cli(args)
    import wandb

    if wandb.run is not None:  # close the W&B run (rank zero) so that its files are complete when main() returns:
        wandb.finish()
        wandb.teardown()  # finish() may leave the run's file buffered in the W&B service; teardown flushes it
