"""Named experiments (`experiments.yaml`, next to stages.yaml): each a list of variants.

    experiments:
      ablation:
        about: the paper's Table 5          # one line for `tca experiment` and the report
        set: [train.backbone=msl]           # --set overrides shared by every variant (optional)
        variants:                           # name: its own --set overrides ...
          MSL: [train.loss=ntp]
          SASRec: {set: [cf.model=sasrec], show: cf}   # ... or set + show (cf: the teacher's metrics)
        grid:                               # and/or points of a `tca sweep` grid (optional; in a
          - tca.alpha=0.1,0.3               #   [flow list] quote each axis: its commas split values)
        select: ndcg@10                     # optional: choose one variant on the valid split by this
                                            #   metric and report only its test numbers (sweep.run_selected)

A variant's overrides apply after the shared ones and after `--set` given on the command line;
`--set` applies after the shared ones, so `tca experiment alpha --set train.backbone=tallrec`
runs the alpha grid on TallRec.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from tca.errors import TcaError

from .sweep import Variant, grid

FIELDS = {"about", "set", "variants", "grid", "select"}
SHOWS = ("llm", "cf")
SELECT_METRICS = ("hr@5", "ndcg@5", "hr@10", "ndcg@10")


@dataclass(frozen=True)
class Experiment:
    name: str
    about: str
    shared: tuple[str, ...]
    variants: list[Variant]
    select: str | None = None  # a metric: pick the variant on valid, report its test numbers alone

def _strings(value, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise TcaError(f"{where}: expected a list of KEY=VALUE strings, e.g. [train.loss=ntp]")
    return tuple(value)


def _variant(name, spec, where: str) -> Variant:
    where = f"{where} variant {name!r}"
    if isinstance(spec, dict):
        unknown = set(spec) - {"set", "show"}
        if unknown:
            raise TcaError(f"{where}: unknown field(s) {sorted(unknown)}; a variant has `set` and `show`")
        show = spec.get("show", "llm")
        if show not in SHOWS:
            raise TcaError(f"{where}: show {show!r} is not one of {', '.join(SHOWS)}")
        return Variant(str(name), _strings(spec.get("set"), where), show)
    return Variant(str(name), _strings(spec, where))


def load_experiments(path: Path) -> dict[str, Experiment]:
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise TcaError(f"{path}: cannot read the experiments: {err}") from err
    if not isinstance(doc, dict) or not isinstance(doc.get("experiments"), dict):
        raise TcaError(f"{path}: expected a mapping with `experiments:`")
    found = {}
    for name, spec in doc["experiments"].items():
        where = f"{path}: experiment {name!r}"
        if not isinstance(spec, dict) or not set(spec) <= FIELDS:
            raise TcaError(f"{where}: expected a mapping with fields {sorted(FIELDS)}")
        variants = spec.get("variants") or {}
        if not isinstance(variants, dict):
            raise TcaError(f"{where}: `variants` must map each variant name to its --set overrides")
        listed = [_variant(v, s, where) for v, s in variants.items()]
        axes = _strings(spec.get("grid"), f"{where} grid")
        try:
            listed += grid(axes) if axes else []
        except TcaError as err:
            raise TcaError(f"{where}: {err}") from None
        if not listed:
            raise TcaError(f"{where}: no `variants` and no `grid`")
        select = spec.get("select")
        if select is not None and select not in SELECT_METRICS:
            raise TcaError(f"{where}: select {select!r} is not one of {', '.join(SELECT_METRICS)}")
        found[str(name)] = Experiment(str(name), str(spec.get("about", "")), _strings(spec.get("set"), f"{where} set"), listed, select)
    return found


def experiment_file(root: Path) -> Path:
    return root / "experiments.yaml"
