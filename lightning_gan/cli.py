"""The ``lightning-gan`` command: LightningCLI over :class:`GAN` and :class:`GANDataModule` (or subclasses).

Runs log to Weights & Biases by default (project ``lightning-gan``). Without W&B credentials, and with
``WANDB_MODE`` unset, the run is logged offline, with one notice saying where it is and how to upload it.
"""

from __future__ import annotations

import configparser
import netrc
import os
import pickle
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
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


def wandb_run_of(ckpt_path: str | os.PathLike) -> str | None:
    """The id of the W&B run that ``lightning-gan`` logged the checkpoint's training to (saved by
    :class:`SaveRunConfig`), or ``None`` (no such file, another kind of checkpoint, no W&B run)."""
    path = Path(ckpt_path)
    if not path.is_file():
        return None  # e.g. "last" or "best": Lightning resolves those, and reports a missing file itself
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
        return None  # Lightning reports an unreadable checkpoint when it loads it
    for state in (checkpoint.get("callbacks") or {}).values():  # SaveRunConfig's, or a subclass's (another key)
        run_id = state.get("wandb_run_id") if isinstance(state, dict) else None
        if isinstance(run_id, str):
            return run_id
    return None


def readable_config(config: Any) -> Any:
    """A resolved config for W&B's run table: each ``{class_path, init_args}`` collapsed into
    ``{"class": class_path, **init_args}``, so that a setting is one short key (``model.generator.hidden_sizes``)."""
    if isinstance(config, dict):
        if "class_path" in config and set(config) <= {"class_path", "init_args", "dict_kwargs"}:
            arguments = {**(config.get("init_args") or {}), **(config.get("dict_kwargs") or {})}
            return {"class": config["class_path"], **{key: readable_config(value) for key, value in arguments.items()}}
        return {key: readable_config(value) for key, value in config.items()}
    if isinstance(config, list):
        return [readable_config(value) for value in config]
    return config


class SaveRunConfig(SaveConfigCallback):
    """Save the full resolved config as ``config.yaml`` in the run directory (beside ``checkpoints/``) and, as
    :func:`readable_config`, into the config of every attached W&B run (instead of Lightning's copy of the module's
    and datamodule's arguments, when every logger is W&B's); with ``offline_notice`` (set by the CLI when it switched
    W&B offline), also say where the offline W&B run is saved and how to upload it. Checkpoints hold the W&B run's
    id, so that a resume and ``validate``/``test`` of them log to the same run
    (:meth:`GANCLI.before_instantiate_classes`); then ``continues_run`` is set, and ``validate``/``test`` leave the
    fit's config alone."""

    offline_notice: bool = False
    continues_run: bool = False
    _loggers: tuple[Any, ...] = ()

    @override
    def state_dict(self) -> dict[str, Any]:
        run_id = next((logger.version for logger in self._loggers if isinstance(logger, WandbLogger)), None)
        return {"wandb_run_id": run_id} if isinstance(run_id, str) else {}

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._loggers = tuple(trainer.loggers)
        if trainer.loggers and all(isinstance(logger, WandbLogger) for logger in trainer.loggers):
            # The W&B run gets the whole config (below, or from the fit it continues): Lightning's own copy of the
            # module's and datamodule's arguments would repeat each setting under a second name.
            trainer.enable_autolog_hparams = False
        if self.continues_run and stage != "fit":
            # the fit's config.yaml and W&B config describe the run; `validate`/`test` add their metrics
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    self._say_where_offline(logger)
            return
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
            logger.experiment.config.update(readable_config(config), allow_val_change=True)
            self._say_where_offline(logger)

    def _say_where_offline(self, logger: Any) -> None:
        if self.offline_notice and isinstance(logger, WandbLogger):
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

    _continued_run: str | None = None  # the W&B run id read from --ckpt_path's checkpoint, if it continues one

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
    def before_instantiate_classes(self) -> None:
        """Check the W&B loggers' project names (a usage error, not a traceback at the first log), and with a
        ``ckpt_path``, log to the W&B run of the checkpoint's training unless the logger's ``id`` is set: a resume
        continues its run, and ``validate``/``test`` add their metrics to it, at the checkpoint's step."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        loggers = config.get("trainer", {}).get("logger")
        loggers = loggers if isinstance(loggers, list) else [loggers]
        ckpt_path = config.get("ckpt_path")
        for logger in loggers:
            if not (isinstance(logger, Namespace) and str(logger.get("class_path")).endswith(".WandbLogger")):
                continue
            init_args = logger.get("init_args") or Namespace()
            self._check_wandb_project(init_args.get("project"))
            if ckpt_path and not (init_args.get("id") or init_args.get("version")):
                run_id = wandb_run_of(ckpt_path)
                if run_id is not None:
                    init_args.id = self._continued_run = run_id
                    logger.init_args = init_args
                    rank_zero_info(
                        f"W&B: logging to run {run_id}, which the checkpoint's training logged to (set "
                        "`--trainer.logger.init_args.id` to log elsewhere)."
                    )

    def _check_wandb_project(self, project: Any) -> None:
        if project is None:
            return
        import wandb

        try:
            wandb.Settings(project=project)
        except wandb.errors.UsageError as err:
            self.parser.error(f"trainer.logger.init_args.project: {err}")

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
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer = config.get("trainer") or {}
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
        _wandb_offline_fallback(built)
        if self._continued_run:
            for callback in built.callbacks:
                if isinstance(callback, SaveRunConfig):
                    callback.continues_run = True
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
