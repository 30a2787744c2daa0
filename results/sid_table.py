"""The rows of `sid` (TIGER, LETTER, each +TCA; part of `main` until issue 19) and SASRec on the same test samples, from the
experiment records and the run cache: on the samples each row was evaluated on, and on the default
256-sample test subset inside them (a larger subset keeps every sample of a smaller one).

    python results/sid_table.py [artifacts]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import polars as pl
import torch

from tca.cf import load_checkpoint
from tca.data import SPLITS, SubsetConfig
from tca.data.subset import draw_all
from tca.evaluate import cf_ranking
from tca.metrics import list_ranks, ranking_metrics

ROWS = ("TIGER", "TIGER+TCA", "LETTER", "LETTER+TCA")
KEYS = ("hr@5", "ndcg@5", "hr@10", "ndcg@10")


def metrics_on(pred: pl.DataFrame, samples: pl.DataFrame) -> dict:
    rows = samples.join(pred, on="sample_id", how="left", maintain_order="left")
    ranked = torch.tensor([(items + [0] * 10)[:10] for items in rows["items"].to_list()])
    return ranking_metrics(list_ranks(ranked, torch.from_numpy(rows["item_id"].to_numpy().astype(np.int64))))


def main(artifacts: Path) -> None:
    default = SubsetConfig(train=1024, valid=128, test=256)  # stages.yaml's subset section
    splits = {s: pl.read_parquet(artifacts / "data" / f"{s}.parquet") for s in SPLITS}
    small = draw_all(splits, default)["test"]
    cf = load_checkpoint(artifacts / "cf" / "model.pt")
    tables = {}
    for row in ROWS:
        record = json.loads((artifacts / "experiments" / "sid" / f"{row}.json").read_text())
        pred = pl.read_parquet(artifacts / ".cache" / "runs" / "eval" / record["keys"]["eval"] / "out" / "predictions.parquet")
        evaluated = splits["test"].filter(pl.col("sample_id").is_in(pred["sample_id"].implode()))
        for name, samples in ((f"{evaluated.height} test samples", evaluated), (f"the default {small.height}", small)):
            table = tables.setdefault(name, {})
            if "SASRec" not in table:
                ranks, _ = cf_ranking(cf, samples["history"], torch.from_numpy(samples["item_id"].to_numpy().astype(np.int64)))
                table["SASRec"] = ranking_metrics(ranks)
            table[row] = metrics_on(pred, samples)
    for name, table in tables.items():
        print(f"\non {name}\n| row        | " + " | ".join(f"{k:<7}" for k in KEYS) + " |")
        print("|------------|" + "|".join("-" * 9 for _ in KEYS) + "|")
        for row, m in table.items():
            print(f"| {row:<10} | " + " | ".join(f"{m[k]:.4f} " for k in KEYS) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("artifacts"))
