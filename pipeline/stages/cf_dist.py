"""Stage `cf_dist`: q_t for every target position of every LLM training sample, into dist.zarr.

Samples are scored in batches of BATCH rows of subset/train.parquet. `--shard i/n` computes a
contiguous range of whole batches, so every shard scores exactly the batches an unsharded run
would, and `merge` appends the shards' stores into arrays identical to that run's."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.context import StageContext
from tca.errors import TcaError
from tca.sid import SID_BACKBONES
from tca.collab.trie import Trie

BATCH = 256  # samples per CF scoring + kernel call; bounds memory with the writer's shard buffers
COLUMNS = ["sample_id", "history", "item_id"]
TOP = 5  # tokens shown per position by inspect


def reads(params: dict) -> dict[str, list[str]]:
    """Of `subset`, the train samples alone: their soft labels are all it writes."""
    return {"subset": ["train.parquet"]}


def check_params(params: dict) -> None:
    from tca.collab.tokenizer import CollabConfig

    from pipeline.stages.data import resolve_exclude_history

    CollabConfig(**{key: params["tca"][key] for key in ("temperature", "top_k", "cf_source")},
                 exclude_history=resolve_exclude_history(params["tca"]["exclude_history"], None, "tca.exclude_history"))


def run(ctx: StageContext) -> None:
    # heavy (torch, numba, zarr): imported when the stage runs, not by `tca status`
    from tca.cf import load_checkpoint
    from tca.collab.tokenizer import CollabConfig, stream_token_dist
    from tca.collab.store import DistWriter

    from pipeline.stages.data import resolve_exclude_history

    exclude = resolve_exclude_history(ctx.param("tca.exclude_history"), ctx.input("data"), "tca.exclude_history")
    cfg = CollabConfig(temperature=ctx.param("tca.temperature"), top_k=ctx.param("tca.top_k"), cf_source=ctx.param("tca.cf_source"),
                       exclude_history=exclude)
    trie = Trie.load(ctx.input("trie") / "trie.npz")
    attrs = {"cf_model": None, "cf_checkpoint_sha256": None, "temperature": cfg.temperature, "top_k": cfg.top_k,
             "cf_source": cfg.cf_source, "exclude_history": cfg.exclude_history, "trie_hash": trie.digest()}  # fmt: skip
    model = None
    if cfg.cf_source == "model":
        checkpoint = ctx.input("cf") / "model.pt"
        model = load_checkpoint(checkpoint, ctx.device, ctx.param("cf.model"))
        with open(checkpoint, "rb") as f:
            attrs |= {"cf_model": model.cfg.model, "cf_checkpoint_sha256": hashlib.file_digest(f, "sha256").hexdigest()}

    path = ctx.input("subset") / "train.parquet"
    scan = pl.scan_parquet(path)
    names = scan.collect_schema().names()
    missing = sorted(set(COLUMNS) - set(names))
    if missing:
        raise TcaError(f"{path}: no column {', '.join(missing)}; rerun the subset stage")
    n_rows = scan.select(pl.len()).collect().item()
    if n_rows == 0:
        raise TcaError(f"{path} has no samples: raise subset.train or rerun the subset stage")
    columns = COLUMNS + ["user_id"] if "user_id" in names else COLUMNS  # graph teachers read their user vectors
    lo, hi = ctx.shard_range(n_rows, BATCH)
    rows = scan.select(columns).slice(lo, hi - lo).collect()  # the subset's rows are small; q_t is what is big
    writer = DistWriter(ctx.out / "dist.zarr", attrs)
    stream = stream_token_dist(trie, rows.iter_slices(BATCH), model, cfg, ctx.device)
    for sample_id, dist in ctx.progress(stream, total=math.ceil(rows.height / BATCH), desc="q_t", unit="batch"):
        writer.append(sample_id, dist)
    report(ctx, writer.close(), "" if ctx.shard is None else f" (rows {lo:,}..{hi:,} of {n_rows:,}: shard {ctx.shard[0]}/{ctx.shard[1]})")


def merge(ctx: StageContext, shards: list[Path]) -> None:
    """The shards' stores, in order, as one dist.zarr."""
    from tca.collab.store import merge_stores

    report(ctx, merge_stores([shard / "dist.zarr" for shard in shards], ctx.out / "dist.zarr"), f" (merged from {len(shards)} shards)")


def report(ctx: StageContext, out: dict, where: str) -> None:
    ctx.log(
        f"wrote dist.zarr{where}: {out['n_samples']:,} samples, {out['n_positions']:,} positions, {out['nnz']:,} entries "
        f"({out['nnz'] / max(out['n_samples'], 1):.0f} per sample); cf_source={out['cf_source']}, tau={out['temperature']}, top_k={out['top_k']}"
        + (f", mass dropped by top_k: mean {out['dropped_mass_mean']:.4f}, max {out['dropped_mass_max']:.4f}" if out["top_k"] else "")
    )


def inspect(artifact: Path, params: dict) -> str:
    """Sizes and settings, then the first sample: at each position, the prefix, its top tokens and the gold one with q_t."""
    from transformers import AutoTokenizer

    from tca.collab.store import DistReader

    reader = DistReader(artifact / "dist.zarr")
    a = reader.attrs
    size = sum(f.stat().st_size for f in (artifact / "dist.zarr").rglob("*") if f.is_file())
    sample = int(reader.sample_id[0])
    gold = pl.read_parquet(artifact.parent / "subset" / "train.parquet", columns=["sample_id", "item_id"]).filter(pl.col("sample_id") == sample)
    targets = pl.read_parquet(artifact.parent / "trie" / "items.parquet").filter(pl.col("item_id") == gold["item_id"][0])
    target = targets["token_ids"][0].to_list()
    if params["train"]["backbone"] in SID_BACKBONES:  # SID codes are shown as their ids
        decode = lambda ids: " ".join(map(str, ids))
    else:
        decode = AutoTokenizer.from_pretrained(artifact.parent / "model").decode
    labels = reader.read(np.array([sample]))
    lines = [
        f"cf_dist/dist.zarr: {a['n_samples']:,} samples, {a['n_positions']:,} positions, {a['nnz']:,} entries "
        f"({a['nnz'] / a['n_samples']:.0f} per sample), {size / 1e6:.1f} MB on disk",
        f"  cf_source={a['cf_source']} (model {a['cf_model']}), tau={a['temperature']}, top_k={a['top_k']}"
        + (f" (mass dropped: mean {a['dropped_mass_mean']:.4f}, max {a['dropped_mass_max']:.4f})" if a["top_k"] else ""),
        f"  trie {a['trie_hash'][:12]}",
        f"sample {sample}, gold item {gold['item_id'][0]}: {decode(target)!r} (* = gold token)",
    ]
    for t, count in enumerate(labels.count[0].tolist()):
        tokens, probs = labels.token[0, t, :count], labels.prob[0, t, :count]
        order = probs.argsort(descending=True, stable=True)
        gold_rank = int((tokens[order] == target[t]).nonzero()[0, 0])
        shown = [f"{decode([v])!r}{'*' if r == gold_rank else ''} {probs[i]:.3f}" for r, (i, v) in enumerate(zip(order[:TOP].tolist(), tokens[order[:TOP]].tolist()))]
        if gold_rank >= TOP:
            shown.append(f"... {decode([target[t]])!r}* {probs[order[gold_rank]]:.3f} (rank {gold_rank + 1})")
        lines.append(f"  {decode(target[:t])!r:<40} -> {'  '.join(shown)}  ({count} {'child' if count == 1 else 'children'})")
    return "\n".join(lines)
