"""The project's own stages.yaml: loads, every stage is wired, and `tca status` stays cheap."""
import subprocess
import sys
from pathlib import Path

from pipeline.graph import load_graph
from pipeline.params import flatten, select
from pipeline.runner import Project

ROOT = Path(__file__).resolve().parents[1]


def test_graph_is_wired():
    graph = load_graph(ROOT / "stages.yaml")
    project = Project(ROOT)
    for stage in graph.stages.values():
        assert callable(project.module(stage).run), stage.name
        assert project.code_files(stage)[0].name == f"{stage.name}.py"
        assert stage.outs, f"{stage.name} declares no outs"


def test_cf_param_change_reaches_only_downstream():
    graph = load_graph(ROOT / "stages.yaml")
    flat = flatten(graph.defaults)
    touched = [name for name, s in graph.stages.items() if "cf.loss" in select(flat, list(s.params))]
    assert touched == ["cf"]
    assert "data" not in graph.downstream("cf") and "cf_dist" in graph.downstream("cf")
    assert graph.upstream("cf") == ["data", "model", "text_emb", "profiles"]  # the last two: AlphaRec, RLMRec


def test_stage_modules_import_without_torch():
    """`tca status` imports every stage module; torch/transformers would cost seconds."""
    code = (
        "import sys; from pathlib import Path; from pipeline.runner import Project; "
        f"p = Project(Path({str(ROOT)!r})); [p.module(s) for s in p.graph.stages.values()]; "
        "heavy = [m for m in ('torch', 'transformers', 'zarr', 'numba') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
