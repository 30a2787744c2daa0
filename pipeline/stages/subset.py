"""Stage `subset`: the seeded random samples of each split that the LLM trains and is evaluated on."""
from __future__ import annotations

from pathlib import Path

import polars as pl

from pipeline.context import StageContext
from pipeline.stages.data import describe_sample, describe_tables
from tca.config import check_keys
from tca.data import SPLITS, SubsetConfig, draw_all


def check_params(params: dict) -> None:
    check_keys(SubsetConfig, params["subset"], "subset")
    SubsetConfig(**params["subset"])


def run(ctx: StageContext) -> None:
    cfg = SubsetConfig(**ctx.section("subset"))
    splits = {name: pl.read_parquet(ctx.input("data") / f"{name}.parquet") for name in SPLITS}
    for name, subset in draw_all(splits, cfg).items():
        subset.write_parquet(ctx.out / f"{name}.parquet")
        wanted = getattr(cfg, name)
        whole = f" (the whole split: subset.{name}={wanted:,} >= its {splits[name].height:,} samples)" \
            if wanted >= splits[name].height else f" of {splits[name].height:,}"
        ctx.log(f"wrote {name}.parquet: {subset.height:,} samples{whole}")


def inspect(artifact: Path, params: dict) -> str:
    items = pl.read_parquet(artifact.parent / "data" / "items.parquet", columns=["item_id", "title"])
    titles = dict(zip(items["item_id"].to_list(), items["title"].to_list()))
    sample = pl.read_parquet(artifact / "train.parquet", n_rows=1).row(0, named=True)
    return "\n".join([*describe_tables(artifact, list(SPLITS)), "first train sample:", describe_sample(sample, titles)])
