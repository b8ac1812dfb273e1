"""Say which model settings a ``--ckpt_path`` checkpoint overrides.

LightningCLI rebuilds the model from the hyperparameters saved in ``--ckpt_path``'s checkpoint, over the config's
and the command line's values: the networks must match the weights. :class:`CheckpointSettingsNotice` warns once,
naming the settings that the checkpoint changed, so that a flag or config value that was dropped does not go
unnoticed; and it marks the model (``built_from_checkpoint``) so that a shape check names the checkpoint, not a key
that the config sets already.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from lightning_gan.cli_checks import subcommand_config

__all__ = ["CheckpointSettingsNotice", "changed_settings"]


def _plain(tree: Any) -> Any:
    if hasattr(tree, "as_dict"):  # a jsonargparse Namespace
        tree = tree.as_dict()
    if isinstance(tree, dict):
        return {key: _plain(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_plain(value) for value in tree]
    return tree


def _leaves(tree: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    if isinstance(tree, dict) and tree:
        for key, value in tree.items():
            yield from _leaves(value, f"{prefix}.{key}")
    else:
        yield prefix, tree


def changed_settings(given: Any, used: Any, prefix: str = "model") -> list[tuple[str, Any, Any]]:
    """``(key, given value, used value)`` for every setting under ``prefix`` whose value in ``used`` differs from
    the one in ``given`` (configs as nested dicts or jsonargparse namespaces); settings that only ``used`` has (the
    checkpoint's, where the config left a default) are not listed."""
    before = dict(_leaves(_plain(given), prefix))
    after = dict(_leaves(_plain(used), prefix))
    return [(key, before[key], after.get(key)) for key in before if key in after and after[key] != before[key]]


class CheckpointSettingsNotice:
    """A LightningCLI mixin: remember the model settings as parsed (config files and flags), and before the classes
    are instantiated, warn once on rank zero when ``--ckpt_path``'s hyperparameters replaced some of them."""

    config: Any

    def parse_arguments(self, parser: Any, args: Any) -> None:
        super().parse_arguments(parser, args)  # type: ignore[misc]
        section = subcommand_config(self.config)
        self.given_model = _plain(section.get("model")) if section is not None else None

    def instantiate_classes(self) -> None:
        section = subcommand_config(self.config)
        ckpt_path = section.get("ckpt_path") if section is not None else None
        if ckpt_path and self.given_model is not None:
            changed = changed_settings(self.given_model, section.get("model"))
            if changed:
                listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changed[:8])
                more = f"; and {len(changed) - 8} more" if len(changed) > 8 else ""
                rank_zero_warn(
                    f"--ckpt_path {ckpt_path}: the checkpoint's own model settings (its hyper_parameters) win over "
                    f"the config's and the command line's, so that the networks match its weights: {listed}{more}. "
                    "To train other networks, start a new run without --ckpt_path; to evaluate this checkpoint, "
                    "use data of the shape it was trained on."
                )
        super().instantiate_classes()  # type: ignore[misc]
        model = getattr(self, "model", None)
        if ckpt_path and model is not None:  # its networks' shape is the checkpoint's: GAN's shape check says so
            model.built_from_checkpoint = str(ckpt_path)
