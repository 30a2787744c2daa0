"""Running a list of variants (a `tca sweep` grid or a named experiment) through the runner.

Each variant is a set of `--set` overrides; all run in the one `artifacts/` folder, so a point
reuses what it shares with the previous one (up to date) or with any earlier run (restored from
the run cache), and computes only the rest. That is also what makes a sweep resumable: after an
interruption, rerunning it restores every finished point instead of recomputing it, and an
interrupted train stage resumes from its checkpoint. After each point its record is written
(pipeline/results.py).
"""
from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

from tca.errors import TcaError

from . import results
from .runner import Project


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...]  # its own --set assignments
    show: str = "llm"  # llm | cf: which model's metrics its report row shows (cf: the teacher's, same samples)


def split_values(text: str) -> list[str]:
    """`0.1,0.3` -> ['0.1', '0.3']; commas inside [...] or {...} belong to one value (a YAML list)."""
    values, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char in "[{") - (char in "]}")
        if char == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    values.append(text[start:])
    return [v.strip() for v in values]


def grid(assignments: list[str] | tuple[str, ...]) -> list[Variant]:
    """`["a=1,2", "b=x,y"]` -> the 4 variants a=1 b=x, a=1 b=y, a=2 b=x, a=2 b=y (first key outermost)."""
    axes: dict[str, list[str]] = {}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        key = key.strip()
        if not sep or not key:
            raise TcaError(f"sweep {assignment!r}: expected KEY=V1,V2,..., e.g. tca.alpha=0.1,0.3")
        if key in axes:
            raise TcaError(f"sweep {key}: given twice; list all its values once, comma-separated")
        values = split_values(text)
        if "" in values:
            raise TcaError(f"sweep {assignment!r}: an empty value; separate values with single commas")
        axes[key] = values
    if not axes:
        raise TcaError("sweep: give at least one KEY=V1,V2,...")
    points = itertools.product(*([f"{key}={value}" for value in values] for key, values in axes.items()))
    return [Variant(" ".join(point), tuple(point)) for point in points]


@dataclass
class Outcome:
    variant: Variant
    record: Path | None = None
    error: str | None = None


def run_variants(root: Path, experiment: str, variants: list[Variant], base: list[str] | tuple[str, ...] = (),
                 params_file: Path | None = None, device: str = "auto", dry: bool = False, log=print) -> list[Outcome]:
    """Run every variant (`base` overrides first, then its own), recording each finished one.

    Variants whose params do not validate (unknown key, wrong type) are reported before anything
    runs; one that a stage refuses (a TcaError, e.g. a backbone that is not implemented) is
    reported and the next one runs. Returns one outcome per variant, in order.
    """
    names = [results.slug(v.name) for v in variants]
    clash = next((v.name for v, n in zip(variants, names) if names.count(n) > 1), None)
    if clash is not None:
        raise TcaError(f"{experiment}: two variants share the results file name of {clash!r}; rename one")
    Project(root, base, device, params_file)  # a bad base fails every variant: say it once
    outcomes = [Outcome(v) for v in variants]
    for outcome in outcomes:
        try:
            Project(root, [*base, *outcome.variant.overrides], device, params_file)
        except TcaError as err:
            outcome.error = str(err).splitlines()[0]
            log(f"not runnable: {outcome.variant.name}: {outcome.error}")
    runnable = [o for o in outcomes if o.error is None]
    if not runnable:
        raise TcaError(f"{experiment}: no variant is runnable (see above)")
    for i, outcome in enumerate(runnable, 1):
        variant = outcome.variant
        overrides = [*base, *variant.overrides]
        head = f"[{i}/{len(runnable)}] {variant.name}"
        log(f"{head}: {results.run_command(params_file, overrides)}")
        if dry:
            continue
        start = time.perf_counter()
        project = Project(root, overrides, device, params_file)
        try:
            ran = project.run(None, log=lambda line: log(f"    {line}"))
        except TcaError as err:
            outcome.error = str(err).splitlines()[0]
            log(f"{head}: not runnable: {err}")
            continue
        outcome.record, doc = results.record(project, experiment, variant.name, list(variant.overrides), overrides,
                                        params_file, variant.show, index=variants.index(variant))
        computed = [name for name in ran if name not in project.restored]
        restored = ", ".join(project.restored)
        if computed:
            what = f"computed {', '.join(computed)}" + (f", restored {restored}" if restored else "")
        else:
            what = "finished earlier: " + (f"restored {restored}" if restored else "up to date")
        shown = doc["metrics"][variant.show]
        scores = " ".join(f"{k} {shown[k]:.4f}" for k in ("hr@10", "ndcg@10", "cc") if k in shown)
        took = results.duration(time.perf_counter() - start)
        log(f"{head}: done in {took} ({what}); {variant.show} {scores} -> {outcome.record.relative_to(project.root)}")
    return outcomes


VALID_SUFFIX = "-valid"  # the records of a selecting experiment's valid runs: artifacts/experiments/<name>-valid/


def run_selected(root: Path, experiment: str, variants: list[Variant], metric: str, base: list[str] | tuple[str, ...] = (),
                 params_file: Path | None = None, device: str = "auto", dry: bool = False, log=print) -> list[Outcome]:
    """Choose one variant on the valid split and report the test numbers of that choice alone.

    Every variant runs with `eval.split=valid` (recorded under `<experiment>-valid`); the one with the
    best valid `metric` (ties: the first listed) runs again with `eval.split=test` (recorded under
    `<experiment>`). The test run shares every stage but eval with its valid run. No test number of
    another variant is computed, so nothing is chosen by looking at test numbers.
    """
    on_valid = [Variant(v.name, (*v.overrides, "eval.split=valid"), v.show) for v in variants]
    outcomes = run_variants(root, experiment + VALID_SUFFIX, on_valid, base, params_file, device, dry, log)
    if dry:
        log(f"then: the variant with the best valid {metric} again with eval.split=test, recorded under {experiment}")
        return outcomes
    scored = [(json.loads(o.record.read_text())["metrics"][o.variant.show][metric], -i)
              for i, o in enumerate(outcomes) if o.record is not None]
    if not scored:
        raise TcaError(f"{experiment}: no variant finished on the valid split; nothing to choose from")
    value, first = max(scored)
    chosen = variants[-first]
    log(f"{experiment}: chose {chosen.name} (valid {metric} {value:.4f}); its test run:")
    final = Variant(f"{chosen.name} (best valid {metric})", (*chosen.overrides, "eval.split=test"), chosen.show)
    return outcomes + run_variants(root, experiment, [final], base, params_file, device, dry, log)
