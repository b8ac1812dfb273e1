"""The ``lightning-gan`` command: LightningCLI over :class:`GAN` and :class:`GANDataModule` (or subclasses).

Runs log to Weights & Biases by default (project ``lightning-gan``). Without W&B credentials, and with
``WANDB_MODE`` unset, the run is logged offline, with one notice saying where it is and how to upload it.
"""

from __future__ import annotations

import configparser
import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_gan.data import GANDataModule
from lightning_gan.figures import GANProgressBar, run_dir
from lightning_gan.module import GAN

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
    config of every attached W&B run; with ``offline_notice``, also say where the offline W&B run is saved and how
    to upload it (the CLI sets it when it switched W&B offline)."""

    def __init__(self, *args: Any, offline_notice: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.offline_notice = offline_notice

    @override
    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        folder = run_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        self.parser.save(
            self.config, folder / self.config_filename, skip_none=False, overwrite=True, multifile=self.multifile
        )
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
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


class GANCLI(LightningCLI):
    """LightningCLI with lightning-gan's defaults: the W&B logger (project ``lightning-gan``, files under
    ``lightning_logs/``) and :class:`~lightning_gan.figures.GANProgressBar`."""

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        from jsonargparse import lazy_instance

        parser.set_defaults(
            {
                "trainer.logger": lazy_instance(WandbLogger, project=WANDB_PROJECT, save_dir="lightning_logs"),
                "trainer.callbacks": [lazy_instance(GANProgressBar)],
            }
        )

    @override
    def before_instantiate_classes(self) -> None:
        switched = use_wandb_offline_without_credentials()
        if isinstance(self.save_config_callback, type) and issubclass(self.save_config_callback, SaveRunConfig):
            self.save_config_kwargs["offline_notice"] = switched


def build_cli(args: ArgsType = None, **kwargs: Any) -> LightningCLI:
    """Parse ``args`` (default: ``sys.argv``) and, unless ``run=False`` is passed, run the subcommand."""
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
    """Run ``lightning-gan fit|validate|test|predict --config configs/<name>.yaml [--key value ...]``."""
    build_cli(args)
    import wandb

    if wandb.run is not None:  # close the W&B run (rank zero) so that its files are complete when main() returns
        wandb.finish()
