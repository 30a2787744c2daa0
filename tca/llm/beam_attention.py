"""Attention for beam search that keeps each prompt's keys and values once, not once per beam.

With Hugging Face's KV cache, K beams hold K copies of their prompt, and every step copies the whole
cache twice (appending a token concatenates it, following the chosen beams reorders it): on CPU that
memory traffic costs more than the model's matmuls. Here the prompt's keys/values stay [B, G, P, d]
(one row per sample) and each beam stores only its generated tokens' [R, G, t, d]; a decode step
scores a beam's query against its sample's prompt (a batched matmul over samples, beams as extra
query rows: no copy of the prompt) and against its own tokens, then takes one softmax over both.

It plugs into any model that routes attention through transformers' AttentionInterface: the search
registers `beam_attention`, switches the model to it for the duration (`switched_to`) and passes its
`BeamKV` as the `beam_kv` keyword of every forward.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from tca.errors import TcaError

NAME = "tca_beam"


class BeamKV:
    """Per layer, the prompt's keys/values [B, G, P, d] and the beams' generated ones [B * W, G, t, d].

    Rows (the model's batch) are beams: row b * W + k is beam k of sample b, alive or not (a dead
    beam's row is computed and ignored, so the shapes stay fixed); before the first `select` there
    is one row per sample (the prompt forward). Samples leave, and W changes, only when `select` says so.
    """

    def __init__(self, prompt_mask: torch.Tensor):
        self.prompt_mask = prompt_mask.bool()  # [B, P], left padding is False
        self.width = 1  # W: rows per sample
        self.prompt: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.beams: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def select(self, src: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """The next step's rows: row i continues row `src[i]`; `keep`: the samples that stay (None: all)."""
        self.beams = {layer: (k[src], v[src]) for layer, (k, v) in self.beams.items()}
        if keep is not None:
            self.prompt = {layer: (k[keep], v[keep]) for layer, (k, v) in self.prompt.items()}
            self.prompt_mask = self.prompt_mask[keep]
        self.width = len(src) // len(self.prompt_mask)

    def dense(self, rows: torch.Tensor) -> torch.Tensor:
        """[B * W, G, Hg, X] per-row values -> [B, G, W * Hg, X] (a sample's beams as extra query rows)."""
        _, G, Hg, X = rows.shape
        return rows.view(-1, self.width, G, Hg, X).transpose(1, 2).reshape(-1, G, self.width * Hg, X)

    def rows(self, dense: torch.Tensor) -> torch.Tensor:
        """Inverse of `dense`: [B, G, W * Hg, X] -> [B * W, G, Hg, X]."""
        B, G, _, X = dense.shape
        return dense.view(B, G, self.width, -1, X).transpose(1, 2).reshape(B * self.width, G, -1, X)


def beam_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, beam_kv: BeamKV | None = None, **kwargs):
    """AttentionInterface function: query [R, H, T, d], key/value [R, G, T, d] -> output [R, T, H, d]."""
    kv, layer = beam_kv, module.layer_idx
    if layer not in kv.prompt:  # the prompt forward: causal attention over the left-padded prompts
        kv.prompt[layer] = (key, value)
        P, groups = key.shape[2], query.shape[1] // key.shape[1]
        causal = torch.ones(P, P, dtype=torch.bool, device=key.device).tril()
        # padding queries attend to themselves only: finite values where nothing reads them
        mask = causal & (kv.prompt_mask[:, None, None, :] | torch.eye(P, dtype=torch.bool, device=key.device))
        # K/V expanded to every query head: SDPA with a mask and enable_gqa falls back to its math kernel on CUDA
        key, value = (x.repeat_interleave(groups, 1) if groups > 1 else x for x in (key, value))
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
        return out.transpose(1, 2), None
    prompt_k, prompt_v = kv.prompt[layer]
    k, v = (torch.cat([kv.beams[layer][0], key], 2), torch.cat([kv.beams[layer][1], value], 2)) if layer in kv.beams else (key, value)
    kv.beams[layer] = (k, v)
    R, H, _, d = query.shape
    G = key.shape[1]
    q = query.view(R, G, H // G, d)
    on_prompt = kv.dense(q) @ prompt_k.transpose(-1, -2)  # [B, G, K * Hg, P]
    on_prompt = kv.rows(on_prompt.masked_fill(~kv.prompt_mask[:, None, None, :], float("-inf")))  # [R, G, Hg, P]
    scores = torch.cat([on_prompt, q @ k.transpose(-1, -2)], -1) * scaling
    probs = scores.softmax(-1, dtype=torch.float32).to(query.dtype)
    P = prompt_k.shape[2]
    out = kv.rows(kv.dense(probs[..., :P].contiguous()) @ prompt_v) + probs[..., P:] @ v  # [R, G, Hg, d]
    return out.reshape(R, 1, H, d), None


AttentionInterface.register(NAME, beam_attention)


@contextmanager
def switched_to(model, length: int):
    """The model runs `beam_attention` inside the block, its own attention again after it. `length`:
    the longest sequence (prompt + title) the block will see."""
    config = model.config
    window = getattr(config, "sliding_window", None)
    if window and length > window or getattr(config, "attn_logit_softcapping", None):
        raise TcaError(f"{type(model).__name__}: beam search implements plain causal attention, not the sliding window "
                       f"({window}) or logit soft-capping this model uses at length {length}")
    before = config._attn_implementation
    model.set_attn_implementation(NAME)
    if config._attn_implementation != NAME:
        raise TcaError(f"{type(model).__name__} does not route attention through transformers' AttentionInterface, "
                       "which the beam search plugs into")
    try:
        yield
    finally:
        model.set_attn_implementation(before)
