"""What a ``lightning-gan fit`` leaves behind, said once when it ends: the run folder, the checkpoints, the latest
sample grid, the Parzen numbers, and the commands that test or resume it; and ``--test_after_fit``."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from lightning_gan.callbacks import ParzenEvaluation
from lightning_gan.figures import run_dir


def checkpoints(trainer: Trainer) -> tuple[str | None, str | None]:
    """The latest checkpoint written (to resume from: ``interrupted.ckpt`` after a signal) and the best one by a
    monitored metric (to test), each ``None`` when there is none."""
    latest: list[Path] = []
    best = None
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint):
            continue
        interrupted = Path(callback.dirpath or ".") / "interrupted.ckpt"
        if trainer.interrupted and interrupted.is_file():
            latest.append(interrupted)
        if callback.monitor is not None:
            best = best or callback.best_model_path or None
        paths = (callback.last_model_path, None if callback.monitor else callback.best_model_path)
        latest += [Path(path) for path in paths if path and Path(path).is_file()]
    newest = max(latest, key=lambda path: path.stat().st_mtime_ns, default=None)
    return (str(newest) if newest else best), best


def _parzen(trainer: Trainer) -> ParzenEvaluation | None:
    return next((c for c in trainer.callbacks if isinstance(c, ParzenEvaluation)), None)


def run_test_after_fit(trainer: Trainer, model: Any, datamodule: Any) -> None:
    """Test the best checkpoint (else the latest) of the fit that just ended, in the same process and W&B run."""
    if trainer.interrupted:
        return
    latest, best = checkpoints(trainer)
    trainer.test(model, datamodule=datamodule, ckpt_path=best or latest)


def fit_summary(trainer: Trainer, config_files: list[str]) -> str:
    """The block that ends a fit (see the module's docstring); paths quoted for a shell."""
    folder = run_dir(trainer)
    latest, best = checkpoints(trainer)
    config = folder / "config.yaml"
    configs = [str(config)] if config.is_file() else config_files
    config_args = "".join(f" --config {shlex.quote(c)}" for c in configs)
    rows = [("run folder", str(folder)), ("latest checkpoint", latest or "none")]
    if best:
        rows.append(("best checkpoint", best))
    grids = sorted((folder / "samples").glob("*.png"), key=lambda p: p.stat().st_mtime_ns)
    if grids:
        rows.append(("latest samples", str(grids[-1])))
    monitored = [c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None) == "parzen/val_ll"]
    if monitored and monitored[0].best_model_score is not None:
        rows.append(("Parzen LL, validation", f"{float(monitored[0].best_model_score):.1f} nats (best checkpoint)"))
    elif "parzen/val_ll" in trainer.callback_metrics:  # (a `test` clears these)
        val_ll = float(trainer.callback_metrics["parzen/val_ll"])
        rows.append(("Parzen LL, validation", f"{val_ll:.1f} nats (latest evaluation)"))
    parzen = _parzen(trainer)
    if parzen is not None and getattr(parzen, "test_ll", None) is not None:
        rows.append(("Parzen LL, test", f"{parzen.test_ll:.1f} ± {parzen.test_se:.1f} nats (sigma {parzen.sigma:.4f})"))
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            rows.append(("W&B run files", str(Path(logger.experiment.dir).parent.resolve())))
    if best or latest:
        rows.append(("test it", f"lightning-gan test{config_args} --ckpt_path {shlex.quote(best or latest)}"))
    if latest:
        rows.append(("resume it", f"lightning-gan fit{config_args} --ckpt_path {shlex.quote(latest)}"))
    width = max(len(name) for name, _ in rows) + 2
    title = "lightning-gan fit stopped early" if trainer.interrupted else "lightning-gan fit finished"
    lines = [f"── {title} " + "─" * max(0, 60 - len(title))]
    lines += [f"{name + ':':<{width}}{value}" for name, value in rows]
    return "\n".join(lines)


@rank_zero_only
def print_fit_summary(trainer: Trainer, config_files: list[str]) -> None:
    """Print :func:`fit_summary` (rank zero)."""
    print(fit_summary(trainer, config_files), flush=True)
