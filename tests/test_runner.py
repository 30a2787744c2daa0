"""The stage runner on a toy project: staleness rules, run cache, atomicity, bad graphs."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import cli
from pipeline.runner import Project
from tca.errors import TcaError

REPO = Path(__file__).resolve().parents[1]

STAGE_A = '''
from pathlib import Path

def external_deps(params):
    return [Path(params["a"]["path"])]

def run(ctx):
    text = Path(ctx.param("a.path")).read_text()
    counter = Path(ctx.param("a.counter"))
    counter.write_text(counter.read_text() + "a" if counter.exists() else "a")
    (ctx.out / "out.txt").write_text(text * ctx.param("a.factor"))
    ctx.log("wrote out.txt")

def inspect(artifact, params):
    return "A says: " + (artifact / "out.txt").read_text()
'''

STAGE_B = '''
import os, time
from pathlib import Path

def run(ctx):
    (ctx.out / "out.txt").write_text("partial")
    if os.environ.get("TOY_HANG"):
        Path(os.environ["TOY_HANG"]).write_text("started")
        time.sleep(60)
    if os.environ.get("TOY_FAIL"):
        raise RuntimeError("boom")
    a = (ctx.input("a") / "out.txt").read_text()
    (ctx.out / "out.txt").write_text(a + ctx.param("b.suffix"))
'''


def make_project(tmp_path: Path, stages: dict | None = None, sources: dict | None = None, params: dict | None = None) -> Path:
    """A project folder with stages a -> b (or `stages` whose entries say `{pkg}.<module>`, over the
    module `sources`), in a package with a unique name (fresh imports)."""
    pkg = f"toy_{uuid.uuid4().hex[:8]}"
    root = tmp_path / "proj"
    (root / pkg).mkdir(parents=True)
    (root / pkg / "__init__.py").write_text("")
    for name, source in (sources or {"a": STAGE_A, "b": STAGE_B}).items():
        (root / pkg / f"{name}.py").write_text(source)
    (root / "lib.py").write_text("X = 1\n")
    (root / "input.txt").write_text("hello ")
    doc = {
        "stages": {name: {**spec, "entry": spec["entry"].format(pkg=pkg)} for name, spec in stages.items()} if stages else {
            "a": {"entry": f"{pkg}.a", "code": ["lib.py"], "deps": [], "params": ["a"], "outs": ["out.txt"]},
            "b": {"entry": f"{pkg}.b", "deps": ["a"], "params": ["b.suffix"], "outs": ["out.txt"]},
        },
        "params": params or {
            "a": {"path": str(root / "input.txt"), "factor": 2, "counter": str(tmp_path / "counter")},
            "b": {"suffix": "!", "unused": 0.5},
        },
    }
    (root / "stages.yaml").write_text(yaml.safe_dump(doc))
    return root


def runs_of_a(root: Path) -> int:
    counter = root.parent / "counter"
    return len(counter.read_text()) if counter.exists() else 0


def quiet(*_):
    pass


def test_run_then_up_to_date(tmp_path):
    root = make_project(tmp_path)
    assert Project(root).run(log=quiet) == ["a", "b"]
    assert (root / "artifacts/b/out.txt").read_text() == "hello hello !"
    assert Project(root).status() == {}
    assert Project(root).run(log=quiet) == []
    lock = yaml.safe_load((root / "stages.lock").read_text())
    assert lock["a"]["params"] == {"a.counter": str(tmp_path / "counter"), "a.factor": 2, "a.path": str(root / "input.txt")}
    assert set(lock["a"]["code"]) == {next(root.glob("toy_*/a.py")).relative_to(root).as_posix(), "lib.py"}


def test_param_change_marks_stage_and_downstream(tmp_path):
    root = make_project(tmp_path)
    Project(root).run(log=quiet)
    stale = Project(root, ["a.factor=3"]).status()
    assert stale["a"] == ["param a.factor: 2 -> 3"]
    assert stale["b"] == ["upstream `a` is stale"]
    stale = Project(root, ["b.suffix=?"]).status()
    assert list(stale) == ["b"] and stale["b"] == ["param b.suffix: '!' -> '?'"]
    assert Project(root, ["b.unused=0.7"]).status() == {}  # not declared by any stage


def test_dep_code_and_output_changes_are_named(tmp_path):
    root = make_project(tmp_path)
    Project(root).run(log=quiet)
    (root / "input.txt").write_text("bye ")
    assert Project(root).status()["a"] == [f"dep changed: {root / 'input.txt'}"]
    Project(root).run(log=quiet)
    assert (root / "artifacts/b/out.txt").read_text() == "bye bye !"

    (root / "lib.py").write_text("X = 2\n")
    assert Project(root).status()["a"] == ["code changed: lib.py"]
    Project(root).run(log=quiet)

    (root / "artifacts/b/out.txt").write_text("tampered")
    assert Project(root).status() == {"b": ["output modified: artifacts/b/out.txt"]}
    (root / "artifacts/b/out.txt").unlink()
    assert Project(root).status() == {"b": ["output missing: artifacts/b/out.txt"]}
    Project(root).run(log=quiet)
    assert (root / "artifacts/b/out.txt").read_text() == "bye bye !"


def test_upstream_stage_changed_outputs_make_downstream_stale(tmp_path):
    root = make_project(tmp_path)
    Project(root).run(log=quiet)
    Project(root, ["a.factor=1"]).run(["a"], log=quiet)
    assert Project(root, ["a.factor=1"]).status() == {"b": ["dep changed: outputs of `a`"]}


STAGE_TWO_OUTS = '''
def run(ctx):
    (ctx.out / "out.txt").write_text("x" * ctx.param("a.factor"))
    (ctx.out / "other.txt").write_text(str(ctx.param("a.other")))
'''

STAGE_READS_ONE = '''
from pathlib import Path

def reads(params):
    return {"a": ["out.txt"]}

def run(ctx):
    counter = Path(ctx.param("c.counter"))
    counter.write_text(counter.read_text() + "c" if counter.exists() else "c")
    (ctx.out / "out.txt").write_text((ctx.input("a") / "out.txt").read_text() + "!")
'''


def test_stage_reading_part_of_a_dep_is_stale_only_when_that_part_changes(tmp_path):
    counter = tmp_path / "counter"
    root = make_project(tmp_path, {"a": {"entry": "{pkg}.a", "deps": [], "params": ["a"], "outs": ["out.txt", "other.txt"]},
                                   "c": {"entry": "{pkg}.c", "deps": ["a"], "params": ["c"], "outs": ["out.txt"]}},
                        {"a": STAGE_TWO_OUTS, "c": STAGE_READS_ONE}, {"a": {"factor": 2, "other": 1}, "c": {"counter": str(counter)}})
    assert Project(root).run(log=quiet) == ["a", "c"]
    lock = yaml.safe_load((root / "stages.lock").read_text())
    assert list(lock["c"]["deps"]) == ["stage:a/out.txt"]
    assert Project(root, ["a.other=2"]).run(log=quiet) == ["a"]   # c: up to date, its part of a is the same
    assert counter.read_text() == "c"
    assert Project(root, ["a.other=2", "a.factor=3"]).run(log=quiet) == ["a", "c"]
    assert counter.read_text() == "cc" and (root / "artifacts/c/out.txt").read_text() == "xxx!"
    (root / "artifacts/a/out.txt").unlink()
    with pytest.raises(TcaError, match=r"reads .*a/out.txt, which `a` did not write"):
        Project(root, ["a.other=2", "a.factor=3"]).fingerprint(Project(root).graph.stages["c"])


def test_real_stages_read_parts_that_their_deps_write():
    """Each `reads` of the real stages names outputs its dep declares, and follows its params."""
    import importlib

    project = Project(REPO)
    graph = project.graph
    found = {}
    for name, stage in graph.stages.items():
        reads = getattr(importlib.import_module(stage.entry), "reads", None)
        for params in (project.params, Project(REPO, ["eval.split=valid", "train.eval_every=1"]).params):
            for dep, files in (reads(params) if reads else {}).items():
                assert dep in stage.deps and set(files) <= set(graph.stages[dep].outs), (name, dep, files)
                found.setdefault(name, []).append(files)
    assert found == {"cf_dist": [["train.parquet"]] * 2, "train": [["train.parquet"], ["train.parquet", "valid.parquet"]],
                     "eval": [["test.parquet"], ["valid.parquet"]]}


STAGE_INERT = '''
from pathlib import Path

def inert(params):
    return {"c.scale": "c.mode is copy, which does not scale"} if params["c"]["mode"] == "copy" else {}

def run(ctx):
    counter = Path(ctx.param("c.counter"))
    counter.write_text(counter.read_text() + "c" if counter.exists() else "c")
    text = (ctx.input("a") / "out.txt").read_text()
    (ctx.out / "out.txt").write_text(text if ctx.param("c.mode") == "copy" else text * ctx.param("c.scale"))
'''


def test_a_param_the_stage_leaves_unread_reruns_nothing_and_says_so(tmp_path, monkeypatch):
    counter = tmp_path / "counter"
    root = make_project(tmp_path, {"a": {"entry": "{pkg}.a", "deps": [], "params": ["a"], "outs": ["out.txt", "other.txt"]},
                                   "c": {"entry": "{pkg}.c", "deps": ["a"], "params": ["c"], "outs": ["out.txt"]}},
                        {"a": STAGE_TWO_OUTS, "c": STAGE_INERT},
                        {"a": {"factor": 2, "other": 1}, "c": {"counter": str(counter), "mode": "copy", "scale": 2}})
    assert Project(root).run(log=quiet) == ["a", "c"]
    assert "c.scale" not in yaml.safe_load((root / "stages.lock").read_text())["c"]["params"]
    lines = []
    assert Project(root, ["c.scale=3"]).status() == {} and Project(root, ["c.scale=3"]).run(log=lines.append) == []
    assert "note: --set c.scale changes nothing: c.mode is copy, which does not scale" in lines and counter.read_text() == "c"
    assert Project(root, ["a.factor=3"]).idle_overrides() == []
    stale = Project(root, ["c.mode=repeat", "c.scale=3"]).status()   # now read: a change of it counts
    assert stale == {"c": ["param c.mode: 'copy' -> 'repeat'", "param c.scale: '(unset)' -> 3"]}
    assert Project(root, ["c.mode=repeat", "c.scale=3"]).idle_overrides() == []
    monkeypatch.chdir(root)
    result = CliRunner().invoke(cli.main, ["status", "--set", "c.scale=4"])
    assert result.output == "note: --set c.scale changes nothing: c.mode is copy, which does not scale\neverything is up to date\n"


def test_real_stages_leave_unread_what_their_params_make_irrelevant():
    """train: tca.alpha under plain NTP, lora under full fine-tuning, seq2seq for the LLMs and the LLM's
    settings for the T5s; eval and trie likewise for tiger / letter. Only these leave the keys."""
    project = Project(REPO)
    train, eval_, trie = (project.graph.stages[name] for name in ("train", "eval", "trie"))
    ntp = Project(REPO, ["train.loss=ntp", "train.finetune=full"])
    assert sorted(ntp.inert(train)) == ["lora", "seq2seq", "tca.alpha"] and ntp.inert(eval_) == ntp.inert(trie) == {}
    assert "tca.alpha" not in ntp.key_params(train) and "lora.r" not in ntp.key_params(train)
    assert "train.loss is ntp" in ntp.inert(train)["tca.alpha"]
    tca = Project(REPO, ["train.loss=tca", "train.finetune=lora"])
    assert sorted(tca.inert(train)) == ["seq2seq"] and tca.key_params(train)["tca.alpha"] == 0.1
    sid = Project(REPO, ["train.backbone=tiger", "train.loss=tca"])
    assert sorted(sid.inert(train)) == ["llm.attn_implementation", "lora", "prompt"]
    assert sorted(sid.inert(eval_)) == ["llm.attn_implementation", "prompt"] and list(sid.inert(trie)) == ["prompt.target_template"]
    assert "seq2seq.lr" in sid.key_params(train) and not any(k.startswith("prompt.") for k in sid.key_params(eval_))
    notes = Project(REPO, ["train.loss=ntp", "tca.alpha=0.3", "lora.r=4", "train.lr=0.001"]).idle_overrides()
    assert [line.split(":")[0] for line in notes] == ["--set tca.alpha changes nothing", "--set lora.r changes nothing"]


def test_run_stage_refuses_stale_upstream_unless_asked(tmp_path):
    root = make_project(tmp_path)
    with pytest.raises(TcaError, match="upstream stage `a` is stale.*--upstream"):
        Project(root).run(["b"], log=quiet)
    assert not (root / "artifacts").joinpath("b").exists()
    assert Project(root).run(["b"], upstream=True, log=quiet) == ["a", "b"]
    assert Project(root, ["a.factor=5"]).run(["a"], downstream=True, log=quiet) == ["a", "b"]


def test_force_dry_and_downstream(tmp_path):
    root = make_project(tmp_path)
    assert Project(root).run(dry=True, log=quiet) == ["a", "b"]
    assert not (root / "artifacts/a").exists() and not (root / "stages.lock").exists()
    Project(root).run(log=quiet)
    assert runs_of_a(root) == 1
    assert Project(root).run(["a"], force=True, log=quiet) == ["a"]
    assert runs_of_a(root) == 2  # --force recomputes, the run cache is bypassed


def test_run_cache_restores_seen_params(tmp_path):
    root = make_project(tmp_path)
    for factor in (1, 3, 1, 3):
        Project(root, [f"a.factor={factor}"]).run(log=quiet)
    assert runs_of_a(root) == 2  # the 3rd and 4th runs were restored
    assert (root / "artifacts/b/out.txt").read_text() == "hello hello hello !"
    assert Project(root, ["a.factor=3"]).status() == {}
    removed, kept = Project(root).gc()
    assert (removed, kept) == (2, 2)  # factor=1 runs of a and b go, the locked ones stay
    Project(root, ["a.factor=1"]).run(log=quiet)
    assert runs_of_a(root) == 3


def test_failed_stage_leaves_previous_outputs_and_lock(tmp_path, monkeypatch):
    root = make_project(tmp_path)
    Project(root).run(log=quiet)
    lock_before = (root / "stages.lock").read_text()
    monkeypatch.setenv("TOY_FAIL", "1")
    with pytest.raises(RuntimeError):
        Project(root, ["b.suffix=?"]).run(log=quiet)
    assert (root / "artifacts/b/out.txt").read_text() == "hello hello !"
    assert (root / "stages.lock").read_text() == lock_before
    monkeypatch.delenv("TOY_FAIL")
    Project(root, ["b.suffix=?"]).run(log=quiet)  # leftovers of the failed run do not get in the way
    assert (root / "artifacts/b/out.txt").read_text() == "hello hello ?"
    assert not list((root / "artifacts/.tmp").iterdir())


def sigint_default() -> None:
    """In the child: Ctrl-C raises KeyboardInterrupt even when this test runs in the background of a
    shell (which starts it with SIGINT ignored, and Python keeps an ignored SIGINT ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_stage_leaves_previous_outputs_and_lock(tmp_path, sig):
    root = make_project(tmp_path)
    Project(root).run(log=quiet)
    lock_before = (root / "stages.lock").read_text()
    marker = tmp_path / "started"
    env = dict(os.environ, TOY_HANG=str(marker), PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", "import cli; cli.main()", "run", "--set", "b.suffix=?"],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_default)
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "untouched" in err
    assert (root / "artifacts/b/out.txt").read_text() == "hello hello !"
    assert (root / "stages.lock").read_text() == lock_before
    assert Project(root).status() == {}


def test_set_validation(tmp_path):
    root = make_project(tmp_path)
    with pytest.raises(TcaError) as err:
        Project(root, ["a.facter=3"])
    assert "unknown param; did you mean a.factor" in str(err.value) and "b.suffix" in str(err.value)
    with pytest.raises(TcaError, match=r"--set train.alpha: unknown param; did you mean lora.alpha or tca.alpha\?"):
        Project(REPO, ["train.alpha=0.3"])   # DESIGN.md's example: the param is tca.alpha
    with pytest.raises(TcaError, match="expected an integer"):
        Project(root, ["a.factor=0.5"])
    with pytest.raises(TcaError, match="key=value"):
        Project(root, ["a.factor"])
    assert Project(root, ["b.unused=1"]).params["b"]["unused"] == 1.0


@pytest.mark.parametrize("stages, message", [
    ({"a": {"entry": "x.a", "deps": ["b"]}, "b": {"entry": "x.b", "deps": ["a"]}}, "a, b, a form a cycle"),
    ({"a": {"entry": "x.a", "deps": ["nope"]}}, "depends on `nope`, which is not a stage"),
    ({"a": {"entry": "x.a", "params": ["zzz"]}}, "param `zzz`"),
    ({"a": {"entry": "x.a", "outz": []}}, "unknown field"),
])
def test_bad_graphs_are_refused(tmp_path, stages, message):
    root = make_project(tmp_path, stages)
    with pytest.raises(TcaError, match=message):
        Project(root)
    assert not (root / "artifacts").exists()


def test_cli_status_inspect_and_errors(tmp_path, monkeypatch):
    root = make_project(tmp_path)
    monkeypatch.chdir(root)
    runner = CliRunner()
    result = runner.invoke(cli.main, ["status"])
    assert result.exit_code == 0 and "never run" in result.output
    result = runner.invoke(cli.main, ["run"])
    assert result.exit_code == 0, result.output
    assert "a: done in" in result.output and "out.txt" in result.output
    assert runner.invoke(cli.main, ["run"]).output.strip() == "a: up to date\nb: up to date\neverything is up to date"
    assert runner.invoke(cli.main, ["inspect", "a"]).output.strip() == "A says: hello hello"
    result = runner.invoke(cli.main, ["status", "--set", "nope.x=1"])
    assert result.exit_code == 2 and "unknown param" in result.output
    result = runner.invoke(cli.main, ["run-stage", "zzz"])
    assert result.exit_code == 2 and "unknown stage `zzz`" in result.output
    result = runner.invoke(cli.main, ["inspect", "b"])
    assert result.exit_code == 2 and "no inspect view" in result.output
