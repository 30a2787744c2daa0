"""Time and peak memory of the `data` stage on a synthetic Amazon-2018 file of 5 million reviews.

    python bench/data_prep.py [--reviews 5000000] [--plain]

Writes reviews.json.gz + meta.json.gz in the real 2018 format (Zipf-like users and items, so the
5-core and the history rule keep a realistic share) into a temp dir, then runs the stage in a
fresh subprocess, so that the generator's memory is not counted in the peak.
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

CHUNK = 500_000
TEXTS = ["Great toy, my kids love it.", "Broke after two days. Would not buy again.",
         "Exactly as described; arrived quickly and well packed. " * 3, "Five stars!",
         "It is OK for the price, but the colors are not as vivid as in the pictures and the box was dented."]


def skewed(rng: np.random.Generator, n: int, size: int, power: float) -> np.ndarray:
    """Ids in [0, n) with a heavy head (a few ids get most of the mass), like real review data."""
    return np.floor(n * rng.random(size) ** power).astype(np.int64)


def write_gz_or_plain(path: Path, frames, plain: bool) -> None:
    opener = open if plain else lambda p, mode: gzip.open(p, mode, compresslevel=1)
    with opener(path, "wb") as f:
        for frame in frames:
            buffer = io.BytesIO()
            frame.write_csv(buffer, include_header=False, quote_style="never")
            f.write(buffer.getvalue())


def review_chunks(n: int, n_users: int, n_items: int, rng: np.random.Generator):
    for start in range(0, n, CHUNK):
        size = min(CHUNK, n - start)
        frame = pl.DataFrame({"u": skewed(rng, n_users, size, 2.5), "i": skewed(rng, n_items, size, 2.0),
                              "t": rng.integers(946_684_800, 1_538_352_000, size) // 86400 * 86400,
                              "x": rng.integers(0, len(TEXTS), size), "r": rng.integers(1, 6, size)})
        text = pl.Series(TEXTS)[frame["x"]]
        yield frame.with_columns(text=text).select(pl.concat_str(
            pl.lit('{"overall": '), pl.col("r"), pl.lit('.0, "verified": true, "reviewTime": "01 1, 2015", '
                                                       '"reviewerID": "A'), pl.col("u"),
            pl.lit('X", "asin": "B'), pl.col("i").cast(pl.String).str.zfill(9),
            pl.lit('", "style": {"Color:": " Blue"}, "reviewerName": "Jane", "reviewText": "'), pl.col("text"),
            pl.lit('", "summary": "Review", "unixReviewTime": '), pl.col("t"), pl.lit("}")))


def meta_chunk(n_items: int, rng: np.random.Generator) -> pl.DataFrame:
    """Titles with the usual quirks: entities, missing titles (~2%), a duplicate row per 100 items."""
    ids = np.concatenate([np.arange(n_items), np.arange(0, n_items, 100)])
    frame = pl.DataFrame({"i": ids, "w": rng.integers(0, 50_000, len(ids)), "k": rng.integers(0, 100, len(ids))})
    title = (pl.when(pl.col("k") < 2).then(pl.lit(""))
             .otherwise(pl.concat_str(pl.lit('"title": "Toy &amp; Game '), pl.col("w"), pl.lit(" model "),
                                      pl.col("i"), pl.lit('", '))))
    return frame.select(pl.concat_str(
        pl.lit('{"category": ["Toys &amp; Games"], "description": ["A toy."], '), title,
        pl.lit('"brand": "Acme", "price": "$9.99", "asin": "B'), pl.col("i").cast(pl.String).str.zfill(9),
        pl.lit('"}')))


def measure(source: str) -> None:
    """Run in a fresh process: the stage itself, exactly as `tca run-stage data` runs it."""
    from pipeline.context import StageContext
    from pipeline.stages import data as data_stage
    from tca.data import DataConfig

    with tempfile.TemporaryDirectory() as out:
        ctx = StageContext(name="data", params={"data": {**DataConfig().__dict__, "source": source}},
                           out=Path(out), artifacts=Path(out))
        start = time.perf_counter()
        data_stage.run(ctx)
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"seconds": seconds, "peak_mib": peak}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reviews", type=int, default=5_000_000)
    parser.add_argument("--plain", action="store_true", help="write .json instead of .json.gz")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(args.measure)

    rng = np.random.default_rng(0)
    n_users, n_items = args.reviews // 3, args.reviews // 12
    suffix = ".json" if args.plain else ".json.gz"
    with tempfile.TemporaryDirectory() as tmp:
        reviews, meta = Path(tmp) / f"reviews{suffix}", Path(tmp) / f"meta{suffix}"
        start = time.perf_counter()
        write_gz_or_plain(reviews, review_chunks(args.reviews, n_users, n_items, rng), args.plain)
        write_gz_or_plain(meta, [meta_chunk(n_items, rng)], args.plain)
        print(f"generated {args.reviews:,} reviews ({reviews.stat().st_size / 2**20:,.0f} MiB) and "
              f"{n_items:,} items in {time.perf_counter() - start:.1f} s")
        root = Path(__file__).resolve().parents[1]
        run = subprocess.run([sys.executable, __file__, "--measure", f"amazon2018:{reviews}:{meta}"],
                             cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True)
        if run.returncode:
            sys.exit(run.stderr)
        print(run.stdout.rstrip().rsplit("\n", 1)[0])
        result = json.loads(run.stdout.rstrip().rsplit("\n", 1)[1])
        print(f"data stage: {result['seconds']:.1f} s, peak memory {result['peak_mib']:,.0f} MiB "
              f"({args.reviews / result['seconds']:,.0f} reviews/s)")


if __name__ == "__main__":
    main()
