"""Stage `cf_dist`: q_t for every target position of every LLM training sample, into dist.zarr."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from pipeline.context import StageContext
from tca.errors import TcaError
from tca.trie import Trie

BATCH = 256  # samples per CF scoring + kernel call; bounds memory with the writer's shard buffers
COLUMNS = ["sample_id", "history", "item_id"]
TOP = 5  # tokens shown per position by inspect


def run(ctx: StageContext) -> None:
    # heavy (torch, numba, zarr): imported when the stage runs, not by `tca status`
    from tca.cf import load_checkpoint
    from tca.collab import CollabConfig, stream_token_dist
    from tca.collab_store import DistWriter

    cfg = CollabConfig(temperature=ctx.param("tca.temperature"), top_k=ctx.param("tca.top_k"), cf_source=ctx.param("tca.cf_source"))
    trie = Trie.load(ctx.input("trie") / "trie.npz")
    attrs = {"cf_model": None, "cf_checkpoint_sha256": None, "temperature": cfg.temperature, "top_k": cfg.top_k,
             "cf_source": cfg.cf_source, "trie_hash": trie.digest()}  # fmt: skip
    model = None
    if cfg.cf_source == "model":
        checkpoint = ctx.input("cf") / "model.pt"
        model = load_checkpoint(checkpoint, ctx.device)
        with open(checkpoint, "rb") as f:
            attrs |= {"cf_model": model.cfg.model, "cf_checkpoint_sha256": hashlib.file_digest(f, "sha256").hexdigest()}

    path = ctx.input("subset") / "train.parquet"
    table = pq.ParquetFile(path)
    missing = sorted(set(COLUMNS) - set(table.schema_arrow.names))
    if missing:
        raise TcaError(f"{path}: no column {', '.join(missing)}; rerun the subset stage")
    if table.metadata.num_rows == 0:
        raise TcaError(f"{path} has no samples: raise subset.train or rerun the subset stage")
    with_user = COLUMNS + ["user_id"] if "user_id" in table.schema_arrow.names else COLUMNS  # graph teachers read their user vectors
    batches = (pl.from_arrow(b) for b in table.iter_batches(BATCH, columns=with_user))
    writer = DistWriter(ctx.out / "dist.zarr", attrs)
    stream = stream_token_dist(trie, batches, model, cfg, ctx.device)
    for sample_id, dist in ctx.progress(stream, total=math.ceil(table.metadata.num_rows / BATCH), desc="q_t", unit="batch"):
        writer.append(sample_id, dist)
    out = writer.close()
    ctx.log(
        f"wrote dist.zarr: {out['n_samples']:,} samples, {out['n_positions']:,} positions, {out['nnz']:,} entries "
        f"({out['nnz'] / out['n_samples']:.0f} per sample); cf_source={cfg.cf_source}, tau={cfg.temperature}, top_k={cfg.top_k}"
        + (f", mass dropped by top_k: mean {out['dropped_mass_mean']:.4f}, max {out['dropped_mass_max']:.4f}" if cfg.top_k else "")
    )


def inspect(artifact: Path, params: dict) -> str:
    """Sizes and settings, then the first sample: at each position, the prefix, its top tokens and the gold one with q_t."""
    from transformers import AutoTokenizer

    from tca.collab_store import DistReader

    reader = DistReader(artifact / "dist.zarr")
    a = reader.attrs
    size = sum(f.stat().st_size for f in (artifact / "dist.zarr").rglob("*") if f.is_file())
    sample = int(reader.sample_id[0])
    gold = pl.read_parquet(artifact.parent / "subset" / "train.parquet", columns=["sample_id", "item_id"]).filter(pl.col("sample_id") == sample)
    targets = pl.read_parquet(artifact.parent / "trie" / "items.parquet").filter(pl.col("item_id") == gold["item_id"][0])
    target = targets["token_ids"][0].to_list()
    tokenizer = AutoTokenizer.from_pretrained(artifact.parent / "model")
    labels = reader.read(np.array([sample]))
    lines = [
        f"cf_dist/dist.zarr: {a['n_samples']:,} samples, {a['n_positions']:,} positions, {a['nnz']:,} entries "
        f"({a['nnz'] / a['n_samples']:.0f} per sample), {size / 1e6:.1f} MB on disk",
        f"  cf_source={a['cf_source']} (model {a['cf_model']}), tau={a['temperature']}, top_k={a['top_k']}"
        + (f" (mass dropped: mean {a['dropped_mass_mean']:.4f}, max {a['dropped_mass_max']:.4f})" if a["top_k"] else ""),
        f"  trie {a['trie_hash'][:12]}",
        f"sample {sample}, gold item {gold['item_id'][0]}: {tokenizer.decode(target)!r} (* = gold token)",
    ]
    for t, count in enumerate(labels.count[0].tolist()):
        tokens, probs = labels.token[0, t, :count], labels.prob[0, t, :count]
        order = probs.argsort(descending=True, stable=True)
        gold_rank = int((tokens[order] == target[t]).nonzero()[0, 0])
        shown = [f"{tokenizer.decode([v])!r}{'*' if r == gold_rank else ''} {probs[i]:.3f}" for r, (i, v) in enumerate(zip(order[:TOP].tolist(), tokens[order[:TOP]].tolist()))]
        if gold_rank >= TOP:
            shown.append(f"... {tokenizer.decode([target[t]])!r}* {probs[order[gold_rank]]:.3f} (rank {gold_rank + 1})")
        lines.append(f"  {tokenizer.decode(target[:t])!r:<40} -> {'  '.join(shown)}  ({count} {'child' if count == 1 else 'children'})")
    return "\n".join(lines)
