"""`tca report` from fixture records: the markdown table (best per metric column in bold), the
section order, and real PNG plots (a line plot for a one-param sweep, bars otherwise)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from pipeline.experiments import Experiment
from pipeline.report import Row, table, varying_param, write_report
from pipeline.sweep import Variant
from tca.errors import TcaError

PNG = b"\x89PNG\r\n\x1a\n"


def metrics(hr5, ndcg5, hr10, ndcg10, cc=None):
    values = {"hr@5": hr5, "ndcg@5": ndcg5, "hr@10": hr10, "ndcg@10": ndcg10}
    return values if cc is None else {**values, "cc": cc}


def record(experiment, variant, llm, cf=None, own=(), base=(), show="llm", params=None, seconds=None, index=0):
    return {
        "experiment": experiment, "variant": variant, "index": index, "show": show, "set": list(own),
        "overrides": [*base, *own], "params_file": None, "command": "tca run " + " ".join(f"--set {a}" for a in [*base, *own]),
        "params": {"train.loss": "tca", "tca.alpha": 0.1, **(params or {})},
        "metrics": {"split": "test", "n_samples": 256, "llm": llm, "cf": cf or metrics(0.1, 0.06, 0.17, 0.087),
                    "decode": {"device": "cpu"}},
        "seconds": seconds or {"cf": 61.0, "train": 725.2, "eval": 371.6}, "keys": {}, "commit": "abc123",
        "machine": {"cpu": "Test CPU", "cores": 2, "torch": "2.13.0"}, "finished": f"2026-01-01T00:00:{index:02d}",
    }


MAIN = [
    record("main", "SASRec", metrics(0, 0, 0, 0, 0.02), show="cf", index=0),
    record("main", "TallRec", metrics(0.0234, 0.0150, 0.0469, 0.0226, 0.1), own=["train.loss=ntp"], params={"train.loss": "ntp"}, index=1),
    record("main", "TallRec+TCA", metrics(0.0313, 0.0201, 0.0469, 0.0250, 0.3), own=["train.loss=tca"],
           seconds={"cf": 61.0, "train": 4000.0}, index=2),
]
ALPHA = [record("alpha", f"tca.alpha={a}", metrics(a / 10, a / 20, a / 5, a / 10 - a * a / 10, 0.1 + a / 2), own=[f"tca.alpha={a}"],
                base=["train.backbone=msl"], params={"tca.alpha": a}, index=i) for i, a in enumerate([0.5, 0, 0.1, 0.9])]


def test_table_bolds_the_best_of_each_metric_column():
    expected = "\n".join([
        "| variant | key params | HR@5 | NDCG@5 | HR@10 | NDCG@10 | CC | train time |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        "| SASRec | CF teacher | **0.1000** | **0.0600** | **0.1700** | **0.0870** | – | 1m 01s |",
        "| TallRec | train.loss=ntp | 0.0234 | 0.0150 | 0.0469 | 0.0226 | 0.1000 | 12m 05s |",
        "| TallRec+TCA | train.loss=tca | 0.0313 | 0.0201 | 0.0469 | 0.0250 | **0.3000** | 1h 06m |",
    ])
    assert table([Row(r) for r in MAIN]) == expected
    tied = table([Row(r) for r in MAIN[1:]]).splitlines()
    assert tied[2].split(" | ")[4] == tied[3].split(" | ")[4] == "0.0469"  # equal HR@10 everywhere: nothing bold
    assert "**0.0313**" in tied[3] and "**0.0234**" not in tied[2]


def test_varying_param_finds_the_one_numeric_param():
    assert varying_param([Row(r) for r in ALPHA]) == "tca.alpha"
    assert varying_param([Row(r) for r in MAIN]) is None  # a string param: bars, not a line
    assert varying_param([Row(ALPHA[0])]) is None
    teacher = record("alpha", "teacher", metrics(0, 0, 0, 0), show="cf", params={"tca.alpha": 7.0, "cf.size": 3})
    assert varying_param([Row(r) for r in [teacher, *ALPHA]]) == "tca.alpha"  # the CF row's params do not count
    two = [record("grid", f"{a}-{lr}", metrics(0, 0, 0, 0), params={"tca.alpha": a, "train.lr": lr}) for a, lr in ((0.1, 1e-4), (0.5, 1e-3))]
    assert varying_param([Row(r) for r in two]) is None  # two params vary: no single x axis
    flags = [record("msl", str(on), metrics(0, 0, 0, 0), params={"train.msl": on}) for on in (False, True)]
    assert varying_param([Row(r) for r in flags]) is None  # a bool is not a number to plot along


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def test_report_writes_tables_and_png_plots(tmp_path):
    artifacts = tmp_path / "artifacts"
    for doc in MAIN + ALPHA + [record("runs", "defaults", metrics(0, 0, 0, 0, 0.0))]:
        path = artifacts / "experiments" / doc["experiment"] / f"{doc['variant']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc))
    spec = {"alpha": Experiment("alpha", "Figure 2", ("train.backbone=msl",), []),
            "main": Experiment("main", "Table 3", (), [Variant("SASRec", ()), Variant("TallRec", ()), Variant("LLaRA", ())])}
    out = tmp_path / "report"
    files = write_report(artifacts, out, spec)
    assert files == [out / "report.md", out / "alpha.png", out / "main.png"]
    text = (out / "report.md").read_text()
    assert [line for line in text.splitlines() if line.startswith("## ")] == ["## alpha", "## main", "## runs"]
    alpha = text[text.index("## alpha"): text.index("## main")]
    assert "Figure 2" in alpha and "Every row: `--set train.backbone=msl`" in alpha
    rows = [line.split(" | ")[0] for line in alpha.splitlines() if line.startswith("| tca.alpha")]
    assert rows == ["| tca.alpha=0.5", "| tca.alpha=0", "| tca.alpha=0.1", "| tca.alpha=0.9"]  # run order
    assert "On 256 test samples; commit abc123; Test CPU (2 cores), torch 2.13.0, device cpu." in alpha
    assert "![alpha](alpha.png)" in alpha and "- tca.alpha=0.9: `tca run --set train.backbone=msl --set tca.alpha=0.9`" in alpha
    main = text[text.index("## main"): text.index("## runs")]
    assert "Not finished: LLaRA." in main and "| TallRec+TCA | train.loss=tca | 0.0313 |" in main  # the CF row is best
    for png in files[1:]:
        width, height = png_size(png)
        assert width > 300 and height > 200 and png.stat().st_size > 5000
    assert not (out / "runs.png").exists()


def test_report_without_records_says_what_to_run(tmp_path):
    with pytest.raises(TcaError, match="tca experiment"):
        write_report(tmp_path / "artifacts", tmp_path / "report", {})


def test_paired_differences_against_the_base_row_and_popularity():
    """+TCA against its base row and every LLM row against popularity, from the per-sample ranks the
    records keep: the difference of the means, with a paired interval that brackets it."""
    from pipeline.report import paired_table
    from pipeline.results import decode_ranks

    rng = np.random.default_rng(0)
    base_ranks = rng.integers(0, 40, 3000)
    better = np.where(rng.random(3000) < 0.1, 0, base_ranks)  # +TCA: a tenth of the samples moved to rank 0
    pop = rng.integers(0, 60, 3000)
    enc = lambda r: "".join(str(x) if x < 10 else "-" for x in r)
    ranks = lambda llm, ids="s1": {"sample_ids": ids, "llm": enc(llm), "popularity": enc(pop)}
    rows = [Row(record("main", "TallRec", metrics(0, 0, 0, 0), index=1) | {"ranks": ranks(base_ranks)}),
            Row(record("main", "TallRec+TCA", metrics(0, 0, 0, 0), index=2) | {"ranks": ranks(better)}),
            Row(record("main", "MSL+TCA", metrics(0, 0, 0, 0), index=3) | {"ranks": ranks(better, ids="other")})]
    assert (decode_ranks(enc(base_ranks)) == np.minimum(base_ranks, 10)).all()
    text = paired_table(rows).splitlines()
    assert text[0].startswith("| difference | HR@10")
    line = next(l for l in text if l.startswith("| TallRec+TCA - TallRec |"))
    want = np.mean(better < 10) - np.mean(base_ranks < 10)
    mean, lo, hi = (float(x) for x in line.split(" | ")[1].replace("[", "").replace("]", "").replace(",", "").split())
    assert mean == pytest.approx(want, abs=5e-5) and 0 < lo < mean < hi
    assert any(l.startswith("| TallRec - popularity |") for l in text)
    assert not any(l.startswith("| MSL+TCA - MSL |") for l in text)  # no MSL row: nothing to compare
    assert any(l.startswith("| MSL+TCA - popularity |") for l in text)


def test_valid_runs_of_a_selection_are_compared_with_the_chosen_one():
    """In a selecting experiment's valid runs each other variant is paired against the one with the
    best valid metric (the choice), so the report says whether these samples can tell them apart."""
    from pipeline.report import comparisons, paired_table

    rng = np.random.default_rng(1)
    enc = lambda r: "".join(str(x) if x < 10 else "-" for x in r)
    ranks = {name: rng.integers(0, 30, 500) for name in ("lr 1e-4", "lr 3e-4", "LoRA")}
    rows = [Row(record("recipe-valid", name, metrics(0, 0, 0, ndcg), index=i) | {"ranks": {"sample_ids": "v", "llm": enc(ranks[name])}})
            for i, (name, ndcg) in enumerate([("lr 1e-4", 0.0246), ("lr 3e-4", 0.0216), ("LoRA", 0.0217)])]
    labels = [label for label, *_ in comparisons(rows, "ndcg@10")]
    assert labels == ["lr 3e-4 - lr 1e-4 (chosen)", "LoRA - lr 1e-4 (chosen)"]
    assert [label for label, *_ in comparisons(rows)] == []  # no selection: nothing to pair here
    line = next(l for l in paired_table(rows, "ndcg@10").splitlines() if l.startswith("| LoRA - lr 1e-4 (chosen) |"))
    want = np.mean(ranks["LoRA"] < 10) - np.mean(ranks["lr 1e-4"] < 10)
    assert float(line.split(" | ")[1].split()[0]) == pytest.approx(want, abs=5e-5)
