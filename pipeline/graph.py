"""stages.yaml: the stage graph and the default params, validated before anything runs."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from tca.errors import TcaError

from .params import flatten, select


@dataclass(frozen=True)
class Stage:
    name: str
    entry: str  # importable module: pipeline.stages.<name>
    code: tuple[str, ...]  # repo-relative files/folders whose content is the stage's code
    deps: tuple[str, ...]  # upstream stage names
    params: tuple[str, ...]  # declared param keys or sections
    outs: tuple[str, ...]  # paths under artifacts/<name>/
    plugins: tuple[str, ...] = ()  # param keys that may name a module:Class; its source file is stage code

    @property
    def module_path(self) -> str:
        return self.entry.replace(".", "/") + ".py"


@dataclass
class Graph:
    stages: dict[str, Stage]  # in topological order
    defaults: dict
    path: Path

    def upstream(self, name: str) -> list[str]:
        """Every stage `name` depends on, transitively, in topological order."""
        seen: set[str] = set()
        todo = list(self.stages[name].deps)
        while todo:
            dep = todo.pop()
            if dep not in seen:
                seen.add(dep)
                todo.extend(self.stages[dep].deps)
        return [s for s in self.stages if s in seen]

    def downstream(self, name: str) -> list[str]:
        """Every stage that depends on `name`, transitively, in topological order."""
        return [s for s in self.stages if name in self.upstream(s)]

    def check_name(self, name: str) -> Stage:
        if name not in self.stages:
            raise TcaError(f"unknown stage `{name}`; stages: {', '.join(self.stages)}")
        return self.stages[name]


def _as_tuple(raw, field: str, where: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise TcaError(f"{where}: `{field}` must be a list of strings")
    return tuple(raw)


def load_graph(path: Path) -> Graph:
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise TcaError(f"{path}: cannot read the stage graph: {err}") from err
    if not isinstance(doc, dict) or not isinstance(doc.get("stages"), dict):
        raise TcaError(f"{path}: expected a mapping with `stages:` (and `params:`)")
    defaults = doc.get("params") or {}
    stages = {}
    for name, spec in doc["stages"].items():
        where = f"{path}: stage `{name}`"
        if not isinstance(spec, dict) or "entry" not in spec:
            raise TcaError(f"{where}: needs at least `entry:` (its pipeline module)")
        unknown = set(spec) - {"entry", "code", "deps", "params", "outs", "plugins"}
        if unknown:
            raise TcaError(f"{where}: unknown field(s) {sorted(unknown)}; fields: entry, code, deps, params, outs, plugins")
        stages[name] = Stage(
            name=name,
            entry=spec["entry"],
            code=_as_tuple(spec.get("code"), "code", where),
            deps=_as_tuple(spec.get("deps"), "deps", where),
            params=_as_tuple(spec.get("params"), "params", where),
            outs=_as_tuple(spec.get("outs"), "outs", where),
            plugins=_as_tuple(spec.get("plugins"), "plugins", where),
        )
    flat = flatten(defaults)
    for stage in stages.values():
        for dep in stage.deps:
            if dep not in stages:
                raise TcaError(f"{path}: stage `{stage.name}` depends on `{dep}`, which is not a stage; stages: {', '.join(stages)}")
        try:
            select(flat, list(stage.params))
        except TcaError as err:
            raise TcaError(f"{path}: stage `{stage.name}`: {err}") from None
        for key in stage.plugins:
            if key not in flat:
                raise TcaError(f"{path}: stage `{stage.name}` lists plugin param `{key}`, which has no default in `params:`")
    return Graph(stages=_topological(stages, path), defaults=defaults, path=path)


def _topological(stages: dict[str, Stage], path: Path) -> dict[str, Stage]:
    """Kahn's algorithm, keeping the file's order among ready stages; a cycle is named."""
    order: list[str] = []
    remaining = dict(stages)
    while remaining:
        ready = [n for n, s in remaining.items() if all(d in order for d in s.deps)]
        if not ready:
            raise TcaError(f"{path}: the stages {', '.join(_cycle(remaining))} form a cycle; remove one of these deps")
        order.append(ready[0])
        del remaining[ready[0]]
    return {n: stages[n] for n in order}


def _cycle(remaining: dict[str, Stage]) -> list[str]:
    node = next(iter(remaining))
    path: list[str] = []
    while node not in path:
        path.append(node)
        node = next(d for d in remaining[node].deps if d in remaining)
    return path[path.index(node):] + [node]
