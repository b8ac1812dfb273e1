"""The ``lightning-gan`` command: LightningCLI over :class:`GAN` and :class:`GANDataModule` (or subclasses)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import ArgsType, LightningCLI

from lightning_gan.data import GANDataModule
from lightning_gan.module import GAN


def build_cli(args: ArgsType = None, **kwargs: Any) -> LightningCLI:
    """Parse ``args`` (default: ``sys.argv``) and, unless ``run=False`` is passed, run the subcommand."""
    return LightningCLI(
        model_class=GAN,
        datamodule_class=GANDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
        **kwargs,
    )


def main(args: ArgsType = None) -> None:
    """Run ``lightning-gan fit|validate|test|predict --config configs/<name>.yaml [--key value ...]``."""
    build_cli(args)
