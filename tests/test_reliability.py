"""Reliability: each defect of issue 18 as a regression test (bad inputs are one clear error,
damaged state files are staleness, nothing runs beside a runner, no run is lost or silently stale)."""
from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from test_runner import REPO, make_project, quiet, runs_of_a, sigint_default

import cli
from pipeline.runner import Project
from tca.data import parse, read
from tca.errors import TcaError


def real_project(tmp_path: Path) -> Path:
    """A project folder with the real stages.yaml and the repo's code (symlinked)."""
    root = tmp_path / "real"
    root.mkdir()
    (root / "stages.yaml").write_text((REPO / "stages.yaml").read_text())
    for name in ("tca", "pipeline"):
        (root / name).symlink_to(REPO / name)
    return root


def hang_in_b(root: Path, tmp_path: Path, *args: str) -> subprocess.Popen:
    """`tca run ARGS` in a subprocess, returned once stage b has started (it then sleeps 60 s)."""
    marker = tmp_path / "started"
    marker.unlink(missing_ok=True)
    env = dict(os.environ, TOY_HANG=str(marker), PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", "import cli; cli.main()", "run", *args], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_default)
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate()
    return proc


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGINT)
    return proc.communicate(timeout=30)[1]


# 1. gc (and every other writer) holds the project lock

def test_gc_refuses_while_a_run_is_going(tmp_path):
    root = make_project(tmp_path)
    Project(root).run(log=quiet)
    proc = hang_in_b(root, tmp_path, "--set", "b.suffix=?")
    try:
        live = list((root / "artifacts/.tmp").iterdir())
        assert len(live) == 1
        with pytest.raises(TcaError, match=r"tca process \d+ \(`tca run --set b.suffix=\?`\) is running .*wait for it"):
            Project(root).gc()
        assert live[0].exists()  # the running stage's temp folder is still there
    finally:
        stop(proc)


# 2. a plugin's source file is part of the code hash

def test_plugin_source_is_stage_code(tmp_path):
    root = make_project(tmp_path)
    doc = yaml.safe_load((root / "stages.yaml").read_text())
    doc["params"]["a"]["plug"] = "myplug:Thing"
    doc["stages"]["a"]["plugins"] = ["a.plug"]
    (root / "stages.yaml").write_text(yaml.safe_dump(doc))
    (root / "myplug.py").write_text("class Thing:\n    pass\n")
    Project(root).run(log=quiet)
    assert Project(root).status() == {}
    (root / "myplug.py").write_text("class Thing:\n    x = 1\n")
    assert Project(root).status()["a"] == ["code changed: myplug.py"]
    assert Project(root, ["a.plug=registered"]).status()["a"] == ["code removed: myplug.py", "param a.plug: 'myplug:Thing' -> 'registered'"]
    assert "no module 'nowhere'" in Project(root, ["a.plug=nowhere:X"]).status()["a"][0]


def test_cf_plugin_is_code_of_every_stage_that_loads_the_model(tmp_path):
    root = real_project(tmp_path)
    (root / "mycf.py").write_text("")
    proj = Project(root, ["cf.model=mycf:Model"])
    loads = {name for name, stage in proj.graph.stages.items() if root / "mycf.py" in proj.code_files(stage)}
    assert loads == {"text_emb", "profiles", "cf", "sid", "cf_dist", "train", "eval"}
    assert all(root / "mycf.py" not in Project(root).code_files(s) for s in proj.graph.stages.values())


# 3. --dry, status and run share one staleness computation

def test_dry_run_propagates_staleness_like_status(tmp_path):
    root = make_project(tmp_path)
    Project(root).run(log=quiet)
    lines = []
    proj = Project(root, ["a.factor=3"])
    assert proj.run(dry=True, log=lines.append) == ["a", "b"] == list(proj.status())
    assert "b: would run (upstream `a` is stale)" in lines  # (each stage's line is followed by its non-default params)


# 4. unreadable input files: one error naming the file and where; skip what can be skipped

def write_recbole(folder: Path, item_bytes: bytes, inter: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "x.inter").write_text(inter or "user_id:token\titem_id:token\ttimestamp:float\n1\t1\t5\n1\t3\t6\n")
    (folder / "x.item").write_bytes(item_bytes)
    return folder


def test_invalid_utf8_names_file_line_and_byte_or_is_skipped(tmp_path):
    folder = write_recbole(tmp_path / "rb", b"item_id:token\ttitle:token_seq\n1\tabc\n2\t\xff\xfebad\n3\tok\n")
    with pytest.raises(TcaError, match=r"x\.item, line 3 \(byte 38\): not UTF-8 text.*data\.on_bad_line=skip"):
        read(parse(f"recbole:{folder}"), "error")
    raw = read(parse(f"recbole:{folder}"), "skip")
    assert raw.items["raw_id"].to_list() == ["1", "3"] and raw.bad_lines == 1


def test_truncated_gzip_is_named(tmp_path):
    full = gzip.compress(b'{"reviewerID": "u", "asin": "a", "unixReviewTime": 5}\n' * 5000)
    (tmp_path / "r.json.gz").write_bytes(full[: len(full) // 2])
    (tmp_path / "m.json").write_text('{"asin": "a", "title": "x"}\n')
    for mode in ("error", "skip"):
        with pytest.raises(TcaError, match=r"r\.json\.gz: cannot be read .*truncated: download or copy it again"):
            read(parse(f"amazon2018:{tmp_path / 'r.json.gz'}:{tmp_path / 'm.json'}"), mode)


def test_header_only_inter_says_so(tmp_path):
    folder = write_recbole(tmp_path / "rb", b"item_id:token\ttitle:token_seq\n1\tabc\n",
                           inter="user_id:token\titem_id:token\ttimestamp:float\n")
    with pytest.raises(TcaError, match=r"x\.inter: no data lines after the header line"):
        read(parse(f"recbole:{folder}"), "error")


def test_bad_input_through_the_cli_changes_nothing(tmp_path, monkeypatch):
    root = real_project(tmp_path)
    folder = write_recbole(tmp_path / "rb", b"item_id:token\ttitle:token_seq\n1\t\xffabc\n")
    monkeypatch.chdir(root)
    result = CliRunner().invoke(cli.main, ["run-stage", "data", "--set", f"data.source=recbole:{folder}"])
    assert result.exit_code == 2 and "x.item, line 2 (byte 32): not UTF-8" in result.output
    assert not (root / "stages.lock").exists() and not (root / "artifacts/data").exists()


# 5. every section's values are checked before anything runs

BAD_VALUES = ["subset.seed=-1", "tca.top_k=-1", "tca.temperature=0", "tca.cf_source=x", "tca.alpha=2", "lora.r=0",
              "prompt.target_template=x", "prompt.instruction={nope}", "eval.num_beams=0", "eval.split=train",
              "train.lr=0", "train.backbone=x", "sid.levels=0", "seq2seq.heads=0", "text_emb.batch_size=0",
              "profiles.history=0", "data.on_bad_line=maybe", "data.source=nowhere", "cf.hidden=0", "cf.model=x"]


@pytest.mark.parametrize("bad", BAD_VALUES)
def test_bad_values_stop_status_dry_and_run_before_anything_runs(tmp_path, bad):
    root = real_project(tmp_path)
    key = bad.split("=")[0]
    for call in (lambda p: p.status(), lambda p: p.run(dry=True, log=quiet), lambda p: p.run(["data"], log=quiet)):
        with pytest.raises(TcaError, match=rf"{key.replace('.', '[.]')}|{key.split('.')[0]}:"):
            call(Project(root, ["subset.train=2000", bad]))
    assert not (root / "stages.lock").exists() and not (root / "artifacts/data").exists()


def test_every_stage_with_params_checks_them_and_the_defaults_pass(tmp_path):
    proj = Project(real_project(tmp_path))
    lacking = [n for n, s in proj.graph.stages.items() if s.params and not hasattr(proj.module(s), "check_params") and n != "model"]
    assert lacking == []  # model's only param, llm.base, names any hub id or folder
    proj.check_params()
    memo = json.loads((proj.artifacts / ".cache/checked_params.json").read_text())
    assert len(memo) == 1  # remembered: the next status does not import the configs again


# 6. damaged cache and state files never block recovery

def test_damaged_cache_entry_is_a_miss_and_gc_works(tmp_path):
    root = make_project(tmp_path)
    Project(root).run(log=quiet)
    Project(root, ["a.factor=3"]).run(log=quiet)
    for entry in (root / "artifacts/.cache/runs/a").glob("*/entry.yaml"):
        entry.write_text("key: [unclosed\n")
    logs = []
    Project(root).run(log=logs.append)  # factor 2 again: its cache entry is damaged, so a recomputes
    assert sum("removed a damaged or half-written run-cache entry: artifacts/.cache/runs/a/" in line for line in logs) == 2
    assert runs_of_a(root) == 3
    assert (root / "artifacts/b/out.txt").read_text() == "hello hello !"
    (root / "artifacts/.cache/runs/b/junk").mkdir()  # a folder without entry.yaml
    removed, kept = Project(root).gc()
    assert kept == 2 and not (root / "artifacts/.cache/runs/b/junk").exists()


@pytest.mark.parametrize("lock_text, reason", [
    ("- a\n- b\n", "stages.lock is damaged (a list, not a mapping of stages)"),
    ("a: {key: [\n", "stages.lock is unreadable"),
    ("a: 3\nb: {key: x}\n", "its stages.lock entry is damaged"),
])
def test_damaged_lock_is_staleness_with_the_reason(tmp_path, lock_text, reason):
    root = make_project(tmp_path)
    Project(root).run(log=quiet)
    (root / "stages.lock").write_text(lock_text)
    (root / "artifacts/.cache/hashes.json").write_text("[1, 2]")
    stale = Project(root).status()
    assert reason in stale["a"][0]
    Project(root).run(log=quiet)
    assert Project(root).status() == {}


# 7. the hash cache sees a same-size edit with the mtime put back

def test_same_size_edit_with_restored_mtime_is_seen(tmp_path):
    root = make_project(tmp_path)
    Project(root).run(log=quiet)
    out = root / "artifacts/b/out.txt"
    before = out.stat()
    time.sleep(0.01)
    out.write_text("HELLO hello !")
    os.utime(out, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert Project(root).status() == {"b": ["output modified: artifacts/b/out.txt"]}


# 8. temp folders: removed when a stage fails, by the next runner after a kill, named by status

def test_temp_folders_are_cleaned_and_reported(tmp_path, monkeypatch):
    root = make_project(tmp_path)
    Project(root).run(log=quiet)
    monkeypatch.setenv("TOY_FAIL", "1")
    with pytest.raises(RuntimeError):
        Project(root, ["b.suffix=?"]).run(log=quiet)
    assert list((root / "artifacts/.tmp").iterdir()) == []  # a failed stage's folder goes at once
    monkeypatch.delenv("TOY_FAIL")
    proc = hang_in_b(root, tmp_path, "--set", "b.suffix=?")
    monkeypatch.chdir(root)
    assert "is running now" in CliRunner().invoke(cli.main, ["status"]).output
    proc.kill()
    proc.communicate()
    output = CliRunner().invoke(cli.main, ["status"]).output
    assert "leftovers of killed runs" in output and f"artifacts/.tmp/b-{proc.pid} (7 B)" in output
    logs = []
    Project(root).run(log=logs.append)
    assert f"removed a killed run's leftover: artifacts/.tmp/b-{proc.pid} (7 B)" in logs
    assert list((root / "artifacts/.tmp").iterdir()) == []


# 9. Ctrl-C between the swap and the lock write: the message is true

def test_ctrl_c_in_the_commit_window_finishes_the_commit(tmp_path, monkeypatch):
    root = make_project(tmp_path)
    Project(root).run(log=quiet)
    write = Project._write_lock_entry

    def interrupted(self, name, entry):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C right after the outputs were swapped in
        write(self, name, entry)

    monkeypatch.setattr(Project, "_write_lock_entry", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Project(root, ["b.suffix=?"]).run(log=quiet)
    monkeypatch.undo()
    assert (root / "artifacts/b/out.txt").read_text() == "hello hello ?"
    assert Project(root, ["b.suffix=?"]).status() == {}  # the lock entry matches what was swapped in


# 10. smaller ones

def test_dry_run_works_while_a_run_is_going(tmp_path):
    root = make_project(tmp_path)
    Project(root).run(log=quiet)
    proc = hang_in_b(root, tmp_path, "--set", "b.suffix=?")
    try:
        assert Project(root, ["b.suffix=?"]).run(dry=True, log=quiet) == ["b"]
    finally:
        stop(proc)


def test_symlinked_stage_folder_is_refused(tmp_path):
    root = make_project(tmp_path)
    Project(root).run(log=quiet)
    elsewhere = tmp_path / "elsewhere"
    os.replace(root / "artifacts/a", elsewhere)
    (root / "artifacts/a").symlink_to(elsewhere)
    with pytest.raises(TcaError, match=r"artifacts/a is a symbolic link .*Link artifacts/ itself instead"):
        Project(root, ["a.factor=3"]).run(log=quiet)
    assert (root / "artifacts/a").is_symlink()


def test_inspect_of_a_damaged_artifact_is_one_message(tmp_path, monkeypatch):
    root = real_project(tmp_path)
    data = root / "artifacts/data"
    data.mkdir(parents=True)
    (data / "stats.json").write_text("{}")
    (data / "items.parquet").write_bytes(b"PAR1 not really")
    monkeypatch.chdir(root)
    result = CliRunner().invoke(cli.main, ["inspect", "data"])
    assert result.exit_code == 2 and "cannot read" in result.output and "tca run-stage data --force" in result.output
    assert "Traceback" not in result.output


# Code that runs on import: a checkpoint never imports what only it names

PLUGIN = '''
from pathlib import Path
from tca.cf.sasrec import SASRec
Path({marker!r}).write_text("imported")

class Model(SASRec):
    pass
'''


def test_checkpoint_never_imports_a_module_only_it_names(tmp_path, monkeypatch):
    from tca.cf.base import CFConfig
    from tca.cf.registry import build, load_checkpoint, save_checkpoint

    marker = tmp_path / "imported"
    module = f"plug_{os.getpid()}_{time.monotonic_ns()}"
    (tmp_path / f"{module}.py").write_text(PLUGIN.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build(CFConfig(hidden=8, heads=1, blocks=1), 5)
    model.cfg.model = f"{module}:Model"  # as a plugin model's checkpoint records it
    save_checkpoint(model, tmp_path / "model.pt")
    for caller in (None, "sasrec", f"{module}:Other"):
        with pytest.raises(TcaError, match=rf"holds a '{module}:Model' model.*never imports.*set cf.model={module}:Model"):
            load_checkpoint(tmp_path / "model.pt", plugin=caller)
    assert not marker.exists() and module not in sys.modules
    loaded = load_checkpoint(tmp_path / "model.pt", plugin=f"{module}:Model")  # the caller's cf.model names it
    assert marker.exists() and type(loaded).__name__ == "Model"
