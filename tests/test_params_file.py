"""`--params FILE`: a YAML file of param overrides, checked like --set, and --set wins over it."""
from pathlib import Path

import pytest
from click.testing import CliRunner

import cli
from pipeline.params import apply_file, flatten
from pipeline.runner import Project
from tca.errors import TcaError

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = {"a": {"n": 1, "x": 0.5, "name": "s", "flag": False, "mods": ["q", "v"]}, "b": {"path": None}}


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


def test_file_values_apply_with_the_types_of_the_defaults(tmp_path):
    tree = apply_file(DEFAULTS, write(tmp_path, "a:\n  n: 3\n  x: 2\n  mods: [k]\nb:\n  path: /x\n"))
    assert tree == {"a": {"n": 3, "x": 2.0, "name": "s", "flag": False, "mods": ["k"]}, "b": {"path": "/x"}}
    assert isinstance(tree["a"]["x"], float) and DEFAULTS["a"]["n"] == 1  # defaults untouched


@pytest.mark.parametrize("text, message", [
    ("a:\n  m: 1\n", "a.m: unknown param"),
    ("a:\n  n: 0.5\n", "expected an integer"),
    ("a:\n  flag: 1\n", "expected true or false"),
    ("a:\n  name: 12\n", "expected a string"),
    ("a:\n  mods: q\n", "expected a list"),
    ("- a\n", "expected a mapping"),
    ("a: [\n", "cannot read"),
])
def test_bad_files_are_named(tmp_path, text, message):
    with pytest.raises(TcaError, match=message) as err:
        apply_file(DEFAULTS, write(tmp_path, text))
    assert "p.yaml" in str(err.value)


def test_extends_applies_the_parent_first(tmp_path):
    (tmp_path / "base.yaml").write_text("a:\n  n: 3\n  name: base\n")
    (tmp_path / "mid.yaml").write_text("extends: base.yaml\na:\n  x: 0.25\n")
    child = write(tmp_path, "extends: [mid.yaml]\na:\n  name: child\n")
    assert apply_file(DEFAULTS, child)["a"] == {"n": 3, "x": 0.25, "name": "child", "flag": False, "mods": ["q", "v"]}


@pytest.mark.parametrize("files, message", [
    ({"p.yaml": "extends: p.yaml\n"}, r"extends p\.yaml: a cycle \(p\.yaml -> p\.yaml\)"),
    ({"p.yaml": "extends: q.yaml\n", "q.yaml": "extends: p.yaml\n"}, r"q\.yaml: extends p\.yaml: a cycle"),
    ({"p.yaml": "extends: gone.yaml\n"}, r"extends gone\.yaml: no such file"),
    ({"p.yaml": "extends: {a: 1}\n"}, r"extends: expected a params file name"),
    ({"p.yaml": "extends: q.yaml\n", "q.yaml": "a:\n  z: 1\n"}, r"q\.yaml: a\.z: unknown param"),
])
def test_bad_extends_are_named(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(TcaError, match=message):
        apply_file(DEFAULTS, tmp_path / "p.yaml")


@pytest.mark.parametrize("dataset, months, domain", [("toys", 48, "games"), ("sports", 48, "sports"), ("office", 0, "office products")])
def test_paper_presets_extend_the_common_part(dataset, months, domain):
    params = Project(REPO, params_file=REPO / "params" / f"paper-{dataset}.yaml").params
    assert params["data"]["max_months"] == months and params["prompt"]["domain"] == domain
    assert params["data"]["source"].startswith("amazon2018:") and params["data"]["min_user_interactions"] == 10
    assert params["train"]["msl_tau"] == 4.5 and params["cf"]["loss"] == "bce" and params["subset"]["test"] == 5000


def test_dry_run_lists_every_stage_with_the_preset_values(tmp_path):
    result = CliRunner().invoke(cli.main, ["run", "--dry", "--params", str(REPO / "params" / "paper-toys.yaml")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    stages = [line.split(":")[0] for line in lines if not line.startswith(" ")]
    assert stages == list(Project(REPO).graph.stages)
    for shown in ("data.max_months = 48", "cf.loss = 'bce'", "train.msl_tau = 4.5", "subset.train = 10000",
                  "llm.base = 'meta-llama/Llama-3.2-3B'", "prompt.domain = 'games'"):
        assert f"    {shown}" in lines


def test_paper_params_apply_and_set_wins(tmp_path):
    project = Project(REPO, ["train.epochs=3"], params_file=REPO / "params" / "paper.yaml")
    assert project.params["subset"]["train"] == 10000 and project.params["llm"]["base"] == "meta-llama/Llama-3.2-3B"
    assert project.params["train"]["epochs"] == 3  # paper.yaml says 10; --set comes last
    assert project.params["cf"]["hidden"] == 64  # keys the file does not list keep their defaults
    assert flatten(project.params).keys() == flatten(Project(REPO).params).keys()


def test_cli_run_and_status_take_params(tmp_path, monkeypatch):
    root = tmp_path / "proj"
    (root / "paramstoy").mkdir(parents=True)
    (root / "paramstoy" / "__init__.py").write_text("")
    (root / "paramstoy" / "a.py").write_text('def run(ctx):\n    (ctx.out / "n.txt").write_text(str(ctx.param("a.n")))\n')
    (root / "stages.yaml").write_text("stages:\n  a: {entry: paramstoy.a, params: [a], outs: [n.txt]}\nparams:\n  a: {n: 1}\n")
    file = write(tmp_path, "a:\n  n: 7\n")
    monkeypatch.chdir(root)
    runner = CliRunner()
    assert runner.invoke(cli.main, ["run", "--params", str(file)]).exit_code == 0
    assert (root / "artifacts/a/n.txt").read_text() == "7"
    assert runner.invoke(cli.main, ["status", "--params", str(file)]).output == "everything is up to date\n"
    assert "param a.n: 7 -> 1" in runner.invoke(cli.main, ["status"]).output
    result = runner.invoke(cli.main, ["run", "--params", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_quick_preset_resolves_and_caps_every_trainer():
    """params/quick.yaml names known params only and bounds each trainer's length (the LLM's steps, the
    CF model's epochs, the SID models' epochs), so a smoke run of any backbone stays short."""
    params = Project(REPO, params_file=REPO / "params" / "quick.yaml").params
    defaults = Project(REPO).params
    assert params["train"]["max_steps"] < defaults["train"]["max_steps"]
    assert params["cf"]["max_epochs"] < defaults["cf"]["max_epochs"]
    assert params["sid"]["epochs"] < defaults["sid"]["epochs"]
    assert params["seq2seq"]["epochs"] < defaults["seq2seq"]["epochs"]
    assert params["seq2seq"]["valid_samples"] < defaults["seq2seq"]["valid_samples"]
