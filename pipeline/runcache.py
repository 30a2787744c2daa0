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
        """The lock entry recorded with a cached run, or None if that run was never kept."""
        meta = self._dir(stage, key) / "entry.yaml"
        if not meta.exists():
            return None
        return yaml.safe_load(meta.read_text())

    def save(self, stage: str, key: str, outputs: Path, entry: dict) -> None:
        final = self._dir(stage, key)
        tmp = final.with_name(f".{key}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        link_tree(outputs, tmp / "out")
        atomic_write_text(tmp / "entry.yaml", yaml.safe_dump(entry, sort_keys=False))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)

    def restore(self, stage: str, key: str, dst: Path) -> None:
        link_tree(self._dir(stage, key) / "out", dst)

    def runs(self, stage: str | None = None) -> list[tuple[str, str, dict]]:
        """(stage, key, entry) of every kept run, for reports and gc."""
        found = []
        for meta in sorted(self.root.glob(f"{stage or '*'}/*/entry.yaml")):
            found.append((meta.parent.parent.name, meta.parent.name, yaml.safe_load(meta.read_text())))
        return found

    def output_dir(self, stage: str, key: str) -> Path:
        return self._dir(stage, key) / "out"

    def remove(self, stage: str, key: str) -> None:
        shutil.rmtree(self._dir(stage, key))
