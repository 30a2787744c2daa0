"""Stage `model`: materialize `llm.base` into artifacts/model/ as an HF-format dir."""
from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.context import StageContext
from tca.llm import base_model  # light: no torch (see its docstring)
from tca.errors import TcaError

SAMPLE_TITLE = "Amélie (Fabuleux destin d'Amélie Poulain, Le) (2001)"


def run(ctx: StageContext) -> None:
    base = ctx.param("llm.base")
    start = time.perf_counter()
    base_model.materialize(base, ctx.out, log=ctx.log)
    config = json.loads((ctx.out / "config.json").read_text())
    size = sum(p.stat().st_size for p in ctx.out.iterdir())
    ctx.log(
        f"wrote {len(list(ctx.out.iterdir()))} files, {size / 1e6:.0f} MB, in {time.perf_counter() - start:.0f} s: "
        f"{config['architectures'][0]}, {base_model.count_params(ctx.out) / 1e6:.1f}M params, "
        f"{_dtype(config)}, vocab {config['vocab_size']} (llm.base={base})"
    )


def _dtype(config: dict) -> str | None:
    return config.get("dtype", config.get("torch_dtype"))  # transformers<5 wrote torch_dtype


def external_deps(params: dict) -> list[Path]:
    base = params["llm"]["base"]
    if base == base_model.EMBEDDED:
        return [base_model.embedded_gguf()]
    try:
        return base_model.base_files(base)
    except TcaError:  # not available yet: `run` raises the explanation
        return []


def inspect(artifact: Path, params: dict) -> str:
    from transformers import AutoTokenizer

    config = json.loads((artifact / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(artifact)
    ids = tokenizer(SAMPLE_TITLE, add_special_tokens=False)["input_ids"]
    pieces = " | ".join(f"{i}:{tokenizer.decode([i])!r}" for i in ids)
    special = ", ".join(
        f"{name}={tok!r} ({tokenizer.convert_tokens_to_ids(tok)})" for name, tok in tokenizer.special_tokens_map.items()
    )
    return "\n".join(
        [
            f"model/ from llm.base={params['llm']['base']}",
            f"  architecture: {config['architectures'][0]} ({config['num_hidden_layers']} layers, "
            f"hidden {config['hidden_size']}, {config['num_attention_heads']} heads, "
            f"tied embeddings: {config.get('tie_word_embeddings', False)})",
            f"  parameters: {base_model.count_params(artifact):,} ({_dtype(config)})",
            f"  vocab: {config['vocab_size']} (tokenizer: {len(tokenizer)})",
            f"  special tokens: {special}",
            f"  {SAMPLE_TITLE!r} -> {len(ids)} tokens: {pieces}",
        ]
    )
