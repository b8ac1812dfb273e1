"""Weights & Biases set-up for the ``lightning-gan`` command: credential detection and the offline fallback, the
project-name check, continuing the W&B run of a checkpoint's training, and :class:`SaveRunConfig`, which saves the
run's config (to ``config.yaml`` and the W&B run) and says where an offline run went."""

from __future__ import annotations

import configparser
import contextlib
import netrc
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from jsonargparse import Namespace
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_gan.checkpointing import RunLock
from lightning_gan.errors import LightningGANError
from lightning_gan.figures import run_dir
from lightning_gan.vetting import CorruptCheckpointError, read_checkpoint

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
        checkpoint = read_checkpoint(path, mmap=True)
    except (OSError, CorruptCheckpointError):
        return None  # reported by the CLI's own check of --ckpt_path, or by Lightning when it loads the file
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


class EarlierRunError(LightningGANError, RuntimeError):
    """Without a logger, the folder of a new fit holds an earlier run's config."""


class LastCheckpointMissingError(LightningGANError, FileNotFoundError):
    """``--ckpt_path=last`` where there is no last checkpoint."""


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
    _lock: RunLock | None = None
    _save_at_start = False  # whether the stage's start saves the config (setup's checks passed)
    _started = False  # whether the stage has started (after which a failure keeps the W&B run's files)

    @override
    def state_dict(self) -> dict[str, Any]:
        run_id = next((logger.version for logger in self._loggers if isinstance(logger, WandbLogger)), None)
        return {"wandb_run_id": run_id} if isinstance(run_id, str) else {}

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check the run folder before the stage: a ``fit`` locks it (:class:`~lightning_gan.checkpointing.RunLock`)
        and, without a logger, refuses a folder that holds an earlier run's config. The config itself is saved when
        the stage starts (:meth:`on_train_start`, ...), after every check, so a run refused before leaves none."""
        self._loggers = tuple(trainer.loggers)
        if trainer.loggers and all(isinstance(logger, WandbLogger) for logger in trainer.loggers):
            # The W&B run gets the whole config (below, or from the fit it continues): Lightning's own copy of the
            # module's and datamodule's arguments would repeat each setting under a second name.
            trainer.enable_autolog_hparams = False
        self._save_at_start = self._started = False
        if stage == "fit" and self._lock is None:
            self._lock = RunLock.acquire_for(trainer, run_dir(trainer))
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
                    raise EarlierRunError(
                        f"{path} holds the config of an earlier run: without a logger (`--trainer.logger=false`) runs "
                        "write their config.yaml, checkpoints and figures into `--trainer.default_root_dir`. Give "
                        "this run a folder of its own (`--trainer.default_root_dir=DIR`), resume the earlier run "
                        "(`--ckpt_path`), or remove that folder's files."
                    )
        self._save_at_start = True

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check_last_checkpoint(trainer)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._stage_starts(trainer, pl_module, "fit")

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:  # not the validation within a fit
            self._check_last_checkpoint(trainer)
            self._stage_starts(trainer, pl_module, "validate")

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check_last_checkpoint(trainer)
        self._stage_starts(trainer, pl_module, "test")

    def _check_last_checkpoint(self, trainer: Trainer) -> None:
        """``--ckpt_path=last`` when there is no last checkpoint: Lightning would warn and go on from fresh weights
        (and a fit would overwrite the earlier run's config.yaml)."""
        if self.config.get("ckpt_path") != "last" or trainer.ckpt_path is not None:
            return
        checkpoint = trainer.checkpoint_callback
        where = f" in {checkpoint.dirpath}" if isinstance(checkpoint, ModelCheckpoint) and checkpoint.dirpath else ""
        raise LastCheckpointMissingError(
            f"--ckpt_path=last, but there is no last checkpoint{where}: give the checkpoint's path "
            "(`--ckpt_path=<run folder>/checkpoints/<name>.ckpt`), or leave --ckpt_path out to start a new run."
        )

    def _stage_starts(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._started = True
        if self._save_at_start:
            self._save_at_start = False
            super().setup(trainer, pl_module, stage)  # Lightning's saving, on rank zero, in step across ranks

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """A run stopped before its stage started leaves nothing: its offline W&B run is removed; the lock goes."""
        if not self._started and trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    remove_offline_run(run_dir(trainer))
                    break
        self._release()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

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


def remove_offline_run(folder: Path) -> None:
    """Finish this process's W&B run and, when it is offline, delete its files (``wandb/offline-run-*``, and
    ``folder``, the run folder, when empty): for a run refused before it started, which logged nothing."""
    import wandb

    run = wandb.run
    if run is None or not run.offline:
        return
    sync_dir = Path(run.dir).parent
    finish_wandb_run()
    shutil.rmtree(sync_dir, ignore_errors=True)
    latest = sync_dir.parent / "latest-run"
    if latest.is_symlink() and not latest.exists():
        latest.unlink()
    for link in sync_dir.parent.glob("debug*.log"):  # W&B's links to the run's logs
        if link.is_symlink() and not link.exists():
            link.unlink()
    for empty in (folder, folder.parent, sync_dir.parent):
        with contextlib.suppress(OSError):
            empty.rmdir()


def finish_wandb_run() -> None:
    """Close this process's W&B run (rank zero's), so that its files are complete when the command returns."""
    import wandb

    if wandb.run is not None:
        wandb.finish()
        wandb.teardown()  # finish() may leave the run's file buffered in the W&B service; teardown flushes it
