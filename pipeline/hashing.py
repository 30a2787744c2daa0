"""Content hashes of files and folders, cached on (inode, size, mtime_ns, ctime_ns) so status is instant."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary sibling + rename: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


class HashCache:
    """md5 per file, keyed on (device, inode, size, mtime_ns, ctime_ns): renames and the run cache's
    hard links keep their entry, any write changes the key (ctime too: an edit that puts the mtime
    back still moves it). A damaged cache file is an empty cache; `tca gc` starts it afresh."""

    def __init__(self, path: Path):
        self.path = path
        try:
            entries = json.loads(path.read_text())
        except (OSError, ValueError):
            entries = {}
        valid = isinstance(entries, dict) and all(isinstance(v, str) for v in entries.values())
        self.entries: dict[str, str] = entries if valid else {}
        self.dirty = False

    def file(self, path: Path) -> str:
        st = path.stat()
        key = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
        digest = self.entries.get(key)
        if digest is None:
            digest = self.entries[key] = _digest(path)
            self.dirty = True
        return digest

    def tree(self, path: Path) -> str:
        """A file's hash, or a folder's: the hash of its manifest (relative path + file hash)."""
        if path.is_file():
            return self.file(path)
        manifest = hashlib.md5()
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            manifest.update(f"{file.relative_to(path).as_posix()}\0{self.file(file)}\n".encode())
        return manifest.hexdigest() + ".dir"

    def save(self) -> None:
        if self.dirty:
            atomic_write_text(self.path, json.dumps(self.entries))
            self.dirty = False
