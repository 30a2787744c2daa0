"""Stage `trie`: every item's target ids (prompt.target_template + EOS) and their CSR trie."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from pipeline.context import StageContext
from tca.trie import Trie, build_trie, target_ids


def run(ctx: StageContext) -> None:
    from transformers import AutoTokenizer  # heavy: imported when the stage runs, not by `tca status`

    items = pl.read_parquet(ctx.input("data") / "items.parquet", columns=["item_id", "title"])
    tokenizer = AutoTokenizer.from_pretrained(ctx.input("model"))
    targets = target_ids(tokenizer, items["title"], ctx.param("prompt.target_template"))
    trie = build_trie(items["item_id"].to_numpy(), targets)
    trie.save(ctx.out / "trie.npz")
    pl.DataFrame({"item_id": items["item_id"], "token_ids": targets}).write_parquet(ctx.out / "items.parquet")
    stats = trie.stats()
    ctx.log(
        f"wrote trie.npz, items.parquet: {stats['items']:,} items, {stats['nodes']:,} nodes, max depth {stats['max_depth']}, "
        f"root branching {stats['root_branching']:,}, items per leaf {stats['items_per_leaf_mean']:.3f} (max {stats['items_per_leaf_max']})"
    )


def inspect(artifact: Path, params: dict) -> str:
    """Trie statistics, the biggest first-token subtrees, the shortest and the longest target token by token."""
    from transformers import AutoTokenizer

    trie = Trie.load(artifact / "trie.npz")
    items = pl.read_parquet(artifact / "items.parquet").with_columns(n=pl.col("token_ids").list.len()).sort("n", "item_id")
    tokenizer = AutoTokenizer.from_pretrained(artifact.parent / "model")
    stats = trie.stats()
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
