"""RLMRec's profiles: a short text about each item and each user, written by the LLM from titles.

RLMRec (Ren et al., 2024) asks a large LLM (GPT-3.5) to summarize what kind of user would enjoy
an item and what a user enjoys, then embeds those summaries. We do the same with the embedded
SmolLM2-135M-Instruct: greedy, batched, at most `max_new_tokens` tokens each, so profiling a
MovieLens-sized dataset takes minutes on a CPU. Prompts go through the model's chat template.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tca.llm.prompt import pad_id
from tca.ragged import pad

ITEM_PROMPT = "In one short sentence, describe the kind of person who would enjoy the {domain} \"{title}\"."
USER_PROMPT = "A person recently enjoyed these {domain}: {titles}. In one short sentence, describe this person's taste."


def item_prompts(titles: list[str], domain: str) -> list[str]:
    return [ITEM_PROMPT.format(domain=domain, title=t) for t in titles]


def user_prompts(histories: list[list[str]], domain: str) -> list[str]:
    return [USER_PROMPT.format(domain=domain, titles=", ".join(f'"{t}"' for t in h)) for h in histories]


@torch.no_grad()
def generate(prompts: list[str], model, tokenizer, max_new_tokens: int = 24, batch_size: int = 32, device: str = "cpu",
             bar=None) -> list[str]:
    """Greedy replies to each prompt (chat template, left-padded batches in length order), decoded
    without special tokens and stripped; in the order of `prompts` (`bar`: a progress bar, updated per prompt)."""
    chats = [[{"role": "system", "content": ""}, {"role": "user", "content": p}] for p in prompts]  # no default system prompt: fewer tokens
    ids = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True) for c in chats]
    ids = [x["input_ids"] if isinstance(x, dict) or hasattr(x, "keys") else x for x in ids]
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    fill = pad_id(tokenizer)
    out: list[str] = [""] * len(prompts)
    model = model.to(device).eval()
    for begin in range(0, len(order), batch_size):
        rows = order[begin : begin + batch_size]
        flat = np.concatenate([np.asarray(ids[r], dtype=np.int64) for r in rows])
        batch = torch.from_numpy(pad(flat, lengths[rows], fill, left=True)).to(device)
        mask = (torch.arange(batch.shape[1], device=device)[None, :] >= batch.shape[1] - torch.from_numpy(lengths[rows]).to(device)[:, None]).long()
        gen = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=fill, eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(gen[:, batch.shape[1] :], skip_special_tokens=True)
        for r, text in zip(rows, texts):
            out[r] = " ".join(text.split())
        if bar is not None:
            bar.update(len(rows))
    return out


def load_generator(model_dir: Path, device: str = "cpu"):
    """(model, tokenizer); the model in bf16 where that is fast (`tca.llm.model.use_bf16`), else fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tca.llm.model import use_bf16

    dtype = torch.bfloat16 if use_bf16(device) else torch.float32
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval(), AutoTokenizer.from_pretrained(model_dir)
