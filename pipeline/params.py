"""Param trees: flattening, `--set` overrides (validated against the defaults), selection."""
from __future__ import annotations

import copy
import difflib
from pathlib import Path

import yaml

from tca.errors import TcaError


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"data": {"source": "x"}} -> {"data.source": "x"}: the form locks and reasons use."""
    flat = {}
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, full + "."))
        else:
            flat[full] = value
    return flat


def select(flat: dict, declared: list[str]) -> dict:
    """The values of the declared keys; a declared key may name a whole section (`cf`)."""
    chosen = {}
    for key in declared:
        matches = {k: v for k, v in flat.items() if k == key or k.startswith(key + ".")}
        if not matches:
            raise TcaError(f"param `{key}` is declared by a stage but has no default in stages.yaml `params:`")
        chosen.update(matches)
    return dict(sorted(chosen.items()))


def _check(what: str, value, default):
    """`value` (already parsed) if it fits the type of `default`; else an error starting with `what`."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise TcaError(f"{what}: expected true or false")
    if isinstance(default, (int, float)) and isinstance(value, bool):
        raise TcaError(f"{what}: expected a number like {default!r}")
    if isinstance(default, float) and isinstance(value, int):
        return float(value)
    if isinstance(default, int) and isinstance(value, float):
        raise TcaError(f"{what}: expected an integer like {default!r}")
    if isinstance(default, str) and not isinstance(value, str):
        raise TcaError(f"{what}: expected a string like {default!r} (quote it in YAML)")
    if isinstance(default, (int, float)) and not isinstance(value, (int, float)):
        raise TcaError(f"{what}: expected a number like {default!r}")
    if isinstance(default, list) and not isinstance(value, list):
        raise TcaError(f"{what}: expected a list like {default!r} (YAML syntax: [a, b])")
    return value


def _coerce(key: str, text: str, default):
    value = yaml.safe_load(text) if text.strip() else ""
    if isinstance(default, str) and value is not None:
        return text  # keep the text as typed: `data.source=recbole:/x` or a numeric-looking id
    return _check(f"--set {key}={text}", value, default)


def _assign(tree: dict, key: str, value) -> None:
    node = tree
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value


def _unknown(what: str, flat: dict) -> TcaError:
    """Names the params the user likely meant first (the same last part, `train.alpha` -> `tca.alpha`, or a
    close spelling), then every valid one."""
    key = what.split()[-1]
    leaf = key.rsplit(".", 1)[-1]
    near = [k for k in sorted(flat) if k.rsplit(".", 1)[-1] == leaf] or difflib.get_close_matches(key, sorted(flat), 3)
    hint = f"; did you mean {' or '.join(near)}?" if near else "."
    valid = "\n  ".join(sorted(flat))
    return TcaError(f"{what}: unknown param{hint}\nValid params:\n  {valid}")


def apply_overrides(defaults: dict, assignments: list[str]) -> dict:
    """Defaults with `key=value` overrides applied; an unknown key lists the valid ones."""
    tree = copy.deepcopy(defaults)
    flat = flatten(defaults)
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        key = key.strip()
        if not sep or not key:
            raise TcaError(f"--set {assignment!r}: expected key=value, e.g. --set tca.alpha=0.3")
        if key not in flat:
            raise _unknown(f"--set {key}", flat)
        _assign(tree, key, _coerce(key, text, flat[key]))
    return tree


def apply_file(defaults: dict, path: Path) -> dict:
    """Defaults with the values of a params file (nested YAML like stages.yaml `params:`, any
    subset of its keys, e.g. params/paper.yaml) applied, each checked like a `--set`. A file may
    start from others: `extends: paper.yaml` (or a list, applied in order; paths relative to the
    file), whose values it then overrides."""
    return _apply_file(copy.deepcopy(defaults), flatten(defaults), Path(path), ())


def _apply_file(tree: dict, flat: dict, path: Path, chain: tuple[Path, ...]) -> dict:
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise TcaError(f"--params {path}: cannot read it: {err}") from err
    if not isinstance(doc, dict):
        raise TcaError(f"--params {path}: expected a mapping of param sections, like stages.yaml `params:`")
    parents = doc.pop("extends", [])
    parents = [parents] if isinstance(parents, str) else parents
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise TcaError(f"{path}: extends: expected a params file name or a list of them, relative to {path.parent}")
    chain = (*chain, path.resolve())
    for parent in parents:
        file = path.parent / parent
        if file.resolve() in chain:
            raise TcaError(f"{path}: extends {parent}: a cycle ({' -> '.join(p.name for p in chain)} -> {file.name})")
        if not file.is_file():
            raise TcaError(f"{path}: extends {parent}: no such file {file}")
        tree = _apply_file(tree, flat, file, chain)
    for key, value in flatten(doc).items():
        if key not in flat:
            raise _unknown(f"{path}: {key}", flat)
        _assign(tree, key, _check(f"{path}: {key}: {value!r}", value, flat[key]))
    return tree
