"""Fault injection: SIGKILL and SIGINT a real `tca run` (stages data -> subset -> cf on a tiny
RecBole dataset) at seeded random moments, then check that nothing was lost or is silently stale:

- stages.lock parses and every entry is whole (the old run's or the new one's, never half written);
- every stage folder holds exactly the old or the new outputs (never a mix, never a partial file),
  and after the next runner's start (`recover`) exactly those its lock entry names;
- `tca status` tells the truth: a stage it calls up to date holds the outputs of its params;
- every run-cache folder is a whole entry whose files hash to what it records;
- after Ctrl-C, the message's claim holds (a stage's outputs match its lock entry);
- the next `tca run` succeeds and writes outputs byte-identical to an uninterrupted run.

A "moment" is the k-th file-system step of the run (rename, link, unlink, mkdir, rmtree, copy, and
the middle of each write_text): a child harness counts them and signals itself at step k, so a
seed replays a moment exactly, and every commit step (each write of stages.lock, each rename into
artifacts/, each run-cache entry) is also hit on purpose. Time-based kills add moments inside
Polars and torch. Also: two concurrent runners, gc during a run, a run during gc.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_runner import REPO, sigint_default

from pipeline.runner import Project
from pipeline.runcache import read_entry
from tca.errors import TcaError

STAGES = ("data", "subset", "cf")
NEW = ["data.history_len=5"]  # the interrupted run: every stage's outputs change
SEED = 18

CHILD = r'''
import os, pathlib, shutil, signal, sys, time
at, match, sig = int(os.environ.get("FAULT_AT", "0")), os.environ.get("FAULT_MATCH", ""), os.environ.get("FAULT_SIG", "")
trace = open(os.environ["FAULT_TRACE"], "a") if os.environ.get("FAULT_TRACE") else None
seen = [0]

def tick(label):
    if trace:
        trace.write(label.replace("\n", " ") + "\n"); trace.flush()
    if match not in label:
        return
    seen[0] += 1
    if seen[0] != at:
        return
    if sig == "PAUSE":  # hold here until the test releases us
        pathlib.Path(os.environ["FAULT_PAUSED"]).write_bytes(b"")
        while not os.path.exists(os.environ["FAULT_RELEASE"]):
            time.sleep(0.02)
    else:
        os.kill(os.getpid(), getattr(signal, sig))

def wrap(module, name):
    real = getattr(module, name)
    def step(*args, **kwargs):
        tick(f"{name} {' -> '.join(str(a) for a in args[:2])}")
        return real(*args, **kwargs)
    setattr(module, name, step)

for name in ("replace", "rename", "link", "unlink", "mkdir", "rmdir"):
    wrap(os, name)
wrap(shutil, "rmtree"); wrap(shutil, "copy2")

def write_text(self, data, encoding=None, errors=None, newline=None):
    with open(self, "w", encoding=encoding, errors=errors, newline=newline) as f:
        f.write(data[: len(data) // 2]); f.flush()
        tick(f"write_text-mid {self}")
        f.write(data[len(data) // 2:])
    return len(data)
pathlib.Path.write_text = write_text

sys.argv = ["tca", *sys.argv[1:]]
import cli
cli.main()
'''


def tiny_recbole(folder: Path) -> Path:
    """60 users x 14 interactions over 40 titled items, seeded."""
    rng = np.random.default_rng(SEED)
    folder.mkdir(parents=True)
    rows = ["user_id:token\titem_id:token\ttimestamp:float"]
    for user in range(60):
        items = rng.choice(40, size=14, replace=False)
        rows += [f"u{user}\ti{item}\t{1000 + 10 * k + user}" for k, item in enumerate(items)]
    (folder / "tiny.inter").write_text("\n".join(rows) + "\n")
    (folder / "tiny.item").write_text("item_id:token\ttitle:token_seq\n" + "".join(f"i{i}\tItem number {i}\n" for i in range(40)))
    return folder


def make_project(tmp: Path) -> Path:
    """The real data, subset and cf stages (cf reading data only: sasrec needs no side inputs)."""
    real = yaml.safe_load((REPO / "stages.yaml").read_text())
    stages = {name: real["stages"][name] for name in STAGES}
    stages["cf"] = {**stages["cf"], "deps": ["data"]}
    params = real["params"]
    params["data"].update(source=f"recbole:{tiny_recbole(tmp / 'raw')}", min_item_interactions=2,
                          min_user_interactions=2, min_history=3, history_len=8)
    params["subset"].update(train=64, valid=16, test=16)
    params["cf"].update(hidden=8, blocks=1, max_epochs=2, patience=1, batch_size=64)
    root = tmp / "base"
    root.mkdir()
    (root / "stages.yaml").write_text(yaml.safe_dump({"stages": stages, "params": params}, sort_keys=False))
    for name in ("tca", "pipeline"):
        (root / name).symlink_to(REPO / name)
    return root


def snapshot(root: Path) -> dict[str, dict[str, bytes]]:
    """Every stage folder's files and bytes."""
    out = {}
    for stage in STAGES:
        folder = root / "artifacts" / stage
        if folder.is_dir():
            out[stage] = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    return out


def bare(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k != "seconds"}


class Refs:
    """The project after an uninterrupted run with the defaults (old) and after one with NEW (new)."""

    def __init__(self, tmp: Path):
        self.base = make_project(tmp)
        run_child(self.base, [])  # in a child, as every trial: no state of this test process (threads, ...) in the bytes
        self.old, self.old_lock = snapshot(self.base), {k: bare(v) for k, v in Project(self.base).lock().items()}
        done = tmp / "done"
        copy(self.base, done)
        run_child(done, NEW)
        self.new, self.new_lock = snapshot(done), {k: bare(v) for k, v in Project(done).lock().items()}
        assert all(self.old[s] != self.new[s] for s in STAGES)
        self.trial = 0

    def fresh(self, tmp: Path) -> Path:
        self.trial += 1
        root = tmp / f"trial{self.trial}"
        copy(self.base, root)
        return root


def run_child(root: Path, sets: list[str]) -> None:
    proc = child(root, ["run", *sum((["--set", s] for s in sets), [])])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err


def copy(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, symlinks=True)
    for stage, path in (("tca", REPO / "tca"), ("pipeline", REPO / "pipeline")):
        assert (dst / stage).resolve() == path


def child(root: Path, args: list[str], **env) -> subprocess.Popen:
    script = root.parent / "fault_child.py"
    if not script.exists():
        script.write_text(CHILD)
    full = dict(os.environ, PYTHONPATH=str(REPO), **{k: str(v) for k, v in env.items()})
    return subprocess.Popen([sys.executable, str(script), *args], cwd=root, env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default)


def check_consistent(root: Path, refs: Refs, sig: str) -> list[str]:
    """The invariants after a kill; returns what went wrong (empty: nothing)."""
    bad = []
    try:
        doc = yaml.safe_load((root / "stages.lock").read_text())
    except yaml.YAMLError as err:
        return [f"stages.lock unreadable: {err}"]
    if not isinstance(doc, dict) or set(doc) != set(STAGES):
        return [f"stages.lock lost entries: {doc!r}"[:300]]
    which = {}
    for stage in STAGES:
        entry = bare(doc[stage])
        which[stage] = "old" if entry == refs.old_lock[stage] else "new" if entry == refs.new_lock[stage] else None
        if which[stage] is None:
            bad.append(f"{stage}: lock entry is neither the old nor the new one")
    files = snapshot(root)
    for stage in STAGES:
        got = files.get(stage)
        if got is not None and got not in (refs.old[stage], refs.new[stage]):
            bad.append(f"{stage}: artifacts/{stage} holds neither the old nor the new outputs")
        if sig == "SIGINT" and which[stage] and got != getattr(refs, which[stage])[stage]:
            bad.append(f"{stage}: after Ctrl-C its outputs are not the ones its lock entry names")
    for params, ref in (([], refs.old), (NEW, refs.new)):
        stale = Project(root, params).status()
        for stage in STAGES:
            if stage not in stale and files.get(stage) != ref[stage]:
                bad.append(f"{stage}: status {params or 'defaults'} says up to date, but its outputs are others")
    proj = Project(root)
    for folder in sorted((root / "artifacts/.cache/runs").glob("*/*")):
        entry = read_entry(folder / "entry.yaml")
        if folder.name.startswith("."):
            continue  # hidden: a save or removal in progress, never read as an entry (recover drops it)
        if entry is None:
            bad.append(f"run cache: {folder.name} of {folder.parent.name} is not a whole entry")
        elif not proj._cache_intact(proj.graph.stages[folder.parent.name], folder.name, entry):
            bad.append(f"run cache: {folder.name} of {folder.parent.name} does not hash to its entry")
    with proj.exclusive(log=lambda *_: None):  # what the next runner does first: `recover`
        pass
    lock, now = Project(root).lock(), snapshot(root)
    for stage in STAGES:
        named = refs.old if bare(lock[stage]) == refs.old_lock[stage] else refs.new
        if now.get(stage) != named[stage]:
            bad.append(f"{stage}: after the next runner's recovery its outputs are not those its lock entry names")
    return bad


def finish(root: Path, refs: Refs) -> list[str]:
    """The next run: succeeds, byte-identical to the uninterrupted one, nothing left behind."""
    run_child(root, NEW)
    bad = []
    if snapshot(root) != refs.new:
        bad.append("the next run's outputs differ from an uninterrupted run's")
    if Project(root, NEW).status():
        bad.append("stale after the next run")
    if list((root / "artifacts/.tmp").glob("*")):
        bad.append("temp folders left after the next run")
    return bad


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    return Refs(tmp_path_factory.mktemp("faults"))


@pytest.fixture(scope="module")
def trace(refs, tmp_path_factory):
    """The labels of every file-system step of an uninterrupted run with NEW."""
    root = refs.fresh(tmp_path_factory.mktemp("trace"))
    path = root.parent / "trace.txt"
    proc = child(root, ["run", *sum((["--set", s] for s in NEW), [])], FAULT_TRACE=path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return path.read_text().splitlines()


def run_trial(refs, tmp, match: str, at: int, sig: str) -> list[str]:
    """One run with NEW, signalled at its `at`-th step whose label holds `match`; what went wrong."""
    root = refs.fresh(tmp)
    proc = child(root, ["run", *sum((["--set", s] for s in NEW), [])], FAULT_MATCH=match, FAULT_AT=at, FAULT_SIG=sig)
    _, err = proc.communicate(timeout=300)
    bad = []
    if sig == "SIGINT" and proc.returncode != 0:
        if proc.returncode != 130 or "previous outputs and stages.lock entry are untouched" not in err:
            bad.append(f"Ctrl-C exit {proc.returncode}: {err[-300:]}")
    bad += check_consistent(root, refs, sig) + finish(root, refs)
    shutil.rmtree(root)
    return [f"{sig} at step {at} of {match or 'all'!r}: {b}" for b in bad]


COMMIT_STEPS = ["stages.lock", "entry.yaml", "artifacts/data", "artifacts/subset", "artifacts/cf"]


def test_kills_at_every_commit_step(refs, trace, tmp_path):
    """SIGKILL at each step that writes stages.lock or a run-cache entry or moves a stage folder."""
    failures, trials = [], 0
    for match in COMMIT_STEPS:
        for at in range(1, sum(match in label for label in trace) + 1):
            failures += run_trial(refs, tmp_path, match, at, "SIGKILL")
            trials += 1
    print(f"commit-step kills: {trials}, inconsistent: {len(failures)}")
    assert trials >= 10 and failures == [], "\n".join(failures)


@pytest.mark.parametrize("sig, count", [("SIGKILL", 8), ("SIGINT", 8)])
def test_signals_at_seeded_random_steps(refs, trace, tmp_path, sig, count):
    rng = random.Random(f"{SEED}-{sig}")
    failures = []
    for at in sorted(rng.sample(range(1, len(trace) + 1), count)):
        failures += run_trial(refs, tmp_path, "", at, sig)
    print(f"{sig} at {count} random steps of {len(trace)}, inconsistent: {len(failures)}")
    assert failures == [], "\n".join(failures)


def test_signals_at_seeded_random_times(refs, tmp_path):
    """Moments inside Polars and torch too: a signal after a random share of a full run's time."""
    root = refs.fresh(tmp_path)
    start = time.perf_counter()
    proc = child(root, ["run", *sum((["--set", s] for s in NEW), [])])
    proc.communicate(timeout=300)
    full = time.perf_counter() - start
    shutil.rmtree(root)
    rng = random.Random(SEED)
    failures = []
    for sig in ["SIGKILL", "SIGINT"] * 2:
        root = refs.fresh(tmp_path)
        proc = child(root, ["run", *sum((["--set", s] for s in NEW), [])])
        time.sleep(rng.uniform(0.3, 1.0) * full)
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=300)
        if sig == "SIGINT" and proc.returncode not in (0, 130, -signal.SIGINT):  # -SIGINT: it came as Python exited
            failures.append(f"Ctrl-C exit {proc.returncode}: {err[-300:]}")
        failures += check_consistent(root, refs, sig) + finish(root, refs)
        shutil.rmtree(root)
    assert failures == [], "\n".join(failures)


def pause(root: Path, args: list[str], match: str, at: int = 1) -> tuple[subprocess.Popen, Path]:
    """A child `tca ARGS` held at its `at`-th step matching `match`; touch the returned path to release it."""
    paused, release = root.parent / f"paused-{match}-{at}".replace("/", "_"), root.parent / f"release-{match}-{at}".replace("/", "_")
    proc = child(root, args, FAULT_MATCH=match, FAULT_AT=at, FAULT_SIG="PAUSE", FAULT_PAUSED=paused, FAULT_RELEASE=release)
    deadline = time.time() + 120
    while not paused.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert paused.exists(), proc.communicate()
    return proc, release


def test_two_runners_gc_during_a_run_and_a_run_during_gc(refs, tmp_path):
    root = refs.fresh(tmp_path)
    new = sum((["--set", s] for s in NEW), [])
    proc, release = pause(root, ["run", *new], "runs/subset/.")  # the first runner, as subset links its outputs into the cache
    try:
        second = child(root, ["run", *new])
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2 and "is running in" in err and "wait for it to finish" in err
        with pytest.raises(TcaError, match="is running in"):
            Project(root).gc()
        assert list((root / "artifacts/.tmp").glob("subset-*"))  # the running stage's folder survives
    finally:
        release.touch()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert snapshot(root) == refs.new and check_consistent(root, refs, "SIGINT") == []

    proc, release = pause(root, ["gc"], "rmtree")  # the defaults' runs are unreferenced now
    try:
        with pytest.raises(TcaError, match=r"`tca gc`\) is running in"):
            Project(root).run(log=lambda *_: None)
    finally:
        release.touch()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "removed 3 cached run(s), kept 3" in out, err
    assert finish(root, refs) == []
