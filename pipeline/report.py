"""`tca report`: every recorded run (artifacts/experiments/) as markdown tables and PNG plots.

One section per experiment (or sweep, or the plain `tca run`s): a table of the variants with
their own overrides, HR/NDCG@5/10, collaborative consistency and training time, the best value
of each metric column in bold; then a plot. A section whose LLM rows differ in exactly one
numeric param (the alpha grid, a teacher's train fraction) gets NDCG@10 and CC against it on two
y-axes; any other section gets a bar chart of HR@10 and NDCG@10 per variant.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from .experiments import Experiment
from .hashing import atomic_write_text
from .results import decode_ranks, duration, load_records, slug
from .sweep import VALID_SUFFIX

METRICS = ("hr@5", "ndcg@5", "hr@10", "ndcg@10", "cc")
HEADERS = ("HR@5", "NDCG@5", "HR@10", "NDCG@10", "CC")


@dataclass
class Row:
    record: dict

    @property
    def name(self) -> str:
        return self.record["variant"]

    @property
    def is_cf(self) -> bool:
        return self.record.get("show") == "cf"

    def value(self, metric: str) -> float | None:
        return self.record["metrics"]["cf" if self.is_cf else "llm"].get(metric)

    @property
    def seconds(self) -> float | None:
        """What training the row's model took: the LLM's train stage, or the CF teacher's."""
        return self.record.get("seconds", {}).get("cf" if self.is_cf else "train")

    @property
    def key_params(self) -> str:
        own = self.record.get("set", [])
        if self.is_cf:
            return "CF teacher" + "".join(f", {a}" for a in own if a.startswith("cf."))
        return ", ".join(own) or "defaults"


def table(rows: list[Row]) -> str:
    """The markdown table; in each metric column every value equal to the best is bold (no bold
    when all are equal)."""
    best = {}
    for metric in METRICS:
        values = [v for v in (row.value(metric) for row in rows) if v is not None]
        if len(set(values)) > 1:
            best[metric] = max(values)
    lines = ["| variant | key params | " + " | ".join(HEADERS) + " | train time |",
             "|---|---|" + "---:|" * len(HEADERS) + "---:|"]
    for row in rows:
        cells = []
        for metric in METRICS:
            value = row.value(metric)
            text = "–" if value is None else f"{value:.4f}"
            cells.append(f"**{text}**" if value is not None and value == best.get(metric) else text)
        lines.append(f"| {row.name} | {row.key_params} | " + " | ".join(cells) + f" | {duration(row.seconds)} |")
    return "\n".join(lines)


TCA_SUFFIX = "+TCA"
PAIRED = ("hr@10", "ndcg@10")


def comparisons(rows: list[Row], select: str | None = None) -> list[tuple[str, str, str, str]]:
    """(label, row, its ranks' model, against row, its ranks' model) pairs the report compares on the
    same samples: each "X+TCA" LLM row against the "X" row, and each LLM row against popularity.
    `select` (the valid runs of an experiment that selects by this metric): each other LLM row against
    the one chosen (the best value; ties: the first), which tells whether the choice was clear."""
    llm = {row.name: row for row in rows if not row.is_cf and row.record.get("ranks")}
    pairs = [(f"{name} - {name[: -len(TCA_SUFFIX)]}", name, "llm", name[: -len(TCA_SUFFIX)], "llm")
             for name in llm if name.endswith(TCA_SUFFIX) and name[: -len(TCA_SUFFIX)] in llm]
    scored = [(row.value(select), -i, name) for i, (name, row) in enumerate(llm.items()) if select and row.value(select) is not None]
    if scored:
        chosen = max(scored)[2]
        pairs += [(f"{name} - {chosen} (chosen)", name, "llm", chosen, "llm") for name in llm if name != chosen]
    pairs += [(f"{name} - popularity", name, "llm", name, "popularity") for name in llm if "popularity" in llm[name].record["ranks"]]
    return pairs


def paired_table(rows: list[Row], select: str | None = None) -> str | None:
    """Differences of HR@10 / NDCG@10 with 95% paired bootstrap intervals over the same samples
    (`comparisons`; `select`: also against the chosen variant)."""
    import numpy as np

    from tca.metrics import bootstrap_interval, per_sample_metrics

    by_name = {row.name: row for row in rows}
    lines = []
    for label, a, model_a, b, model_b in comparisons(rows, select):
        ranks_a, ranks_b = by_name[a].record["ranks"], by_name[b].record["ranks"]
        if ranks_a["sample_ids"] != ranks_b["sample_ids"]:
            lines.append(f"| {label} | other samples: not compared | | |")
            continue
        per_a, per_b = (per_sample_metrics(decode_ranks(r[m])) for r, m in ((ranks_a, model_a), (ranks_b, model_b)))
        diff = np.stack([per_a[k] - per_b[k] for k in PAIRED])
        cells = [f"{d.mean():+.4f} [{lo:+.4f}, {hi:+.4f}]" for d, (lo, hi) in zip(diff, bootstrap_interval(diff))]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {diff.shape[1]:,} |")
    if not lines:
        return None
    return "\n".join(["| difference | HR@10 [95% CI] | NDCG@10 [95% CI] | samples |", "|---|---:|---:|---:|", *lines])


def varying_param(rows: list[Row]) -> str | None:
    """The one numeric param the LLM rows differ in, if there is exactly one (else None)."""
    llm = [row.record["params"] for row in rows if not row.is_cf]
    if len(llm) < 2:
        return None
    keys = set().union(*llm)
    differ = [k for k in sorted(keys) if len({repr(p.get(k)) for p in llm}) > 1]
    if len(differ) != 1:
        return None
    numeric = all(isinstance(p.get(differ[0]), (int, float)) and not isinstance(p.get(differ[0]), bool) for p in llm)
    return differ[0] if numeric else None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png", dpi=120)
    os.replace(tmp, path)


def plot_against(rows: list[Row], key: str, title: str, path: Path) -> None:
    """NDCG@10 (left axis) and CC (right axis) of the LLM rows against the param `key`."""
    plt = _pyplot()
    points = sorted((row.record["params"][key], row.value("ndcg@10"), row.value("cc")) for row in rows if not row.is_cf)
    x, ndcg, cc = zip(*points)
    fig, left = plt.subplots(figsize=(6.4, 4))
    right = left.twinx()
    lines = left.plot(x, ndcg, "o-", color="tab:blue", label="NDCG@10")
    lines += right.plot(x, cc, "s--", color="tab:orange", label="CC")
    left.set_xlabel(key)
    left.set_ylabel("NDCG@10", color="tab:blue")
    right.set_ylabel("collaborative consistency (CC)", color="tab:orange")
    left.legend(lines, [line.get_label() for line in lines], loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    left.set_title(title, pad=26)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_bars(rows: list[Row], title: str, path: Path) -> None:
    """HR@10 and NDCG@10 per variant, side by side; CF teacher rows hatched."""
    import numpy as np

    plt = _pyplot()
    x = np.arange(len(rows))
    width = 0.4
    fig, ax = plt.subplots(figsize=(max(6.4, 0.9 * len(rows) + 2), 4.2))
    groups = []
    for offset, metric, label in ((-width / 2, "hr@10", "HR@10"), (width / 2, "ndcg@10", "NDCG@10")):
        heights = [np.nan if row.value(metric) is None else row.value(metric) for row in rows]
        groups.append(ax.bar(x + offset, heights, width, label=label))
    ax.legend()  # before hatching, so the legend's swatches stay plain
    for bars in groups:
        for bar, row in zip(bars, rows):
            if row.is_cf:
                bar.set_hatch("//")
    ax.set_xticks(x, [row.name for row in rows], rotation=30, ha="right")
    ax.set_ylabel("metric on the eval split")
    ax.set_title(title + (" (hatched: CF teacher alone)" if any(row.is_cf for row in rows) else ""))
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _distinct(values) -> str:
    return ", ".join(dict.fromkeys(str(v) for v in values))


def section(name: str, rows: list[Row], spec: Experiment | None, out: Path) -> tuple[str, Path | None]:
    """The markdown of one experiment and its plot (None for a single row)."""
    parts = [f"## {name}", ""]
    if spec is not None and spec.about:
        parts += [spec.about, ""]
    if spec is not None and spec.select is not None:
        parts += [f"Every variant on the valid split: `{spec.name}{VALID_SUFFIX}`; here the test numbers of the one "
                  f"with the best valid {spec.select} alone." if name == spec.name else
                  f"On the valid split; `{spec.name}` has the test numbers of the variant with the best valid {spec.select}.", ""]
    shared = {" ".join(f"--set {a}" for a in r.record["overrides"][: len(r.record["overrides"]) - len(r.record["set"])]) for r in rows}
    files = {r.record.get("params_file") for r in rows} - {None}
    if any(shared) or files:
        base = " ".join([*(f"--params {f}" for f in sorted(files)), *sorted(s for s in shared if s)])
        parts += [f"Every row: `{base}`", ""]
    parts += [table(rows), ""]
    paired = paired_table(rows, spec.select if spec is not None and spec.select and name != spec.name else None)
    if paired:
        parts += ["Paired differences on the same samples (95% bootstrap intervals over samples; an interval that "
                  "excludes 0 is a difference these samples can tell apart):", "", paired, ""]
    if spec is not None and not (spec.select and name == spec.name):  # a selection's test run has one row
        missing = [v.name for v in spec.variants if v.name not in {row.name for row in rows}]
        if missing:
            parts += [f"Not finished: {', '.join(missing)}.", ""]
    metrics = [row.record["metrics"] for row in rows]
    machines = [row.record.get("machine") or {} for row in rows]
    cpus = _distinct(f"{m.get('cpu')} ({m.get('cores')} cores)" for m in machines)
    parts += [
        f"On {_distinct(m.get('n_samples') for m in metrics)} {_distinct(m.get('split') for m in metrics)} samples; "
        f"commit {_distinct(row.record.get('commit') for row in rows)}; {cpus}, torch {_distinct(m.get('torch') for m in machines)}, "
        f"device {_distinct(m.get('decode', {}).get('device') for m in metrics)}.",
        "",
    ]
    plot = None
    if len(rows) > 1:
        plot = out / f"{slug(name)}.png"
        key = varying_param(rows)
        if key is not None:
            plot_against(rows, key, f"{name}: NDCG@10 and CC against {key}", plot)
        else:
            plot_bars(rows, name, plot)
        parts += [f"![{name}]({plot.name})", ""]
    parts += ["Commands:", "", *(f"- {row.name}: `{row.record['command']}`" for row in rows), ""]
    return "\n".join(parts), plot


def write_report(artifacts: Path, out: Path, experiments: dict[str, Experiment]) -> list[Path]:
    """Write out/report.md and the plots from every record; returns the files written."""
    from tca.errors import TcaError

    records = load_records(artifacts / "experiments")
    if not records:
        raise TcaError(f"no finished runs are recorded in {artifacts / 'experiments'}; run `tca run`, `tca sweep` or `tca experiment` first")
    grouped: dict[str, list[Row]] = {}
    for record in records:
        grouped.setdefault(record["experiment"], []).append(Row(record))
    # an experiment that selects on valid has its valid runs under <name>-valid, shown just before it
    spec_of = {n + VALID_SUFFIX: e for n, e in experiments.items() if e.select} | experiments
    known = [m for n in experiments for m in (n + VALID_SUFFIX, n) if m in grouped and m in spec_of]
    order = known + sorted(n for n in grouped if n not in known)
    out.mkdir(parents=True, exist_ok=True)
    parts = [
        "# Results",
        "",
        f"`tca report`, {time.strftime('%Y-%m-%d %H:%M')}: every run recorded in artifacts/experiments/. LLM metrics on "
        "the eval split; rows marked CF teacher show that CF model's metrics on the same samples. CC (collaborative "
        "consistency) is the share of samples whose top-1 item is the CF teacher's top-1. Best value per metric in bold; "
        "train time is what computing the stage took (a run restored from the run cache keeps its original time).",
        "",
    ]
    written = []
    for name in order:
        spec = spec_of.get(name)
        listed = [v.name for v in spec.variants] if spec else []  # rows in experiments.yaml order, else in run order
        rows = sorted(grouped[name], key=lambda r: (listed.index(r.name) if r.name in listed else len(listed),
                                                    r.record.get("index", 0), r.record.get("finished", "")))
        text, plot = section(name, rows, spec, out)
        parts.append(text)
        written += [plot] if plot else []
    report = out / "report.md"
    atomic_write_text(report, "\n".join(parts))
    return [report, *written]
