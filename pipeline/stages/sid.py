"""Stage `sid`: semantic IDs of every item from its title embedding (text_emb), by both tokenizers:
`tiger/` (RQ-VAE) and `letter/` (RQ-VAE + LETTER's regularizers, with the cf stage's item
embeddings). Each folder holds items.parquet (item_id, token_ids: the SID), trie.npz (their
trie) and stats.json (codebook usage, collisions, final losses). Both are cheap (about a minute
on ML-100k), so a tiger or letter run makes both and `trie` picks the one `train.backbone` names;
under any other backbone the stage writes an empty stand-in (meta.json `needed: false`)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.context import StageContext
from pipeline.side_inputs import check_computed, skipped, write_stand_in
from tca.errors import TcaError
from tca.sid import SID_BACKBONES

EMBEDDINGS = "items.npy"  # text_emb's output: [N+1, d], row 0 padding


def check_params(params: dict) -> None:
    from tca.sid.rqvae import SidConfig

    SidConfig.from_params(params["sid"])


def run(ctx: StageContext) -> None:
    from tca.cf import load_checkpoint
    from tca.sid.letter import train_letter
    from tca.sid.rqvae import SidConfig, semantic_ids, sid_targets, train_rqvae, vocab_size
    from tca.collab.trie import build_trie

    cfg = SidConfig.from_params(ctx.section("sid"))
    for name in SID_BACKBONES:
        (ctx.out / name).mkdir()
    if ctx.param("train.backbone") not in SID_BACKBONES:
        write_stand_in(ctx.out, "train.backbone is not tiger or letter: nothing reads semantic IDs", ())
        ctx.log("skipped: no semantic IDs are read under these params")
        return
    check_computed(ctx.input("text_emb"), "the sid stage")
    path = ctx.input("text_emb") / EMBEDDINGS
    emb = np.load(path)
    item_ids = pl.read_parquet(ctx.input("data") / "items.parquet", columns=["item_id"])["item_id"].sort().to_numpy()
    if emb.ndim != 2 or len(emb) != len(item_ids) + 1:
        raise TcaError(f"{path}: shape {emb.shape}, expected [{len(item_ids) + 1}, d] (N items + padding row); rerun text_emb")
    cf = load_checkpoint(ctx.input("cf") / "model.pt", plugin=ctx.param("cf.model"))
    cf_emb = cf.item_embeddings().detach().float().numpy()
    trainers = {"tiger": lambda log: train_rqvae(emb, cfg, log=log), "letter": lambda log: train_letter(emb, cf_emb, cfg, log=log)}
    for name in SID_BACKBONES:
        trained = trainers[name](lambda msg, name=name: ctx.log(f"{name}: {msg}"))
        tokens, stats = semantic_ids(trained.codes, cfg.codebook_size)
        targets = sid_targets(tokens)
        out = ctx.out / name
        build_trie(item_ids, targets).save(out / "trie.npz")
        pl.DataFrame({"item_id": item_ids.astype(np.int32), "token_ids": targets}).write_parquet(out / "items.parquet")
        stats |= {"vocab_size": vocab_size(tokens), "final_losses": {k: v for k, v in trained.history[-1].items() if k != "epoch"},
                  "first_losses": {k: v for k, v in trained.history[0].items() if k != "epoch"}}
        (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        ctx.log(f"{name}: {stats['items']:,} items, codebook usage " + "/".join(f"{u:.0%}" for u in stats["codebook_usage"])
                + f", collision rate {stats['collision_rate']:.1%} (max {stats['max_items_per_prefix']} items share codes), "
                f"recon {stats['first_losses']['recon']:.4f} -> {stats['final_losses']['recon']:.4f}")
    (ctx.out / "meta.json").write_text(json.dumps({"needed": True, "tokenizers": list(SID_BACKBONES)}) + "\n")


def inspect(artifact: Path, params: dict) -> str:
    """Per tokenizer: codebook usage, collisions, losses, and a few items' titles with their SIDs."""
    if reason := skipped(artifact):
        return f"sid/: a stand-in, not computed ({reason})"
    titles = pl.read_parquet(artifact.parent / "data" / "items.parquet", columns=["item_id", "title"])
    lines = []
    for name in SID_BACKBONES:
        stats = json.loads((artifact / name / "stats.json").read_text())
        lines += [f"{name}: {stats['items']:,} items, SID vocabulary {stats['vocab_size']}, codebook usage "
                  + ", ".join(f"{u:.1%}" for u in stats["codebook_usage"]),
                  f"  collision rate {stats['collision_rate']:.2%}, {stats['unique_prefixes']:,} distinct code prefixes, "
                  f"at most {stats['max_items_per_prefix']} items per prefix",
                  "  losses (first -> last epoch): " + ", ".join(f"{k} {stats['first_losses'][k]:.4f} -> {v:.4f}"
                                                                 for k, v in stats["final_losses"].items())]
        items = pl.read_parquet(artifact / name / "items.parquet").join(titles, on="item_id").sort("token_ids").head(5)
        lines += [f"    {row['token_ids']}  {row['title']}" for row in items.iter_rows(named=True)]
    return "\n".join(lines)
