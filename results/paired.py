"""Paired differences of two evaluations on the same samples, from their predictions.parquet files:
HR@10 and NDCG@10 of A minus B (each the LLM's, `--b-model popularity|cf` for B's baselines), with
95% bootstrap intervals over the samples (tca.metrics.bootstrap_interval).

    python results/paired.py A/predictions.parquet B/predictions.parquet [--a-model llm] [--b-model llm]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import polars as pl

from tca.metrics import bootstrap_interval, per_sample_metrics

COLUMNS = {"llm": "rank", "cf": "cf_rank", "popularity": "popularity_rank"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--a-model", default="llm", choices=list(COLUMNS))
    ap.add_argument("--b-model", default="llm", choices=list(COLUMNS))
    args = ap.parse_args()
    a, b = pl.read_parquet(args.a), pl.read_parquet(args.b)
    if a["sample_id"].to_list() != b["sample_id"].to_list():
        raise SystemExit(f"{args.a} and {args.b} hold other samples: a paired comparison needs the same ones")
    per_a = per_sample_metrics(a[COLUMNS[args.a_model]].to_numpy())
    per_b = per_sample_metrics(b[COLUMNS[args.b_model]].to_numpy())
    keys = ("hr@10", "ndcg@10")
    diff = np.stack([per_a[k] - per_b[k] for k in keys])
    for key, d, (lo, hi), va, vb in zip(keys, diff, bootstrap_interval(diff), (per_a[k].mean() for k in keys), (per_b[k].mean() for k in keys)):
        print(f"{key}: {args.a_model} {va:.4f} - {args.b_model} {vb:.4f} = {d.mean():+.4f} [{lo:+.4f}, {hi:+.4f}] over {len(d):,} samples")


if __name__ == "__main__":
    main()
