"""Stage `text_emb`: one language embedding per item title, from the `model` stage's LLM.

Writes items.npy (float32 [N+1, d], row i = item i, row 0 = zeros for padding) and meta.json;
when nothing downstream reads them (see `needed`), an empty stand-in instead (pipeline/side_inputs.py).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.context import StageContext, lookup
from pipeline.side_inputs import cf_reads, skipped, write_stand_in
from tca.config import require_positive
from tca.errors import TcaError
from tca.sid import SID_BACKBONES


def check_params(params: dict) -> None:
    require_positive(lookup(params, "text_emb"), "text_emb")


def needed(params: dict) -> bool:
    """Whether a downstream stage reads the title embeddings under these params: the one place
    that decides, so no run pays ~1.5 min for vectors nobody reads. The sid stage (TIGER/LETTER,
    `train.backbone: tiger|letter`) adds its condition here."""
    return cf_reads(params, "text_emb") or lookup(params, "train.backbone") in SID_BACKBONES


def run(ctx: StageContext) -> None:
    if not needed(ctx.params):
        write_stand_in(ctx.out, f"cf.model={ctx.param('cf.model')} reads no title embeddings", ("items.npy",))
        ctx.log("skipped: nothing downstream reads title embeddings under these params")
        return
    from tca.text_embed import embed_texts  # torch-backed: not imported by `tca status`

    path = ctx.input("data") / "items.parquet"
    items = pl.read_parquet(path, columns=["item_id", "title"]).sort("item_id")
    n = items.height
    if n == 0 or items["item_id"][0] != 1 or items["item_id"][-1] != n:
        raise TcaError(f"{path}: item_id must be exactly 1..N; rerun the data stage")
    start = time.perf_counter()
    vectors = embed_texts(items["title"].to_list(), ctx.input("model"), batch_size=ctx.param("text_emb.batch_size"), device=ctx.device)
    seconds = time.perf_counter() - start
    table = np.zeros((n + 1, vectors.shape[1]), dtype=np.float32)
    table[1:] = vectors
    np.save(ctx.out / "items.npy", table)
    config = json.loads((ctx.input("model") / "config.json").read_text())
    # no timing in meta.json: a rerun for another reader (tiger -> letter) writes the same bytes, so `cf` stays up to date
    meta = {"n_items": n, "dim": int(vectors.shape[1]), "model": config.get("_name_or_path") or config["architectures"][0],
            "pooling": "mean of the last hidden states over the title tokens, L2-normalized", "text": "title"}
    (ctx.out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    ctx.log(f"wrote items.npy [{n + 1}, {vectors.shape[1]}] in {seconds:.1f} s")


def inspect(artifact: Path, params: dict) -> str:
    """Shape and meta, then the nearest titles (cosine) of the first few items: a sanity check."""
    if reason := skipped(artifact):
        return f"text_emb/: a stand-in, not computed ({reason})"
    meta = json.loads((artifact / "meta.json").read_text())
    table = np.load(artifact / "items.npy")
    titles = pl.read_parquet(artifact.parent / "data" / "items.parquet", columns=["item_id", "title"]).sort("item_id")["title"].to_list()
    lines = [f"text_emb/items.npy: {table.shape[0]} x {table.shape[1]} float32 (row 0 = padding)"]
    lines += [f"  {k}: {v}" for k, v in meta.items()]
    sims = table[1:6] @ table[1:].T
    sims[np.arange(len(sims)), np.arange(len(sims))] = -np.inf  # not the item itself
    for i, row in enumerate(sims):
        near = np.argsort(-row, kind="stable")[:3]
        lines.append(f"  {titles[i]}  ->  " + "; ".join(f"{titles[j]} ({row[j]:.3f})" for j in near))
    return "\n".join(lines)
