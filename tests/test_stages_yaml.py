"""The project's own stages.yaml: loads, every stage is wired, its code lists cover what the stages
import, and `tca status` stays cheap."""
import ast
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


def tca_imports(path: Path) -> set[Path]:
    """Files of the `tca` and stage modules that `path` imports anywhere (stage modules import inside `run`)."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + ((node.module,) if node.module else ())) if node.level else node.module
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    files = set()
    for name in names:
        if not (name.startswith("tca.") or name.startswith("pipeline.stages.")):
            continue
        for candidate in (ROOT / f"{name.replace('.', '/')}.py", ROOT / name.replace(".", "/") / "__init__.py"):
            if candidate.exists():
                files.add(candidate)
    return files


def holds_code(path: Path) -> bool:
    """More than a docstring (a package's `__init__.py` may hold only that)."""
    body = ast.parse(path.read_text()).body
    return any(not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)) for node in body)


def test_code_lists_cover_what_each_stage_imports():
    """A change to any `tca` module (or other stage's glue) a stage runs (imported by its entry,
    transitively) makes the stage stale: it is in the stage's `code` list (a file, or a folder above it). Empty `__init__.py` files
    hold no code."""
    project = Project(ROOT)
    for stage in load_graph(ROOT / "stages.yaml").stages.values():
        listed = {f.resolve() for f in project.code_files(stage)}
        seen, todo = set(), [project.code_files(stage)[0]]
        while todo:
            for module in tca_imports(todo.pop()) - seen:
                seen.add(module)
                todo.append(module)
        missing = sorted(str(f.relative_to(ROOT)) for f in seen if f.resolve() not in listed and holds_code(f))
        assert not missing, f"stages.yaml: stage {stage.name} runs {missing} but its code list lacks them"
