"""Stage `train`: LoRA fine-tuning of the base LLM on the train subset; writes adapter/ and log.jsonl.

The hybrid backbones (llara, collm) read the frozen CF model of the `cf` stage and write their
projector into the adapter, with `adapter/hybrid.json` saying which backbone and CF model it serves.

The trainer checkpoints into artifacts/.resume/train-<key>/, keyed by the stage's params and the
identity of its inputs, outside the runner's temporary output dir (which a rerun wipes): rerunning
after an interruption resumes there with the same params and inputs. It is removed on success.

Under torchrun / accelerate launch every rank runs this with the same params (DISTRIBUTED): each
trains on its share of every step's samples (see `tca.llm.train`) and only rank 0 writes the checkpoint
dir and `ctx.out`; the runner keeps rank 0's outputs only.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from pipeline.context import StageContext

DISTRIBUTED = True
PARAMS = ("train", "lora", "tca.alpha", "prompt", "llm.attn_implementation", "eval.batch_size", "eval.exclude_history")
FORMAT_RECORD = "format.json"  # in adapter/: the prompt format it was trained with (train.packing) and what it holds (train.finetune)
SID_RECORD = "sid.json"  # in adapter/ of tiger / letter: the whole T5 is there (trained from scratch), and how it reads histories
INPUTS = ("model/config.json", "subset/train.parquet", "subset/valid.parquet", "trie/trie.npz",
          "trie/items.parquet", "cf_dist/dist.zarr/zarr.json", "data/items.parquet", "cf/model.pt")


def resume_dir(ctx: StageContext) -> Path:
    """Where an interrupted run with these params and inputs left its checkpoint."""
    from tca.llm.base_model import weight_files

    stats = {}
    weights = [path.relative_to(ctx.artifacts).as_posix() for path in weight_files(ctx.artifacts / "model")]
    for name in (*INPUTS, *weights):
        path = ctx.artifacts / name
        stats[name] = [path.stat().st_size, path.stat().st_mtime_ns] if path.exists() else None
    doc = json.dumps({"params": {key: ctx.param(key) for key in PARAMS}, "inputs": stats}, sort_keys=True, default=str)
    return ctx.artifacts / ".resume" / f"train-{hashlib.sha256(doc.encode()).hexdigest()[:16]}"


def load_builder(artifacts: Path, params: dict, packing: str, slots: tuple = ()):
    """(PromptBuilder, ItemTargets, tokenizer) from the upstream artifacts: the prompt format of `packing`
    (items: every item written as its trie target ids), with these CF slots."""
    import polars as pl
    from transformers import AutoTokenizer

    from tca.llm.model import ItemTargets
    from tca.llm.prompt import PromptBuilder, PromptConfig

    tokenizer = AutoTokenizer.from_pretrained(artifacts / "model")
    items = pl.read_parquet(artifacts / "data" / "items.parquet", columns=["item_id", "title"]).sort("item_id")
    table = pl.read_parquet(artifacts / "trie" / "items.parquet")
    targets = ItemTargets(table["item_id"].to_numpy(), table["token_ids"])
    titles = ["", *items["title"].to_list()]
    pieces = None
    if packing == "items":
        ids, lengths = targets.get(items["item_id"].to_numpy())
        pieces = [[], *(p.tolist() for p in np.split(ids, np.cumsum(lengths)[:-1]))]
    return PromptBuilder(tokenizer, titles, PromptConfig(**params["prompt"]), slots, pieces), targets, tokenizer


def load_batcher(artifacts: Path, params: dict, cfg, hybrid=None, device: str = "cpu"):
    """The Batcher (prompts, targets, trie, q; `hybrid`: CF slots) of the train stage from the upstream artifacts.
    On a CPU, with the sdpa models, per-sample micro-batches run unpadded (`tca.llm.packing.unpad`: measured
    faster there, bench/train_step.py); a GPU keeps padded batches for its fused attention kernels."""
    import torch

    from tca.collab.store import DistReader
    from tca.collab.trie import Trie
    from tca.llm.train import Batcher

    builder, targets, tokenizer = load_builder(artifacts, params, cfg.packing, () if hybrid is None else hybrid.slots)
    trie = Trie.load(artifacts / "trie" / "trie.npz")
    dist = DistReader(artifacts / "cf_dist" / "dist.zarr", trie) if cfg.loss_config.uses_q else None
    unpadded = params["llm"]["attn_implementation"] == "sdpa" and torch.device(device).type == "cpu"
    return Batcher(builder, targets, trie, dist, cfg.loss_config, cfg.max_len, builder.pad_id, hybrid, unpadded)


def read_format(adapter: Path) -> dict:
    """The adapter's `format.json` (an adapter from before it existed: per-sample prompts, LoRA)."""
    path = adapter / FORMAT_RECORD
    return json.loads(path.read_text()) if path.exists() else {"packing": "none", "finetune": "lora"}


def reads(params: dict) -> dict[str, list[str]]:
    """Of `subset`, the train samples (and the valid ones when training validates): a new test or valid
    subset size does not retrain the LLM."""
    return {"subset": ["train.parquet", *(["valid.parquet"] if params["train"]["eval_every"] else [])]}


def inert(params: dict) -> dict[str, str]:
    """The declared params these params leave unread (a change of one would retrain an identical model)."""
    from tca.sid import SID_BACKBONES

    backbone, unread = params["train"]["backbone"], {}
    if backbone in SID_BACKBONES:
        for name in ("lora", "prompt", "llm.attn_implementation"):
            unread[name] = f"train.backbone {backbone} trains a T5 over semantic IDs (the seq2seq section), not the LLM"
    else:
        unread["seq2seq"] = f"train.backbone {backbone} fine-tunes the LLM; seq2seq configures the tiger / letter T5"
        if params["train"]["finetune"] == "full":
            unread["lora"] = "train.finetune is full (every weight trains, no adapter); add --set train.finetune=lora for LoRA"
    if params["train"]["loss"] == "ntp":
        unread["tca.alpha"] = "train.loss is ntp, which has no soft labels; add --set train.loss=tca (TCA) or kl"
    return unread


def check_params(params: dict) -> None:
    """Every section the stage reads, as the typed configs `run` builds."""
    from tca.llm.model import LoraSettings
    from tca.llm.prompt import PromptConfig
    from tca.sid.seq2seq import Seq2SeqConfig
    from tca.llm.train import TrainConfig

    from pipeline.stages.data import resolve_exclude_history

    TrainConfig.from_params(params["train"], params["tca"]["alpha"])
    resolve_exclude_history(params["eval"]["exclude_history"], None, "eval.exclude_history")
    LoraSettings.from_params(params["lora"])
    Seq2SeqConfig.from_params(params["seq2seq"])
    PromptConfig(**params["prompt"])


def run(ctx: StageContext) -> None:
    import polars as pl
    import torch

    from tca.llm import ddp
    from tca.cf.registry import load_checkpoint
    from tca.llm.hybrid_prompt import SLOTS, HybridPrompt
    from tca.llm.model import LoraSettings, load_model, use_bf16
    from tca.sid import SID_BACKBONES
    from tca.llm.train import TrainConfig, Trainer

    world = ddp.World.from_env()
    log = ctx.log if world.main else (lambda msg: None)
    ddp.init(world, ctx.device)  # the runner has joined the group already; a direct call to run() joins here
    cfg = TrainConfig.from_params(ctx.section("train"), ctx.param("tca.alpha"))
    if cfg.backbone in SID_BACKBONES:
        return train_sid(ctx, cfg)
    lora = LoraSettings.from_params(ctx.section("lora"))
    hybrid = None
    if cfg.backbone in SLOTS:
        cf = load_checkpoint(ctx.input("cf") / "model.pt", ctx.device, ctx.param("cf.model"))
        hybrid = HybridPrompt(cf, cfg.backbone, (cfg.curriculum_start, cfg.curriculum_end))
        log(f"{cfg.backbone}: {' + '.join(hybrid.slots)} slots from the frozen {cf.cfg.model} (d={hybrid.cf_dim})")
    batcher = load_batcher(ctx.artifacts, ctx.params, cfg, hybrid, ctx.device)
    names = pl.read_parquet_schema(ctx.input("subset") / "train.parquet")
    columns = [c for c in ("sample_id", "user_id", "timestamp", "history", "item_id") if c in names]  # user, time: packing
    samples = pl.read_parquet(ctx.input("subset") / "train.parquet", columns=columns)
    valid = pl.read_parquet(ctx.input("subset") / "valid.parquet", columns=columns) if cfg.eval_every else None

    torch.manual_seed(ddp.rank_seed(cfg.seed, world.rank))  # the LoRA (and projector) init and the dropout (and curriculum) draws
    bf16 = use_bf16(ctx.device, cfg.precision)
    model = load_model(ctx.input("model"), device=ctx.device, lora=None if cfg.finetune == "full" else lora, bf16=bf16,
                       cf_dim=None if hybrid is None else hybrid.cf_dim, full=cfg.finetune == "full",
                       attention=ctx.param("llm.attn_implementation"))
    work = resume_dir(ctx)
    log(f"device {ctx.device}, {'bf16' if bf16 else 'fp32'}; checkpoints in {work}"
        + (f"; rank 0 of {world.size}: {world.size} x {cfg.micro_batch} x {cfg.grad_accum} samples per step" if world.size > 1 else ""))
    from pipeline.stages.data import resolve_exclude_history

    exclude = resolve_exclude_history(ctx.param("eval.exclude_history"), ctx.input("data"), "eval.exclude_history")
    result = Trainer(model, batcher, samples, valid, cfg, work, ctx.device, ctx.log, ctx.progress, world,
                     valid_batch_size=ctx.param("eval.batch_size"), exclude_history=exclude).run()
    if not world.main:
        return
    shutil.move(work / "adapter", ctx.out / "adapter")
    (ctx.out / "adapter" / FORMAT_RECORD).write_text(json.dumps({"packing": cfg.packing, "finetune": cfg.finetune}) + "\n")
    if hybrid is not None:
        hybrid.save(ctx.out / "adapter")
    shutil.move(work / "log.jsonl", ctx.out / "log.jsonl")
    shutil.rmtree(work)
    best = "" if result.best_metric is None else f"; best valid {cfg.valid_metric} {result.best_metric:.4f} at epoch {result.best_epoch}"
    ctx.log(f"wrote adapter/, log.jsonl after {result.steps} steps{' (stopped early)' if result.stopped_early else ''}{best}")


def train_sid(ctx: StageContext, cfg) -> None:
    """tiger / letter: a T5 from scratch over the SIDs of the trie stage (seq2seq section), with
    train.loss and tca.alpha as for the LLMs; adapter/ holds the whole model and sid.json. Validation
    decodes `seq2seq.valid_samples` of the data stage's valid split (the subset's valid samples, 128 by
    default, are too few to pick an epoch by) as the eval stage would, picking by `train.valid_metric`."""
    import numpy as np
    import polars as pl

    from pipeline.stages.data import resolve_exclude_history
    from tca.collab.store import DistReader
    from tca.data.subset import draw
    from tca.llm.evaluate import EvalConfig
    from tca.sid.rqvae import vocab_size
    from tca.sid.seq2seq import Seq2SeqConfig, SidBatcher, SidItems, SidValidation, build_model, train_seq2seq
    from tca.collab.trie import Trie

    s2s = Seq2SeqConfig.from_params(ctx.section("seq2seq"))
    table = pl.read_parquet(ctx.input("trie") / "items.parquet")
    tokens = table["token_ids"].list.to_array(table["token_ids"].list.len().max()).to_numpy()
    items = SidItems(table["item_id"].to_numpy(), tokens)
    trie = Trie.load(ctx.input("trie") / "trie.npz")
    loss = cfg.loss_config
    dist = DistReader(ctx.input("cf_dist") / "dist.zarr", trie) if loss.uses_q else None
    samples = pl.read_parquet(ctx.input("subset") / "train.parquet", columns=["sample_id", "history", "item_id"])
    valid = None
    if s2s.valid_every:
        split = pl.read_parquet(ctx.input("data") / "valid.parquet", columns=["sample_id", "history", "item_id"])
        exclude = resolve_exclude_history(ctx.param("eval.exclude_history"), ctx.input("data"), "eval.exclude_history")
        decode = EvalConfig(num_beams=cfg.valid_beams, renormalize=loss.msl, batch_size=ctx.param("eval.batch_size"),
                            exclude_history=exclude, tau=loss.decode_tau)
        valid = SidValidation(draw(split, s2s.valid_samples, np.random.default_rng(s2s.seed)), items, trie, decode, cfg.valid_metric)
    model = build_model(s2s, vocab_size(tokens))
    ctx.log(f"{cfg.backbone}: T5 from scratch ({sum(p.numel() for p in model.parameters()):,} parameters, SID vocabulary "
            f"{vocab_size(tokens)}) on {samples.height:,} samples, up to {s2s.epochs} epochs; loss {loss}"
            + ("" if valid is None else f"; validating on {valid.samples.height:,} valid samples every {s2s.valid_every} epochs"))
    records = train_seq2seq(model, SidBatcher(items, trie, dist, loss, s2s.max_history), samples, s2s, ctx.device, ctx.log,
                            ctx.progress, valid)
    model.save_pretrained(ctx.out / "adapter")
    (ctx.out / "adapter" / SID_RECORD).write_text(json.dumps({"backbone": cfg.backbone, "max_history": s2s.max_history}) + "\n")
    (ctx.out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    best = [r for r in records if r.get("best")]
    ctx.log(f"wrote adapter/ (T5), log.jsonl: loss {records[0]['loss']:.4f} (epoch 1) -> {records[-1]['loss']:.4f} "
            f"(epoch {records[-1]['epoch']})" + (f"; kept epoch {best[-1]['epoch']}: valid {cfg.valid_metric} "
                                                 f"{best[-1]['valid'][cfg.valid_metric]:.4f}" if best else ""))


def inspect(artifact_dir: Path, params: dict) -> str:
    """The adapter's settings and size, the loss and throughput over training, and every validation."""
    import math

    from safetensors import safe_open

    from tca.llm.base_model import weight_files
    from tca.llm.hybrid_prompt import PROJECTOR, RECORD
    from tca.llm.model import PROJECTOR_FILE

    if (artifact_dir / "adapter" / SID_RECORD).exists():
        record = json.loads((artifact_dir / "adapter" / SID_RECORD).read_text())
        config = json.loads((artifact_dir / "adapter" / "config.json").read_text())
        epochs = [json.loads(line) for line in (artifact_dir / "log.jsonl").read_text().splitlines()]
        metric = params["train"]["valid_metric"]
        return "\n".join([f"train/: {record['backbone']}: T5 from scratch, d_model {config['d_model']}, {config['num_layers']} + "
                          f"{config['num_decoder_layers']} layers, SID vocabulary {config['vocab_size']}; loss {params['train']['loss']} "
                          f"(alpha {params['tca']['alpha']})",
                          *(f"  epoch {r['epoch']:>3}  loss {r['loss']:.4f}  lr {r['lr']:.2e}  {r['samples_per_s']:,.0f} samples/s"
                            + ("" if "valid" not in r else f"  valid {metric} {r['valid'][metric]:.4f}" + ("  (best)" if r.get("best") else ""))
                            for r in epochs)])
    adapter = artifact_dir / "adapter"
    full = read_format(adapter)["finetune"] == "full"
    sizes = {}
    # a fully fine-tuned hybrid's projector has a file of its own; an adapter holds its projector
    files = [*weight_files(adapter), *adapter.glob(PROJECTOR_FILE)] if full else [adapter / "adapter_model.safetensors"]
    for path in files:
        with safe_open(path, framework="pt") as f:
            sizes |= {f"{path.name}:{k}": math.prod(f.get_slice(k).get_shape()) for k in f.keys()}
    n_projector = sum(n for k, n in sizes.items() if k.startswith(PROJECTOR_FILE) or f".{PROJECTOR}." in k)
    n_params = sum(sizes.values()) - n_projector
    if full:
        what = f"  fully fine-tuned: every weight, {n_params:,} parameters (adapter/ holds the whole model)"
    else:
        config = json.loads((adapter / "adapter_config.json").read_text())
        what = (f"  adapter: LoRA r={config['r']} alpha={config['lora_alpha']} dropout={config['lora_dropout']} on "
                f"{', '.join(sorted(config['target_modules']))}; {n_params:,} parameters")
    records = [json.loads(line) for line in (artifact_dir / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    valid = [r for r in records if "valid" in r]
    train = params["train"]
    lines = [
        f"train/: backbone {train['backbone']}, loss {train['loss']} (alpha {params['tca']['alpha']}), "
        f"msl {train['msl'] or train['backbone'] == 'msl'}",
        what,
    ]
    if (artifact_dir / "adapter" / RECORD).exists():
        record = json.loads((artifact_dir / "adapter" / RECORD).read_text())
        lines.append(f"  projector ({record['backbone']}): {record['cf_model']} vectors (d={record['cf_dim']}) -> the LLM's "
                     f"input embeddings, MLP of {n_projector:,} parameters (in {PROJECTOR_FILE if full else 'the adapter file'})")
    if steps:
        speed = sorted(r["tokens_per_s"] for r in steps)
        lines.append(f"  {steps[-1]['step']} optimizer steps over {steps[-1]['epoch']:.2f} epochs; loss {steps[0]['loss']:.4f} "
                     f"(first {train['log_every']} steps) -> {steps[-1]['loss']:.4f} (last); median {speed[len(speed) // 2]:,.0f} tokens/s")
        lines += [f"    step {r['step']:>6}  epoch {r['epoch']:>6.2f}  loss {r['loss']:.4f}  lr {r['lr']:.2e}  {r['tokens_per_s']:>8,.0f} tok/s"
                  for r in steps[:: max(1, len(steps) // 10)]]
    for r in valid:
        shown = "  ".join(f"{k} {v:.4f}" for k, v in r["valid"].items() if k.startswith(("hr@", "ndcg@")))
        lines.append(f"  valid epoch {r['epoch']}: {shown}{'  (best)' if r['best'] else ''}")
    return "\n".join(lines)
