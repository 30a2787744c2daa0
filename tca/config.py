"""Typed configs from param sections: one place that refuses keys a config does not have."""
from __future__ import annotations

from dataclasses import fields

from tca.errors import TcaError


def check_keys(cls, section: dict, name: str, also: tuple[str, ...] = ()) -> None:
    """Raise unless every key of the `name:` section is a field of `cls` (or one of `also`,
    keys the caller consumes itself), naming the offending key and the valid ones."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise TcaError(f"{name}.{unknown[0]}: unknown param; the {name} section accepts {sorted(known | set(also))}")


def require_positive(values: dict, section: str) -> None:
    """Raise unless each value is a positive integer, naming `section.key`."""
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise TcaError(f"{section}.{key} must be a positive integer, got {value!r}")
