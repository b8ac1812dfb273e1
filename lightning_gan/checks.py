"""Argument checks shared by the package's classes, with one wording for each kind of mistake."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any


def check_positive_int(name: str, value: Any) -> None:
    """Raise a ``ValueError`` unless ``value`` is an ``int`` (not a ``bool``) of at least 1."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive integer, but got {value!r}.")


def check_positive_ints(values: Mapping[str, Any], optional: Collection[str] = ()) -> None:
    """:func:`check_positive_int` for each ``name: value``, in order; a name in ``optional`` may also be ``None``."""
    for name, value in values.items():
        if not (value is None and name in optional):
            check_positive_int(name, value)
