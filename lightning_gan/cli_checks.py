"""Command-line guidance for ``lightning-gan``: a one-line usage error for LightningCLI's single-optimizer flags
(a GAN has two optimizers), whole subcommand descriptions in the top-level help, and the ``--test_after_fit`` flag."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from jsonargparse import ArgumentParser

from lightning_gan._lightning import set_subcommand_help

# The top-level help's one-line descriptions (Lightning takes the first line of each Trainer method's docstring).
SUBCOMMAND_HELP = {
    "fit": "Train a GAN (--test_after_fit true: then test its best checkpoint).",
    "validate": "Validation losses and the Parzen validation LL of a checkpoint (--ckpt_path).",
    "test": "The paper's Parzen test log-likelihood of a checkpoint (--ckpt_path).",
}

_OPTIMIZER_FLAGS = ("--optimizer", "--lr_scheduler")


def subcommand_config(config: Any) -> Any:
    """The part of a parsed (or instantiated) LightningCLI config that belongs to its subcommand: ``config[fit]``
    for ``fit``, the whole config when there is no subcommand."""
    subcommand = config.get("subcommand")
    return config.get(subcommand) if subcommand else config


def refuse_single_optimizer_flags(args: Sequence[str] | None) -> None:
    """Exit with status 2 and one line when ``args`` (default ``sys.argv``) set ``--optimizer`` or
    ``--lr_scheduler``, naming the GAN's own optimizer options instead."""
    args = sys.argv[1:] if args is None else args
    for arg in args:
        if not isinstance(arg, str):
            continue
        flag = arg.split("=", 1)[0]
        if any(flag == name or flag.startswith(name + ".") for name in _OPTIMIZER_FLAGS):
            sys.stderr.write(
                f"lightning-gan: error: {flag} is not an option: a GAN has two optimizers, set "
                "--model.init_args.generator_optimizer and --model.init_args.discriminator_optimizer (schedulers: "
                "override GAN.configure_optimizers; options: lightning-gan fit --model.help GAN)\n"
            )
            raise SystemExit(2)


def describe_subcommands(subparser_kwargs: dict[str, Any]) -> dict[str, Any]:
    """LightningCLI's ``parser_kwargs`` per subcommand, with the descriptions of :data:`SUBCOMMAND_HELP`."""
    for name, text in SUBCOMMAND_HELP.items():
        subparser_kwargs.setdefault(name, {}).setdefault("description", text)
    return subparser_kwargs


def importable_from_working_directory() -> None:
    """Let a config's ``class_path`` name a module in the working directory (``my_gan.MyGAN``), as it can under
    ``python -m lightning_gan``: the console script puts only its own folder on ``sys.path``. Appended, so the
    working directory never shadows an installed package."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())


def add_test_after_fit(parser: ArgumentParser) -> None:
    """``--test_after_fit``: after ``fit``, test the best checkpoint in the same process (ignored by other
    subcommands)."""
    parser.add_argument(
        "--test_after_fit",
        type=bool,
        default=False,
        help="fit only: when training ends, test the best checkpoint (else the latest) and print its Parzen test LL",
    )


def whole_subcommand_help(parser: ArgumentParser) -> None:
    """Give the top-level help the whole descriptions of :data:`SUBCOMMAND_HELP` (no public setter for them)."""
    set_subcommand_help(parser, SUBCOMMAND_HELP)
