"""The results index: one small JSON per finished run, what `tca report` reads.

The run cache keeps every eval's outputs, but under a hash that does not say which params of
which upstream stages produced them. So after each run of a sweep, an experiment or `tca run`,
`artifacts/experiments/<experiment>/<variant>.json` records its params, the eval metrics, what
each stage took, the stage keys, the git commit and the machine, written atomically.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shlex
import subprocess
import time
from importlib import metadata
from pathlib import Path

from tca.errors import TcaError

from .hashing import atomic_write_text
from .runner import Project


def slug(name: str) -> str:
    """A file name for a variant name (`w/o CT` -> `w_o_CT`); long names keep a hash suffix."""
    text = re.sub(r"[^A-Za-z0-9._=+-]+", "_", name).strip("_.") or "_"
    if len(text) > 100:
        text = f"{text[:90]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return text


def duration(seconds: float | None) -> str:
    """42 s, 12m 03s, 2h 05m; – when unknown."""
    if seconds is None:
        return "–"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m {seconds:02d}s" if minutes < 60 else f"{minutes // 60}h {minutes % 60:02d}m"


def results_dir(project: Project, experiment: str) -> Path:
    return project.artifacts / "experiments" / slug(experiment)


def git_commit(root: Path) -> str | None:
    """HEAD's short hash, `+dirty` when tracked files differ from it; None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch = None
    return {"os": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch}


def run_command(params_file: Path | None, overrides: list[str]) -> str:
    """The `tca run` that reproduces one run."""
    words = ["tca", "run", *(["--params", str(params_file)] if params_file else [])]
    for assignment in overrides:
        words += ["--set", assignment]
    return shlex.join(words)


def record(project: Project, experiment: str, variant: str, own: list[str], overrides: list[str],
           params_file: Path | None, show: str = "llm", index: int = 0) -> tuple[Path, dict]:
    """Write the index entry of the run now in `artifacts/` (all stages up to date); returns its
    path and content.

    `overrides` are all the run's `--set`s in order; `own` those that make this variant (the
    report's "key params"); `show` is `cf` for a row of the CF teacher's metrics."""
    metrics_path = project.artifacts / "eval" / "metrics.json"
    if not metrics_path.exists():
        raise TcaError(f"{metrics_path} does not exist: the pipeline has no finished eval to record")
    lock = project.lock()
    doc = {
        "experiment": experiment,
        "variant": variant,
        "index": index,
        "show": show,
        "set": own,
        "overrides": overrides,
        "params_file": str(params_file) if params_file else None,
        "command": run_command(params_file, overrides),
        "params": project.flat,
        "metrics": json.loads(metrics_path.read_text()),
        "ranks": sample_ranks(project.artifacts / "eval" / "predictions.parquet"),
        "seconds": {name: lock.get(name, {}).get("seconds") for name in project.graph.stages},
        "keys": {name: lock.get(name, {}).get("key") for name in project.graph.stages},
        "commit": git_commit(project.root),
        "machine": machine(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = results_dir(project, experiment) / f"{slug(variant)}.json"
    atomic_write_text(path, json.dumps(doc, indent=2, default=str) + "\n")
    return path, doc


BEYOND = "-"  # a rank of 10 or more: outside every top-k the report compares


def sample_ranks(predictions: Path) -> dict | None:
    """Each sample's 0-based rank of its target under the LLM, the CF teacher and popularity, as digit
    strings (one character per sample, `BEYOND` past 9), with a digest of the sample ids: what the
    report needs to compare two runs pair by pair on the same samples, in a few KB."""
    import hashlib

    import polars as pl

    if not predictions.exists():  # an eval stage that writes no predictions (a plugin's)
        return None
    table = pl.read_parquet(predictions)
    if "rank" not in table.columns:  # predictions of an eval stage that did not keep ranks
        return None
    digest = hashlib.sha256(table["sample_id"].cast(pl.Int64).to_numpy().tobytes()).hexdigest()[:16]
    encode = lambda ranks: "".join(str(r) if r < 10 else BEYOND for r in ranks.to_list())
    return {"sample_ids": digest} | {name: encode(table[column]) for name, column in
                                     (("llm", "rank"), ("cf", "cf_rank"), ("popularity", "popularity_rank")) if column in table.columns}


def decode_ranks(text: str):
    """`sample_ranks`' string -> ranks (10 for `BEYOND`), a numpy array."""
    import numpy as np

    return np.array([10 if c == BEYOND else int(c) for c in text], dtype=np.int64)


def load_records(folder: Path) -> list[dict]:
    """Every record under `folder` (artifacts/experiments); an unreadable one is named."""
    found = []
    for path in sorted(folder.glob("*/*.json")):
        try:
            found.append(json.loads(path.read_text()))
        except ValueError as err:
            raise TcaError(f"{path}: not a results record ({err}); delete it or rerun its variant") from err
    return found
