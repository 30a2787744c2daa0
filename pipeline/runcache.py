"""The run cache: every stage run's outputs, kept under the key of what produced them.

Outputs are immutable once moved into place (each run writes a fresh folder), so the cache
holds hard links, not copies: keeping every run costs only the files that differ.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml

from .hashing import atomic_write_text

ENTRY_FIELDS = ("key", "code", "deps", "params", "outs")


def link_tree(src: Path, dst: Path) -> None:
    """Recreate `src` under `dst` with hard links (copies where linking is impossible)."""
    for root, _dirs, files in os.walk(src):
        target = dst / Path(root).relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            try:
                os.link(Path(root) / name, target / name)
            except OSError:
                shutil.copy2(Path(root) / name, target / name)


class RunCache:
    def __init__(self, root: Path):
        self.root = root  # artifacts/.cache/runs

    def _dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def entry(self, stage: str, key: str) -> dict | None:
        """The lock entry recorded with a cached run, or None if that run was never kept or its
        entry is damaged (a miss: the runner's `recover` drops such folders, with a message)."""
        return read_entry(self._dir(stage, key) / "entry.yaml")

    def link(self, stage: str, key: str, outputs: Path) -> Path:
        """Stage a run's outputs for the cache (hard links in a hidden folder); `commit` keeps them."""
        staging = self._dir(stage, key).with_name(f".{key}.{os.getpid()}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        link_tree(outputs, staging / "out")
        return staging

    def commit(self, stage: str, key: str, staging: Path, entry: dict) -> None:
        """Write the entry, then move the staged folder into place: an entry is whole or absent."""
        atomic_write_text(staging / "entry.yaml", yaml.safe_dump(entry, sort_keys=False))
        final = self._dir(stage, key)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)

    def restore(self, stage: str, key: str, dst: Path) -> None:
        link_tree(self._dir(stage, key) / "out", dst)

    def runs(self, stage: str | None = None) -> list[tuple[str, str, dict]]:
        """(stage, key, entry) of every intact kept run, for reports and gc."""
        found = []
        for meta in sorted(self.root.glob(f"{stage or '*'}/*/entry.yaml")):
            entry = read_entry(meta)
            if entry is not None and not meta.parent.name.startswith("."):  # hidden: being saved or removed
                found.append((meta.parent.parent.name, meta.parent.name, entry))
        return found

    def broken(self) -> list[Path]:
        """Folders that are no intact entry: no or a damaged entry.yaml, a save or removal that was killed."""
        folders = sorted(p for p in self.root.glob("*/*") if p.is_dir()) if self.root.is_dir() else []
        return [p for p in folders if p.name.startswith(".") or read_entry(p / "entry.yaml") is None]

    def output_dir(self, stage: str, key: str) -> Path:
        return self._dir(stage, key) / "out"

    def remove(self, stage: str, key: str) -> None:
        """Hide the entry first (one rename), then delete it: a kill never leaves half an entry."""
        folder = self._dir(stage, key)
        doomed = folder.with_name(f".{key}.{os.getpid()}.removing")
        os.replace(folder, doomed)
        shutil.rmtree(doomed)


def read_entry(path: Path) -> dict | None:
    """A lock entry as a run cache (or stages.lock) holds it, or None when missing or damaged."""
    try:
        entry = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return entry if entry_problem(entry) is None else None


def entry_problem(entry) -> str | None:
    """What is wrong with the shape of a lock entry (None: nothing)."""
    if not isinstance(entry, dict):
        return f"expected a mapping, found {type(entry).__name__}"
    missing = [f for f in ENTRY_FIELDS if f not in entry]
    if missing:
        return f"no {', '.join(missing)}"
    wrong = [f for f in ENTRY_FIELDS[1:] if not isinstance(entry[f], dict)]
    if wrong or not isinstance(entry["key"], str):
        return f"{', '.join(wrong) or 'key'} of the wrong type"
    return None
