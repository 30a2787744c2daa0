"""`tca sweep` / `tca experiment` on a toy cf -> train -> eval project: grid expansion, each
point run once (shared stages restored from the run cache), resume after an interruption,
variants that cannot run, the results records, and the repo's experiments.yaml."""
from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import cli
from pipeline.experiments import experiment_file, load_experiments
from pipeline.runner import Project
from pipeline.sweep import Variant, grid, run_selected, run_variants, split_values
from tca.errors import TcaError

REPO = Path(__file__).resolve().parents[1]

# Each stage appends its name to the counter file, so a test can count what was computed.
COUNT = '''
from pathlib import Path

def count(ctx):
    path = Path(ctx.param("toy.counter"))
    path.write_text((path.read_text() if path.exists() else "") + ctx.name + "\\n")
'''

CF = '''
from .count import count

def run(ctx):
    count(ctx)
    (ctx.out / "model.txt").write_text(str(ctx.param("cf.size")))
'''

TRAIN = '''
import json
from tca.errors import TcaError
from .count import count

def run(ctx):
    if ctx.param("train.alpha") < 0:
        raise TcaError("train.alpha must be >= 0")
    count(ctx)
    (ctx.out / "log.jsonl").write_text(json.dumps({"alpha": ctx.param("train.alpha")}) + "\\n")
'''

EVAL = '''
import json, os
from .count import count

def run(ctx):
    alpha = ctx.param("train.alpha")
    if os.environ.get("TOY_INTERRUPT") == str(alpha):
        raise KeyboardInterrupt
    count(ctx)
    size = int((ctx.input("cf") / "model.txt").read_text())
    llm = {"hr@5": alpha / 5, "ndcg@5": alpha / 10, "hr@10": alpha / 2, "ndcg@10": alpha / 10 + size / 100, "cc": alpha}
    if ctx.param("eval.split") == "valid":  # valid peaks at alpha 0.3, test grows with alpha
        llm["ndcg@10"] = 1 - (alpha - 0.3) ** 2
    cf = {"hr@5": size / 50, "ndcg@5": size / 100, "hr@10": size / 20, "ndcg@10": size / 100}
    metrics = {"split": ctx.param("eval.split"), "llm": llm, "cf": cf, "n_samples": 8, "decode": {"device": "cpu"}}
    (ctx.out / "metrics.json").write_text(json.dumps(metrics))
'''


def make_project(tmp_path: Path) -> Path:
    pkg = f"sweep_{uuid.uuid4().hex[:8]}"
    root = tmp_path / "proj"
    (root / pkg).mkdir(parents=True)
    for name, code in {"__init__": "", "count": COUNT, "cf": CF, "train": TRAIN, "eval": EVAL}.items():
        (root / pkg / f"{name}.py").write_text(code)
    doc = {
        "stages": {
            "cf": {"entry": f"{pkg}.cf", "params": ["cf"], "outs": ["model.txt"]},
            "train": {"entry": f"{pkg}.train", "deps": ["cf"], "params": ["train"], "outs": ["log.jsonl"]},
            "eval": {"entry": f"{pkg}.eval", "deps": ["cf", "train"], "params": ["eval"], "outs": ["metrics.json"]},
        },
        "params": {"toy": {"counter": str(tmp_path / "counter")}, "cf": {"size": 1}, "train": {"alpha": 0.1}, "eval": {"k": 10, "split": "test"}},
    }
    (root / "stages.yaml").write_text(yaml.safe_dump(doc))
    return root


def computed(root: Path) -> list[str]:
    """The stages computed so far, in order; the counter is reset."""
    counter = root.parent / "counter"
    names = counter.read_text().split() if counter.exists() else []
    counter.unlink(missing_ok=True)
    return names


def records(root: Path, experiment: str) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((root / "artifacts/experiments" / experiment).glob("*.json"))}


def test_split_values_keeps_lists_whole():
    assert split_values("0.1, 0.3,1") == ["0.1", "0.3", "1"]
    assert split_values("[q_proj,v_proj],[q_proj]") == ["[q_proj,v_proj]", "[q_proj]"]
    assert split_values("recbole:/data/x") == ["recbole:/data/x"]


def test_grid_is_the_cartesian_product_first_key_outermost():
    points = grid(["a.x=1,2,3", "b.y=p,q"])
    assert [p.overrides for p in points] == [
        ("a.x=1", "b.y=p"), ("a.x=1", "b.y=q"), ("a.x=2", "b.y=p"), ("a.x=2", "b.y=q"), ("a.x=3", "b.y=p"), ("a.x=3", "b.y=q")]
    assert points[1].name == "a.x=1 b.y=q" and points[1].show == "llm"
    assert [p.name for p in grid(["lora.target_modules=[q,v],[q]"])] == ["lora.target_modules=[q,v]", "lora.target_modules=[q]"]
    for bad, message in ((["a.x"], "expected KEY=V1,V2"), (["a.x=1", "a.x=2"], "given twice"), (["a.x=1,,2"], "empty value"), ([], "at least one")):
        with pytest.raises(TcaError, match=message):
            grid(bad)


def test_sweep_computes_each_stage_once_and_resumes_without_recomputing(tmp_path):
    root = make_project(tmp_path)
    lines = []
    outcomes = run_variants(root, "grid", grid(["train.alpha=0.1,0.2", "cf.size=1,2"]), log=lines.append)
    assert all(o.error is None for o in outcomes)
    # cf has 2 distinct params: the 3rd point restores size=1 from the run cache; train and eval differ at every point
    assert sorted(computed(root)) == ["cf"] * 2 + ["eval"] * 4 + ["train"] * 4
    progress = [line for line in lines if line.startswith("[")]
    assert [line.split(":")[0] for line in progress[1::2]] == [f"[{i}/4] {p}" for i, p in enumerate(
        ["train.alpha=0.1 cf.size=1", "train.alpha=0.1 cf.size=2", "train.alpha=0.2 cf.size=1", "train.alpha=0.2 cf.size=2"], 1)]
    assert "(computed train, eval, restored cf); llm hr@10 0.1000 ndcg@10 0.0300 cc 0.2000" in progress[5]
    assert all("artifacts/experiments/grid/" in line for line in progress[1::2])

    found = records(root, "grid")
    assert sorted(found) == ["train.alpha=0.1_cf.size=1", "train.alpha=0.1_cf.size=2", "train.alpha=0.2_cf.size=1", "train.alpha=0.2_cf.size=2"]
    point = found["train.alpha=0.2_cf.size=2"]
    assert point["metrics"]["llm"]["ndcg@10"] == pytest.approx(0.2 / 10 + 2 / 100)
    assert point["params"]["train.alpha"] == 0.2 and point["params"]["cf.size"] == 2 and point["params"]["eval.k"] == 10
    assert point["set"] == point["overrides"] == ["train.alpha=0.2", "cf.size=2"]
    assert point["command"] == "tca run --set train.alpha=0.2 --set cf.size=2"
    assert point["index"] == 3 and point["show"] == "llm" and point["commit"] is None  # not a git repo
    assert set(point["seconds"]) == {"cf", "train", "eval"} and all(s >= 0 for s in point["seconds"].values())
    assert point["keys"]["eval"] == Project(root, ["train.alpha=0.2", "cf.size=2"]).lock()["eval"]["key"]

    lines.clear()
    run_variants(root, "grid", grid(["train.alpha=0.1,0.2", "cf.size=1,2"]), log=lines.append)
    assert computed(root) == []  # every finished point is restored, none recomputed
    assert sum("(finished earlier: restored cf, train, eval)" in line for line in lines) == 4


def test_interrupted_sweep_resumes_where_it_stopped(tmp_path, monkeypatch):
    root = make_project(tmp_path)
    points = grid(["train.alpha=0.1,0.3,0.5"])
    monkeypatch.setenv("TOY_INTERRUPT", "0.3")  # Ctrl-C in the eval stage of the 2nd point
    with pytest.raises(KeyboardInterrupt):
        run_variants(root, "resume", points, log=lambda _: None)
    assert computed(root) == ["cf", "train", "eval", "train"]
    assert list(records(root, "resume")) == ["train.alpha=0.1"]
    monkeypatch.delenv("TOY_INTERRUPT")
    run_variants(root, "resume", points, log=lambda _: None)
    assert computed(root) == ["eval", "train", "eval"]  # 0.1 restored, 0.3's train restored, the rest computed
    assert list(records(root, "resume")) == ["train.alpha=0.1", "train.alpha=0.3", "train.alpha=0.5"]


def test_variants_that_cannot_run_are_reported_and_the_rest_run(tmp_path):
    root = make_project(tmp_path)
    variants = [Variant("typo", ("train.alpah=1",)), Variant("refused", ("train.alpha=-1",)),
                Variant("fine", ("train.alpha=0.4",)), Variant("teacher", ("train.alpha=0.4",), show="cf")]
    lines = []
    outcomes = run_variants(root, "mixed", variants, base=["cf.size=3"], log=lines.append)
    errors = {o.variant.name: o.error for o in outcomes}
    assert errors["typo"] == "--set train.alpah: unknown param; did you mean train.alpha?"
    assert errors["refused"] == "train.alpha must be >= 0"
    assert errors["fine"] is None and errors["teacher"] is None
    assert "not runnable: typo: --set train.alpah: unknown param; did you mean train.alpha?" in lines
    assert "[1/3] refused: not runnable: train.alpha must be >= 0" in lines
    found = records(root, "mixed")
    assert sorted(found) == ["fine", "teacher"]
    assert found["teacher"]["show"] == "cf" and found["fine"]["overrides"] == ["cf.size=3", "train.alpha=0.4"]
    assert found["fine"]["set"] == ["train.alpha=0.4"]
    with pytest.raises(TcaError, match="unknown param"):  # a bad base fails every variant: one error
        run_variants(root, "mixed", variants[2:], base=["cf.sise=3"], log=lines.append)
    with pytest.raises(TcaError, match="share the results file name"):
        run_variants(root, "mixed", [Variant("a/b", ()), Variant("a b", ())], log=lines.append)


EXPERIMENTS = """
experiments:
  demo:
    about: a toy experiment
    set: [cf.size=2]
    variants:
      low: [train.alpha=0.1]
      not yet: [train.alpha=-1]
      teacher: {set: [train.alpha=0.1], show: cf}
    grid:
      - train.alpha=0.3,0.5
"""


def test_cli_sweep_experiment_run_and_report(tmp_path, monkeypatch):
    root = make_project(tmp_path)
    (root / "experiments.yaml").write_text(EXPERIMENTS)
    monkeypatch.chdir(root)
    runner = CliRunner()

    result = runner.invoke(cli.main, ["sweep", "train.alpha=0.1,0.2", "--set", "cf.size=2"])
    assert result.exit_code == 0, result.output
    assert "[1/2] train.alpha=0.1: tca run --set cf.size=2 --set train.alpha=0.1\n" in result.output
    assert re.search(r"^\[2/2\] train\.alpha=0\.2: done in (\d+ s|\d+m \d\ds) \(computed train, eval\); ", result.output, re.M), result.output
    assert sorted(records(root, "sweep")) == ["train.alpha=0.1", "train.alpha=0.2"]

    result = runner.invoke(cli.main, ["experiment"])
    assert result.output.split() == ["demo", "5", "variants", "a", "toy", "experiment"]
    result = runner.invoke(cli.main, ["experiment", "demo", "--set", "eval.k=5"])
    assert result.exit_code == 2
    assert "error: 1 of 5 variant(s) did not run: not yet (train.alpha must be >= 0)" in result.output
    found = records(root, "demo")
    assert sorted(found) == ["low", "teacher", "train.alpha=0.3", "train.alpha=0.5"]
    assert found["low"]["overrides"] == ["cf.size=2", "eval.k=5", "train.alpha=0.1"] and found["low"]["params"]["eval.k"] == 5
    result = runner.invoke(cli.main, ["experiment", "demo", "--only", "low", "--only", "nope"])
    assert result.exit_code == 2 and "--only 'nope': not a variant of `demo`" in result.output
    result = runner.invoke(cli.main, ["experiment", "nope"])
    assert result.exit_code == 2 and "unknown experiment `nope`" in result.output and "demo" in result.output

    result = runner.invoke(cli.main, ["run", "--set", "train.alpha=0.7"])
    assert result.exit_code == 0, result.output
    assert records(root, "runs")["train.alpha=0.7"]["metrics"]["llm"]["cc"] == 0.7

    result = runner.invoke(cli.main, ["report"])
    assert result.exit_code == 0, result.output
    report = (root / "artifacts/report/report.md").read_text()
    assert report.index("## demo") < report.index("## runs") < report.index("## sweep")  # experiments.yaml order first
    assert "Not finished: not yet." in report
    assert "| teacher | CF teacher | " in report
    assert (root / "artifacts/report/demo.png").read_bytes().startswith(b"\x89PNG")
    assert not (root / "artifacts/report/runs.png").exists()  # one row: no plot


def test_selection_on_valid_reports_the_test_numbers_of_the_choice_alone(tmp_path, monkeypatch):
    """Every point on valid, then only the best valid point on test: no other test number exists."""
    root = make_project(tmp_path)
    lines = []
    outcomes = run_selected(root, "pick", grid(["train.alpha=0.1,0.3,0.5"]), "ndcg@10", log=lines.append)
    assert [o.error for o in outcomes] == [None] * 4
    assert computed(root) == ["cf", "train", "eval", "train", "eval", "train", "eval", "eval"]  # the test run trains nothing
    valid = records(root, "pick-valid")
    assert {name: r["metrics"]["split"] for name, r in valid.items()} == {f"train.alpha={a}": "valid" for a in (0.1, 0.3, 0.5)}
    test = records(root, "pick")
    assert list(test) == ["train.alpha=0.3_best_valid_ndcg_10"]  # valid's best; test alone would have picked 0.5
    chosen = test["train.alpha=0.3_best_valid_ndcg_10"]
    assert chosen["metrics"]["split"] == "test" and chosen["params"]["train.alpha"] == 0.3
    assert "pick: chose train.alpha=0.3 (valid ndcg@10 1.0000); its test run:" in lines

    lines.clear()
    run_selected(root, "pick", grid(["train.alpha=0.1,0.3"]), "ndcg@10", dry=True, log=lines.append)
    assert [line.split(":")[0] for line in lines] == ["[1/2] train.alpha=0.1", "[2/2] train.alpha=0.3", "then"]
    assert "--set eval.split=valid" in lines[0]

    (root / "experiments.yaml").write_text("experiments:\n  pick:\n    about: toy selection\n    grid: ['train.alpha=0.1,0.3,0.5']\n"
                                           "    select: ndcg@10\n")
    monkeypatch.chdir(root)
    result = CliRunner().invoke(cli.main, ["report"])
    assert result.exit_code == 0, result.output
    report = (root / "artifacts/report/report.md").read_text()
    assert report.index("## pick-valid") < report.index("## pick\n")
    assert "Not finished" not in report and "here the test numbers of the one with the best valid ndcg@10 alone" in report
    assert (root / "artifacts/report/pick-valid.png").exists() and not (root / "artifacts/report/pick.png").exists()
    with pytest.raises(TcaError, match="select 'mrr' is not one of"):
        (root / "experiments.yaml").write_text("experiments:\n  bad:\n    grid: [train.alpha=0.1]\n    select: mrr\n")
        load_experiments(root / "experiments.yaml")


# The rows of the paper's Table 3, in its order (our names for its Llara, Collm and "+ TCA" rows).
TABLE_3 = ["LightGCN", "SASRec", "BERT4Rec", "AlphaRec", "RLMRec", "TallRec", "TallRec+TCA", "LLaRA", "LLaRA+TCA",
           "CoLLM", "CoLLM+TCA", "MSL", "MSL+TCA"]


@pytest.mark.parametrize("dataset", ["toys", "sports", "office"])
def test_main_with_a_paper_preset_lists_exactly_table_3(dataset, monkeypatch):
    monkeypatch.chdir(REPO)
    result = CliRunner().invoke(cli.main, ["experiment", "main", "--params", f"params/paper-{dataset}.yaml", "--dry"])
    assert result.exit_code == 0, result.output
    rows = [line.split("] ", 1)[1].split(":")[0] for line in result.output.splitlines() if line.startswith("[")]
    assert rows == TABLE_3
    assert all(f"--params params/paper-{dataset}.yaml" in line for line in result.output.splitlines() if line.startswith("["))


def test_repo_experiments_resolve_against_stages_yaml():
    """Every variant of experiments.yaml names known params with well-typed values; the rows
    the paper's tables need are there."""
    experiments = load_experiments(experiment_file(REPO))
    assert list(experiments) == ["main", "sid", "sid_epochs", "ablation", "recipe", "steps", "loss", "alpha", "cf_swap", "cf_size"]
    for exp in experiments.values():
        for variant in exp.variants:
            Project(REPO, [*exp.shared, *variant.overrides])
    main = {v.name: v for v in experiments["main"].variants}
    assert list(main) == TABLE_3
    assert [v.name for v in experiments["sid"].variants] == ["SASRec", "TIGER", "TIGER+TCA", "LETTER", "LETTER+TCA"]
    assert experiments["alpha"].select == "ndcg@10"
    assert main["SASRec"].show == main["BERT4Rec"].show == "cf"
    alphas = [Project(REPO, [*experiments["alpha"].shared, *v.overrides]).params["tca"]["alpha"] for v in experiments["alpha"].variants]
    assert alphas == [0, 0.1, 0.3, 0.5]
    # the CF-only rows ride on LLM runs other rows need: the same resolved params
    def params(exp, name):
        spec = experiments[exp]
        return Project(REPO, [*spec.shared, *next(v for v in spec.variants if v.name == name).overrides]).flat
    assert params("main", "SASRec") == params("main", "TallRec")
    assert params("main", "BERT4Rec") == params("cf_swap", "TCA (BERT4Rec)")
    assert params("main", "MSL+TCA") == params("ablation", "TCA") == params("cf_size", "TCA 100%")
    assert params("sid", "SASRec") == params("sid", "TIGER")
    assert experiments["sid_epochs"].select == "ndcg@10"   # its 12-epoch point is sid's TIGER row on a larger valid subset
    assert params("sid_epochs", "seq2seq.epochs=12") == {**params("sid", "TIGER"), "subset.valid": 1000}
    # the recipe's first point is the default recipe, on the larger valid subset it chooses by
    assert experiments["recipe"].select == "ndcg@10"
    default = {**Project(REPO, []).flat, "subset.valid": 500}
    assert params("recipe", "full lr 1e-4") == {**default, "train.loss": "tca"}
    lora = params("recipe", "LoRA r16 all projections lr 1e-3")
    assert lora["train.finetune"] == "lora" and len(lora["lora.target_modules"]) == 7
    # the loss choice starts from the default student; the hybrid rows train as the default does
    assert experiments["loss"].select == "ndcg@10" and params("loss", "TallRec NTP") == default
    assert params("loss", "MSL+TCA alpha 0.1") == params("alpha", "tca.alpha=0.1") == {**params("main", "MSL+TCA"), "subset.valid": 500}
    for row in ("LLaRA", "CoLLM+TCA"):
        assert {k: params("main", row)[k] for k in ("train.packing", "train.finetune", "train.max_steps")} == \
            {k: default[k] for k in ("train.packing", "train.finetune", "train.max_steps")}
