"""Stage `profiles`: RLMRec's LLM-written user and item profiles, and their embeddings.

Writes profiles.parquet (`kind` user|item, `id`, `text`), users.npy (float32 [U+1, d], row u =
train user u, zeros for users without train samples), items.npy ([N+1, d], row 0 zeros), meta.json.
A user is profiled from its last `profiles.history` train items (train split only: no leak).
Unless cf.model reads profiles (RLMRec), it writes an empty stand-in instead (pipeline/side_inputs.py).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.context import StageContext
from pipeline.side_inputs import cf_reads, skipped, write_stand_in
from tca.config import require_positive
from tca.errors import TcaError


def check_params(params: dict) -> None:
    require_positive(params["profiles"], "profiles")


def user_histories(train: pl.DataFrame, n: int) -> pl.DataFrame:
    """`user_id`, `items`: each train user's last n train items (its latest sample's history + target)."""
    latest = train.sort("timestamp").group_by("user_id").last().sort("user_id")
    items = pl.concat_list(pl.col("history").cast(pl.List(pl.Int64)), pl.col("item_id").cast(pl.Int64)).list.tail(n)
    return latest.select("user_id", items=items)


def stand_in(out: Path, reason: str) -> None:
    """The stand-in: no profiles (the declared schema) and empty tables, in milliseconds."""
    pl.DataFrame(schema={"kind": pl.String, "id": pl.Int32, "text": pl.String}).write_parquet(out / "profiles.parquet")
    write_stand_in(out, reason, ("users.npy", "items.npy"))


def run(ctx: StageContext) -> None:
    if not cf_reads(ctx.params, "profiles"):  # ~15 min of generation on 2 CPU cores that nothing would read
        stand_in(ctx.out, f"cf.model={ctx.param('cf.model')} reads no profiles")
        ctx.log("skipped: cf.model reads no profiles")
        return
    from tca.profiles import generate, item_prompts, load_generator, user_prompts
    from tca.text_embed import embed_texts

    data = ctx.input("data")
    items = pl.read_parquet(data / "items.parquet", columns=["item_id", "title"]).sort("item_id")
    n = items.height
    if n == 0 or items["item_id"][0] != 1 or items["item_id"][-1] != n:
        raise TcaError(f"{data / 'items.parquet'}: item_id must be exactly 1..N; rerun the data stage")
    users = user_histories(pl.read_parquet(data / "train.parquet", columns=["user_id", "history", "item_id", "timestamp"]), ctx.param("profiles.history"))
    titles = items["title"].to_list()
    domain, cfg = ctx.param("prompt.domain"), ctx.section("profiles")
    model, tokenizer = load_generator(ctx.input("model"), ctx.device)
    start = time.perf_counter()
    prompts = item_prompts(titles, domain) + user_prompts([[titles[i - 1] for i in h] for h in users["items"].to_list()], domain)
    with ctx.progress(total=len(prompts), desc="generate", unit="profile") as bar:  # minutes on a CPU: show where it is
        texts = generate(prompts, model, tokenizer, cfg["max_new_tokens"], cfg["batch_size"], ctx.device, bar)
    generated = time.perf_counter() - start
    vectors = embed_texts(texts, model=model, tokenizer=tokenizer, batch_size=cfg["batch_size"], device=ctx.device)
    user_ids = users["user_id"].to_numpy()
    item_table = np.zeros((n + 1, vectors.shape[1]), np.float32)
    item_table[1:] = vectors[:n]
    user_table = np.zeros((int(user_ids.max(initial=0)) + 1, vectors.shape[1]), np.float32)
    user_table[user_ids] = vectors[n:]
    np.save(ctx.out / "items.npy", item_table)
    np.save(ctx.out / "users.npy", user_table)
    pl.DataFrame({"kind": ["item"] * n + ["user"] * len(user_ids), "id": np.concatenate([items["item_id"].to_numpy(), user_ids]).astype(np.int32),
                  "text": texts}).write_parquet(ctx.out / "profiles.parquet")
    meta = {"items": n, "users": len(user_ids), "dim": int(vectors.shape[1]), **cfg,  # no timings: a rerun writes the same bytes
            "note": "written by the model stage's LLM (SmolLM2-135M by default); RLMRec used GPT-3.5"}
    (ctx.out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    ctx.log(f"profiled {n} items and {len(user_ids)} users in {generated:.0f} s (+{time.perf_counter() - start - generated:.0f} s embedding)")


def inspect(artifact: Path, params: dict) -> str:
    if reason := skipped(artifact):
        return f"profiles/: a stand-in, not computed ({reason})"
    meta = json.loads((artifact / "meta.json").read_text())
    frame = pl.read_parquet(artifact / "profiles.parquet")
    lines = ["profiles/: " + ", ".join(f"{k} {v}" for k, v in meta.items())]
    for kind in ("item", "user"):
        part = frame.filter(pl.col("kind") == kind)
        lines.append(f"{kind} profiles: mean {part['text'].str.len_chars().mean():.0f} chars, {(part['text'] == '').sum()} empty")
        lines += [f"  {kind} {row['id']}: {row['text']}" for row in part.head(3).iter_rows(named=True)]
    return "\n".join(lines)
