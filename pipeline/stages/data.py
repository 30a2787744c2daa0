"""Stage `data`: the raw source named by `data.source` -> items, train/valid/test samples, stats."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from pipeline.context import StageContext, lookup
from tca.data import SPLITS, DataConfig, parse, prepare
from tca.config import check_keys
from tca.data.process import STEPS


def external_deps(params: dict) -> list[Path]:
    """The raw files the source resolves to (their content is part of the stage's fingerprint)."""
    return [path.resolve() for path in parse(lookup(params, "data.source")).files]


def check_params(params: dict) -> None:
    """The `data:` section as its typed config, and the form of data.source."""
    check_keys(DataConfig, params["data"], "data")
    parse(DataConfig(**params["data"]).source)


def run(ctx: StageContext) -> None:
    cfg = DataConfig(**ctx.section("data"))
    with ctx.progress(total=len(STEPS), desc=cfg.source, unit="step") as bar:
        dataset = prepare(cfg, on_step=lambda step: (bar.set_postfix_str(f"{step} done"), bar.update()))
    dataset.items.write_parquet(ctx.out / "items.parquet")
    for name, frame in dataset.splits.items():
        frame.write_parquet(ctx.out / f"{name}.parquet")
    (ctx.out / "stats.json").write_text(json.dumps(dataset.stats, indent=2) + "\n")
    s = dataset.stats
    ctx.log(f"{s['users']:,} users, {s['items']:,} items, {s['interactions']:,} interactions "
            f"(density {s['density']:.3%})")
    ctx.log("samples: " + ", ".join(f"{name} {n:,}" for name, n in s["samples"].items()))
    ctx.log("repeats (target already in its history): " + ", ".join(f"{name} {r:.2%}" for name, r in s["repeat_rate"].items()))
    if s["bad_lines_skipped"]:
        ctx.log(f"skipped {s['bad_lines_skipped']:,} bad lines (data.on_bad_line=skip)")
    ctx.log("wrote items.parquet, " + ", ".join(f"{name}.parquet" for name in SPLITS) + ", stats.json")


REPEATS_NEGLIGIBLE = 0.01  # `auto` excludes history items when fewer train targets than this repeat one


def resolve_exclude_history(value, data_dir: Path | None, key: str) -> bool:
    """`auto` -> on when the train split has (next to) no repeats: fewer than `REPEATS_NEGLIGIBLE` of its
    samples have their target in their history (data/stats.json's repeat_rate, recomputed from
    train.parquet). MovieLens-100k has 0.06%: a user rates a movie once, the few repeats are titles the
    data stage merged. Else as given. Without `data_dir` (checking params before anything runs) only the
    value is checked and `auto` reads as off."""
    from tca.errors import TcaError

    value = {"true": True, "false": False}.get(value, value) if isinstance(value, str) else value  # --set gives text
    if isinstance(value, bool):
        return value
    if value != "auto":
        raise TcaError(f"{key}: {value!r} must be auto, true or false")
    if data_dir is None:
        return False
    from tca.data.process import repeat_rate

    return repeat_rate(pl.read_parquet(data_dir / "train.parquet", columns=["history", "item_id"])) < REPEATS_NEGLIGIBLE


def describe_sample(sample: dict, titles: dict[int, str]) -> str:
    """One sample as the LLM will see it: the history titles, oldest first, then the target title."""
    when = datetime.fromtimestamp(sample["timestamp"], timezone.utc).strftime("%Y-%m-%d %H:%M")
    history = "\n".join(f"    {k + 1:>2}. {titles[i]}" for k, i in enumerate(sample["history"]))
    return (f"sample {sample['sample_id']} (user {sample['user_id']}, {when} UTC)\n  history:\n{history}\n"
            f"  target: {titles[sample['item_id']]}")


def describe_tables(artifact: Path, names: list[str]) -> list[str]:
    """Row count and schema of each parquet file."""
    lines = []
    for name in names:
        path = artifact / f"{name}.parquet"
        schema = pl.read_parquet_schema(path)
        rows = pl.scan_parquet(path).select(pl.len()).collect().item()
        lines.append(f"{name}.parquet: {rows:,} rows; " + ", ".join(f"{c} {t}" for c, t in schema.items()))
    return lines


def inspect(artifact: Path, params: dict) -> str:
    stats = json.loads((artifact / "stats.json").read_text())
    items = pl.read_parquet(artifact / "items.parquet")
    titles = dict(zip(items["item_id"].to_list(), items["title"].to_list()))
    sample = pl.read_parquet(artifact / "test.parquet", n_rows=1).row(0, named=True)
    merged = items.filter(pl.col("raw_ids").list.len() > 1).height
    return "\n".join([
        f"source {stats['source']}: {stats['users']:,} users, {stats['items']:,} items, "
        f"{stats['interactions']:,} interactions (density {stats['density']:.3%}); "
        f"{stats['raw_interactions']:,} raw interactions, {stats['bad_lines_skipped']:,} bad lines skipped",
        f"{merged:,} items merge several source ids sharing a title",
        *describe_tables(artifact, ["items", *SPLITS]),
        "first test sample:",
        describe_sample(sample, titles),
    ])
