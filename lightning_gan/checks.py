"""Argument checks shared by the package's classes, with one wording for each kind of mistake."""

from __future__ import annotations

from typing import Any


def check_positive_int(name: str, value: Any) -> None:
    """Raise a ``ValueError`` unless ``value`` is an ``int`` (not a ``bool``) of at least 1."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive integer, but got {value!r}.")
