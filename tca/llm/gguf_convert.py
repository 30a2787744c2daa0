"""Convert a GGUF file into a checked Hugging Face directory (dequantized float32).

transformers reads and dequantizes the weights; the tokenizer is checked against the GGUF's
own vocabulary, the saved model against its in-memory twin and a question it is known to answer.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tca.llm.base_model import Log, silent
from tca.errors import TcaError

# Strings the converted tokenizer must round-trip: titles with years, accents, punctuation,
# a non-Latin script and runs of spaces before digits.
CHECK_STRINGS = (
    "Toy Story (1995)",
    "Amélie (Fabuleux destin d'Amélie Poulain, Le) (2001)",
    "Schindler's List (1993)",
    'Léon: The Professional (a.k.a. "Léon") — 1994!',
    "Crouching Tiger, Hidden Dragon (Wo hu cang long) 臥虎藏龍 (2000)",
    "x  1\n\n23   456",
)
# llama.cpp pre-tokenizer types that isolate every digit before the GPT-2 split; transformers'
# GGUF reader does not know them and would fall back to the bare GPT-2 split, which merges
# whitespace runs differently ("x  1" -> x, Ġ, Ġ, 1 instead of SmolLM2's x, ĠĠ, 1).
DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
GGUF_SPECIAL_IDS = {
    "bos": "bos_token_id",
    "eos": "eos_token_id",
    "unk": "unknown_token_id",
    "pad": "padding_token_id",
}
PROBE_QUESTION, PROBE_ANSWER = "What is the capital of France?", "Paris"


@dataclass
class GgufVocab:
    """The tokenizer as the GGUF file itself states it (the reference for the check)."""

    tokens: list[str]
    pre: str  # llama.cpp pre-tokenizer type
    special: dict[str, int]  # {"bos": 1, "eos": 2, ...}, the ids the file declares


def read_gguf_vocab(gguf: Path) -> GgufVocab:
    from gguf import GGUFReader

    fields = GGUFReader(gguf).fields
    special = {
        name: int(fields[f"tokenizer.ggml.{key}"].contents())
        for name, key in GGUF_SPECIAL_IDS.items()
        if f"tokenizer.ggml.{key}" in fields
    }
    return GgufVocab(
        tokens=list(fields["tokenizer.ggml.tokens"].contents()),
        pre=str(fields["tokenizer.ggml.pre"].contents()) if "tokenizer.ggml.pre" in fields else "default",
        special=special,
    )


def check_tokenizer(tokenizer, vocab: GgufVocab, source: str = "the GGUF") -> None:
    """Raise TcaError unless `tokenizer` maps every id to the GGUF's token string, declares the
    same special ids, and round-trips CHECK_STRINGS. The full id->token table is compared, so
    every id any string can produce is covered."""
    if len(tokenizer) != len(vocab.tokens):
        raise TcaError(f"tokenizer converted from {source} has {len(tokenizer)} tokens, the file {len(vocab.tokens)}")
    table = np.array(tokenizer.convert_ids_to_tokens(list(range(len(vocab.tokens)))), dtype=object)
    bad = np.flatnonzero(table != np.array(vocab.tokens, dtype=object))
    if len(bad):
        raise TcaError(
            f"tokenizer converted from {source} disagrees with the file's vocabulary at {len(bad)} ids, first at id "
            f"{bad[0]}: {table[bad[0]]!r} vs {vocab.tokens[bad[0]]!r}"
        )
    for name, want in vocab.special.items():
        got = getattr(tokenizer, f"{name}_token_id")
        if got != want:
            raise TcaError(f"tokenizer converted from {source}: {name}_token_id is {got}, the file declares {want}")
    for s in CHECK_STRINGS:
        ids = tokenizer(s, add_special_tokens=False)["input_ids"]
        back = tokenizer.decode(ids)
        if back != s:
            raise TcaError(f"tokenizer converted from {source} does not round-trip {s!r}: decodes to {back!r}")


def gguf_tokenizer(gguf: Path):
    """The GGUF's tokenizer as a transformers fast tokenizer, checked against the file."""
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    vocab = read_gguf_vocab(gguf)
    if vocab.pre in DIGIT_SPLIT_PRE:
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    check_tokenizer(tokenizer, vocab, source=gguf.name)
    return tokenizer


def probe_ids(tokenizer) -> torch.Tensor:
    """PROBE_QUESTION as a one-turn chat prompt ending at the assistant marker, shape [1, T]."""
    chat = [{"role": "user", "content": PROBE_QUESTION}]
    encoded = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return encoded["input_ids"]


@torch.no_grad()
def check_reload(model, out: Path) -> None:
    """Raise TcaError unless the model saved in `out` gives logits identical to `model` on
    the probe prompt (e.g. a tied lm_head that did not survive the round trip)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = probe_ids(AutoTokenizer.from_pretrained(out))
    logits = AutoModelForCausalLM.from_pretrained(out, dtype=model.dtype).eval()(ids).logits
    if not torch.isfinite(logits).all():
        raise TcaError(f"the model saved in {out} produces non-finite logits")
    if not torch.equal(logits, model.eval()(ids).logits):
        raise TcaError(f"the model saved in {out} reloads with logits different from the model that was saved")


@torch.no_grad()
def check_probe_answer(model, tokenizer) -> None:
    """Raise TcaError unless greedy decoding answers PROBE_QUESTION with PROBE_ANSWER (which
    SmolLM2-135M-Instruct does): catches weights that load but were misread."""
    ids = probe_ids(tokenizer)
    out = model.eval().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    if PROBE_ANSWER not in answer:
        raise TcaError(
            f"the converted model answers {PROBE_QUESTION!r} with {answer!r}, not {PROBE_ANSWER!r}: "
            "its weights were probably misread"
        )


def convert_gguf(gguf: Path, out: Path, log: Log = silent) -> None:
    """Dequantize `gguf` into an HF dir `out` (float32 safetensors + tokenizer), checked."""
    from transformers import AutoModelForCausalLM, GgufConfig

    log(f"reading and checking the tokenizer of {gguf.name}")
    tokenizer = gguf_tokenizer(gguf)
    log("dequantizing the weights")
    # Without dequantize=True the model keeps a GGUF quantizer and refuses save_pretrained.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log(f"checking the saved model: reload logits, greedy answer to {PROBE_QUESTION!r}")
    check_reload(model, out)
    check_probe_answer(model, tokenizer)
