"""Stage `eval`: trie-constrained beam search of the trained LLM on the test (or valid) subset;
writes predictions.parquet (ranked item ids and scores per sample) and metrics.json (the LLM's
and the CF model's metrics on the same samples, collaborative consistency, decode throughput).

`--shard i/n` decodes a contiguous range of the samples; `merge` concatenates the shards' ranked
lists and scores them as one run does (`tca.llm.evaluate.score_lists`), so the metrics are the same."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.context import StageContext
from pipeline.stages.train import SID_RECORD

SPLITS = ("valid", "test")
SHOWN = 3  # samples `tca inspect eval` prints


def load_recommender(artifacts: Path, params: dict, device: str, cf=None):
    """(model with the trained adapter merged in, in `eval.precision`, prompt builder, trie, titles indexed
    by item id, hybrid prompt or None) from the artifacts of upstream stages. An adapter of a hybrid backbone
    (LLaRA, CoLLM: `adapter/hybrid.json`) gets its CF slots filled by `cf` (default: the cf stage's)."""
    from pipeline.stages.train import load_builder, read_format
    from tca.cf.registry import load_checkpoint
    from tca.llm.hybrid_prompt import RECORD, HybridPrompt
    from tca.llm.model import load_model, use_bf16
    from tca.collab.trie import Trie

    adapter = artifacts / "train" / "adapter"  # none (the base model) when train has not run
    fmt = read_format(adapter) if adapter.is_dir() else {"packing": "none", "finetune": "lora"}
    hybrid = None
    if (adapter / RECORD).exists():
        hybrid = HybridPrompt.load(adapter, cf if cf is not None else load_checkpoint(artifacts / "cf" / "model.pt", device, params["cf"]["model"]))
    bf16 = use_bf16(device, eval_config(params, artifacts / "data")[0].precision, "eval.precision")
    attention = params["llm"]["attn_implementation"]
    if fmt["finetune"] == "full":  # the adapter dir holds the whole fine-tuned model (and a hybrid's projector)
        model = load_model(adapter, device=device, bf16=bf16, attention=attention, cf_dim=None if hybrid is None else hybrid.cf_dim)
    else:
        model = load_model(artifacts / "model", adapter if adapter.is_dir() else None, device, merge=True, bf16=bf16,
                           cf_dim=None if hybrid is None else hybrid.cf_dim, attention=attention)
    builder, _, _ = load_builder(artifacts, params, fmt["packing"], () if hybrid is None else hybrid.slots)
    titles = builder.titles  # item ids are 1..N; 0 is padding
    return model, builder, Trie.load(artifacts / "trie" / "trie.npz"), titles, hybrid


def eval_config(params: dict, data_dir: Path | None):
    """The EvalConfig and the split of the `eval:` section (`exclude_history: auto` resolved by the data's
    repeat rate); a renormalized search uses the temperature the model was trained with (MSL's train.msl_tau)."""
    from dataclasses import replace

    from pipeline.stages.data import resolve_exclude_history
    from tca.errors import TcaError
    from tca.llm.evaluate import EvalConfig
    from tca.llm.train import TrainConfig

    section = dict(params["eval"])
    split = section.pop("split", "test")
    if split not in SPLITS:
        raise TcaError(f"eval.split: {split!r} is not a subset split; use one of {', '.join(SPLITS)}")
    section["exclude_history"] = resolve_exclude_history(section.get("exclude_history", False), data_dir, "eval.exclude_history")
    cfg = EvalConfig.from_params(section)
    return replace(cfg, tau=TrainConfig.from_params(params["train"], params["tca"]["alpha"]).loss_config.decode_tau), split


def popularity_counts(data_dir: Path):
    """Interactions per item id among the train split's targets [N+1]: the most-popular baseline's scores."""
    import polars as pl
    import torch

    n_items = pl.scan_parquet(data_dir / "items.parquet").select(pl.col("item_id").max()).collect().item()
    targets = pl.read_parquet(data_dir / "train.parquet", columns=["item_id"])["item_id"].to_numpy().astype("int64")
    return torch.bincount(torch.from_numpy(targets), minlength=n_items + 1)


def reads(params: dict) -> dict[str, list[str]]:
    """Of `subset`, the split it decodes: a new subset of the other split keeps this one's predictions."""
    return {"subset": [f"{params['eval'].get('split', 'test')}.parquet"]}


def inert(params: dict) -> dict[str, str]:
    """tiger / letter decode SIDs with their T5: the LLM's prompt and attention are unread."""
    from tca.sid import SID_BACKBONES

    backbone = params["train"]["backbone"]
    if backbone not in SID_BACKBONES:
        return {}
    return {name: f"train.backbone {backbone} decodes semantic IDs with its T5, not the LLM" for name in ("prompt", "llm.attn_implementation")}


def check_params(params: dict) -> None:
    from tca.llm.prompt import PromptConfig

    eval_config(params, None)
    PromptConfig(**params["prompt"])


def run(ctx: StageContext) -> None:
    from tca.cf.registry import load_checkpoint
    from tca.llm.evaluate import evaluate

    cfg, split = eval_config(ctx.params, ctx.input("data"))
    samples = read_samples(ctx, split)
    lo, hi = ctx.shard_range(samples.height)
    samples = samples[lo:hi]
    cf = load_checkpoint(ctx.input("cf") / "model.pt", ctx.device, ctx.param("cf.model"))
    adapter = ctx.input("train") / "adapter"
    shard = '' if ctx.shard is None else f' ({lo:,}..{hi:,}: shard {ctx.shard[0]}/{ctx.shard[1]})'
    if (adapter / SID_RECORD).exists():
        write(ctx, evaluate_sid(ctx, samples, cfg, cf, split, shard), split)
        return
    model, builder, trie, _, hybrid = load_recommender(ctx.artifacts, ctx.params, ctx.device, cf)
    ctx.log(f"{samples.height:,} {split} samples{shard}, {next(model.parameters()).dtype}, "
            f"{cfg.num_beams} beams, {'adapter ' + str(adapter) if adapter.is_dir() else 'no adapter: the base model'}"
            f"{'' if hybrid is None else ' (' + hybrid.backbone + ' prompts)'}, device {ctx.device}")
    with ctx.progress(total=samples.height, desc=f"beam search ({split})", unit="sample") as bar:
        result = evaluate(model, builder, trie, samples, cfg, cf, bar, hybrid, popularity_counts(ctx.input("data")))
    write(ctx, result, split)


def evaluate_sid(ctx: StageContext, samples, cfg, cf, split: str, shard: str):
    """tiger / letter: the T5 of the train stage, beam search over the SID trie, the same metrics (under "llm")."""
    import time

    from tca.llm.evaluate import score_lists
    from tca.sid.seq2seq import recommend_sids

    model, items, trie, record = load_sid_recommender(ctx.artifacts, ctx.device)
    ctx.log(f"{samples.height:,} {split} samples{shard}, {cfg.num_beams} beams, {record['backbone']} T5 over SIDs, device {ctx.device}")
    start = time.perf_counter()
    with ctx.progress(total=samples.height, desc=f"beam search ({split})", unit="sample") as bar:
        ranked, scores = recommend_sids(model, items, trie, samples["history"], cfg, record["max_history"], bar)
    seconds = time.perf_counter() - start
    result = score_lists(ranked, scores, samples, cf, popularity_counts(ctx.input("data")), cfg.exclude_history)
    result.metrics["decode"] = {"seconds": round(seconds, 2), "samples_per_s": round(samples.height / seconds, 3),
                                "num_beams": cfg.num_beams, "batch_size": cfg.batch_on(ctx.device), "device": ctx.device}
    return result


def load_sid_recommender(artifacts: Path, device: str):
    """(T5 of the train stage, SidItems, SID trie, the adapter's sid.json) of a tiger / letter run."""
    import polars as pl
    from transformers import T5ForConditionalGeneration

    from tca.sid.seq2seq import SidItems
    from tca.collab.trie import Trie

    adapter = artifacts / "train" / "adapter"
    record = json.loads((adapter / SID_RECORD).read_text())
    model = T5ForConditionalGeneration.from_pretrained(adapter).to(device)
    table = pl.read_parquet(artifacts / "trie" / "items.parquet")
    items = SidItems(table["item_id"].to_numpy(), table["token_ids"].list.to_array(table["token_ids"].list.len().max()).to_numpy())
    return model, items, Trie.load(artifacts / "trie" / "trie.npz"), record


def merge(ctx: StageContext, shards: list[Path]) -> None:
    """The shards' lists, in order, scored as one run (decode time: summed over the shards)."""
    import polars as pl

    from tca.cf.registry import load_checkpoint
    from tca.errors import TcaError
    from tca.llm.evaluate import read_lists, score_lists

    cfg, split = eval_config(ctx.params, ctx.input("data"))
    samples = read_samples(ctx, split)
    predictions = pl.concat([pl.read_parquet(shard / "predictions.parquet") for shard in shards])
    if predictions["sample_id"].to_list() != samples["sample_id"].to_list():
        raise TcaError(f"the predictions of the shards in {shards[0].parent} are not those of the {split} subset's samples; rerun the shards")
    result = score_lists(*read_lists(predictions, cfg.num_beams), samples,
                         load_checkpoint(ctx.input("cf") / "model.pt", ctx.device, ctx.param("cf.model")),
                         popularity_counts(ctx.input("data")), cfg.exclude_history)
    decodes = [json.loads((shard / "metrics.json").read_text())["decode"] for shard in shards]
    seconds = sum(d["seconds"] for d in decodes)
    result.metrics["decode"] = decodes[0] | {"seconds": round(seconds, 2), "samples_per_s": round(samples.height / max(seconds, 1e-9), 3),
                                             "shards": len(shards)}
    write(ctx, result, split)


def read_samples(ctx: StageContext, split: str):
    import polars as pl

    path = ctx.input("subset") / f"{split}.parquet"
    names = pl.read_parquet_schema(path)  # user_id: for CF models with user vectors
    return pl.read_parquet(path, columns=[c for c in ("sample_id", "user_id", "history", "item_id") if c in names])


def write(ctx: StageContext, result, split: str) -> None:
    result.predictions.write_parquet(ctx.out / "predictions.parquet")
    metrics = {"split": split, **result.metrics}
    (ctx.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    llm, cf_m, pop = metrics["llm"], metrics["cf"], metrics["popularity"]
    ci = metrics["ci"]["llm"]["ndcg@10"]
    ctx.log(f"wrote predictions.parquet, metrics.json: LLM hr@10 {llm['hr@10']:.4f} ndcg@10 {llm['ndcg@10']:.4f} "
            f"[{ci[0]:.4f}, {ci[1]:.4f}] cc {llm['cc']:.4f} | CF hr@10 {cf_m['hr@10']:.4f} ndcg@10 {cf_m['ndcg@10']:.4f} | "
            f"popularity ndcg@10 {pop['ndcg@10']:.4f} | {metrics['decode']['samples_per_s']:.2f} samples/s"
            f"{' (history excluded)' if metrics['exclude_history'] else ''}")


def inspect(artifact_dir: Path, params: dict) -> str:
    """The metrics side by side, then for a few samples: history, target, LLM top-10 beside CF top-10."""
    import polars as pl
    import torch

    from tca.cf.base import pad_histories
    from tca.cf.registry import load_checkpoint

    metrics = json.loads((artifact_dir / "metrics.json").read_text())
    keys = [k for k in metrics["llm"] if k in metrics["cf"]]
    names = [name for name in ("llm", "cf", "popularity") if name in metrics]
    lines = [f"eval/ on {metrics['n_samples']:,} {metrics['split']} samples "
             f"({metrics['decode']['num_beams']} beams, {metrics['decode']['samples_per_s']:.2f} samples/s on {metrics['decode']['device']})",
             f"{'':<5}" + "".join(f"{k:>9}" for k in keys)]
    lines += [f"{name[:5]:<5}" + "".join(f"{metrics[name][k]:>9.4f}" for k in keys) for name in names]
    if "ci" in metrics:
        lines.append("95% bootstrap intervals of ndcg@10: " + ", ".join(
            f"{name} [{metrics['ci'][name]['ndcg@10'][0]:.4f}, {metrics['ci'][name]['ndcg@10'][1]:.4f}]" for name in names))
    lines.append(" ".join(f"{k} {v:.4f}" for k, v in metrics["llm"].items() if k not in keys))

    artifacts = artifact_dir.parent
    titles = ["", *pl.read_parquet(artifacts / "data" / "items.parquet", columns=["item_id", "title"]).sort("item_id")["title"].to_list()]
    pred = pl.read_parquet(artifact_dir / "predictions.parquet", n_rows=SHOWN)
    samples = pred.join(pl.read_parquet(artifacts / "subset" / f"{metrics['split']}.parquet"), on="sample_id", how="left", maintain_order="left")
    cf = load_checkpoint(artifacts / "cf" / "model.pt", plugin=params["cf"]["model"])
    with torch.no_grad():
        cf_top = cf.score(pad_histories(samples["history"], cf.cfg.max_len)).topk(10).indices.tolist()

    def cell(item: int | None, target: int, width: int = 44) -> str:
        title = titles[item] if item else "-"
        mark = "*" if item == target else " "
        return f"{mark}{title[: width - 1]:<{width - 1}}"

    for row, cf_items in zip(samples.iter_rows(named=True), cf_top):
        lines += ["", f"sample {row['sample_id']} (user {row['user_id']}), history oldest first:",
                  *(f"    {titles[i]}" for i in row["history"]), f"  target: {titles[row['item_id']]}",
                  f"  {'':>3} {'LLM top-10 (score)':<52} CF top-10   (* = target)"]
        llm_items, llm_scores = (row["items"] + [None] * 10)[:10], (row["scores"] + [float("nan")] * 10)[:10]
        for r in range(10):
            lines.append(f"  {r + 1:>2}. {cell(llm_items[r], row['item_id'])} {llm_scores[r]:>7.3f}  {cell(cf_items[r], row['item_id'])}".rstrip())
    return "\n".join(lines)
