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
