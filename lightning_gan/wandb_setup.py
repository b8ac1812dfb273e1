"""Weights & Biases set-up for the ``lightning-gan`` command: credential detection and the offline fallback, the
project-name check, continuing the W&B run of a checkpoint's training, and :class:`SaveRunConfig`, which saves the
run's config (to ``config.yaml`` and the W&B run) and says where an offline run went."""

from __future__ import annotations

import configparser
import netrc
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_gan.figures import run_dir

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


def continue_wandb_runs(config: Namespace, error: Callable[[str], Any]) -> str | None:
    """Check the project names of the config's W&B loggers (calling ``error`` with the problem) and, with a
    ``ckpt_path``, point each one whose ``id`` is unset at the W&B run of the checkpoint's training.

    Args:
        config: the parsed config of the subcommand (edited in place).
        error: reports a usage error (the parser's ``error``).

    Returns:
        The id of the W&B run that the loggers continue, or ``None``.
    """
    loggers = config.get("trainer", {}).get("logger")
    ckpt_path = config.get("ckpt_path")
    continued = None
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if not (isinstance(logger, Namespace) and str(logger.get("class_path")).endswith(".WandbLogger")):
            continue
        init_args = logger.get("init_args") or Namespace()
        _check_wandb_project(init_args.get("project"), error)
        if ckpt_path and not (init_args.get("id") or init_args.get("version")):
            run_id = wandb_run_of(ckpt_path)
            if run_id is not None:
                init_args.id = continued = run_id
                logger.init_args = init_args
                rank_zero_info(
                    f"W&B: logging to run {run_id}, which the checkpoint's training logged to (set "
                    "`--trainer.logger.init_args.id` to log elsewhere)."
                )
    return continued


def _check_wandb_project(project: Any, error: Callable[[str], Any]) -> None:
    if project is None:
        return
    import wandb

    try:
        wandb.Settings(project=project)
    except wandb.errors.UsageError as err:
        error(f"trainer.logger.init_args.project: {err}")


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
    id, so that a resume and ``validate``/``test`` of them log to the same run (:func:`continue_wandb_runs`); then
    ``continues_run`` is set, and ``validate``/``test`` leave the fit's config alone."""

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


def prepare_wandb(trainer: Trainer, continues_run: bool) -> None:
    """Before any run starts: go offline without credentials when a W&B logger is attached, and tell the trainer's
    :class:`SaveRunConfig` whether to give the offline notice and whether the run continues a checkpoint's."""
    offline = any(isinstance(logger, WandbLogger) for logger in trainer.loggers) and (
        use_wandb_offline_without_credentials()
    )
    for callback in trainer.callbacks:
        if isinstance(callback, SaveRunConfig):
            callback.offline_notice = callback.offline_notice or offline
            callback.continues_run = callback.continues_run or continues_run


def finish_wandb_run() -> None:
    """Close this process's W&B run (rank zero's), so that its files are complete when the command returns."""
    import wandb

    if wandb.run is not None:
        wandb.finish()
        wandb.teardown()  # finish() may leave the run's file buffered in the W&B service; teardown flushes it
