"""Stage `trie`: every item's target ids and their CSR trie: the title's tokens (prompt.target_template
+ EOS) for the LLM backbones, the item's semantic ID from the `sid` stage for tiger and letter. Every
stage below (cf_dist, train, eval) reads only this, whichever the tokens are."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.context import StageContext
from tca.sid import SID_BACKBONES
from tca.collab.trie import Trie, build_trie, target_ids


def inert(params: dict) -> dict[str, str]:
    """tiger / letter: the trie is the sid stage's, so the title template is unread."""
    backbone = params["train"]["backbone"]
    return {"prompt.target_template": f"train.backbone {backbone} decodes semantic IDs, not titles"} if backbone in SID_BACKBONES else {}


def check_params(params: dict) -> None:
    from tca.llm.prompt import PromptConfig

    PromptConfig(**params["prompt"])


def run(ctx: StageContext) -> None:
    backbone = ctx.param("train.backbone")
    if backbone in SID_BACKBONES:
        for name in ("trie.npz", "items.parquet"):
            shutil.copyfile(ctx.input("sid") / backbone / name, ctx.out / name)
        trie = Trie.load(ctx.out / "trie.npz")
    else:
        trie = title_trie(ctx)
    stats = trie.stats()
    ctx.log(
        f"wrote trie.npz, items.parquet ({backbone + ' SIDs' if backbone in SID_BACKBONES else 'title tokens'}): "
        f"{stats['items']:,} items, {stats['nodes']:,} nodes, max depth {stats['max_depth']}, "
        f"root branching {stats['root_branching']:,}, items per leaf {stats['items_per_leaf_mean']:.3f} (max {stats['items_per_leaf_max']})"
    )


def title_trie(ctx: StageContext) -> Trie:
    from transformers import AutoTokenizer  # heavy: imported when the stage runs, not by `tca status`

    items = pl.read_parquet(ctx.input("data") / "items.parquet", columns=["item_id", "title"])
    tokenizer = AutoTokenizer.from_pretrained(ctx.input("model"))
    targets = target_ids(tokenizer, items["title"], ctx.param("prompt.target_template"))
    trie = build_trie(items["item_id"].to_numpy(), targets)
    trie.save(ctx.out / "trie.npz")
    pl.DataFrame({"item_id": items["item_id"], "token_ids": targets}).write_parquet(ctx.out / "items.parquet")
    return trie


def inspect(artifact: Path, params: dict) -> str:
    """Trie statistics, the biggest first-token subtrees, the shortest and the longest target token by token."""
    from transformers import AutoTokenizer

    trie = Trie.load(artifact / "trie.npz")
    items = pl.read_parquet(artifact / "items.parquet").with_columns(n=pl.col("token_ids").list.len()).sort("n", "item_id")
    stats = trie.stats()
    backbone = params["train"]["backbone"]
    if backbone in SID_BACKBONES:  # codes, not words: the sid stage's inspect shows them with titles
        return "\n".join([f"trie/ over {backbone} SIDs (hash {trie.digest()[:12]}); `tca inspect sid` shows codes with titles",
                          *(f"  {key}: {value:,}" if isinstance(value, int) else f"  {key}: {value:.3f}" for key, value in stats.items())])
    tokenizer = AutoTokenizer.from_pretrained(artifact.parent / "model")
    root = trie.child_node[: stats["root_branching"]]  # edges of node 0 come first
    biggest = np.argsort(trie.node_lo[root] - trie.node_hi[root], kind="stable")[:5]
    lines = [f"trie/ (prompt.target_template={params['prompt']['target_template']!r}, hash {trie.digest()[:12]})"]
    lines += [f"  {key}: {value:,}" if isinstance(value, int) else f"  {key}: {value:.3f}" for key, value in stats.items()]
    lines.append(f"  target length: mean {items['n'].mean():.1f}, min {items['n'].min()}, max {items['n'].max()} (incl. EOS)")
    for row in (items.row(0, named=True), items.row(items.height - 1, named=True)):
        pieces = " | ".join(repr(tokenizer.decode([t])) for t in row["token_ids"])
        lines.append(f"  item {row['item_id']} ({row['n']} ids): {pieces}")
    first = ", ".join(f"{tokenizer.decode([trie.child_token[e]])!r} {trie.node_hi[root[e]] - trie.node_lo[root[e]]}" for e in biggest)
    lines.append(f"  most items under a first token: {first}")
    return "\n".join(lines)
