"""Block-local attention for packed rows (`train.packing: items`).

A packed row's item-window mask lets each token see the prompt head and about `history_len` items,
yet dense masked attention still scores every query of a ~600-token row against every key: the
largest single cost of a packed step on a CPU (29% of it, in SDPA's backward). Here a row's queries
are cut into chunks of `CHUNK` tokens, and a chunk attends only to the keys that some query of it may
see (gathered into a fixed width per batch), so attention costs ~T x (head + window + CHUNK) rather
than T x T, and a longer row (more targets) no longer costs more per token. The chunks run as plain
matmuls and a softmax: CPU SDPA's backward was still 22% of a step over the gathered keys. The output
is dense masked attention's: each query's softmax runs over exactly the keys the mask lets it see.

`load_model` loads the `sdpa` implementation as `NAME`: transformers' SDPA, which switches to this
path when a forward passes `key_index` (the batch's `KeyBlocks`) and its chunk mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "tca_sdpa"
CHUNK = 64  # query tokens per chunk: a few items, so a chunk's keys are the head + its window + itself


@dataclass
class KeyBlocks:
    """A dense [B, 1, T, T] mask as chunks of queries and the keys they need."""

    index: torch.Tensor  # int64 [B, C, K]: position of each chunk's k-th key (ascending; unused slots are masked)
    mask: torch.Tensor  # bool [B, C, CHUNK, K]: query q of chunk c may attend its key k

    def to(self, device) -> "KeyBlocks":
        return KeyBlocks(self.index.to(device), self.mask.to(device))


def key_blocks(mask: torch.Tensor, chunk: int = CHUNK) -> KeyBlocks:
    """The chunked form of a boolean attention mask [B, 1, T, T] (query t may attend key s)."""
    B, _, T, _ = mask.shape
    n = -(-T // chunk)
    by_chunk = F.pad(mask[:, 0], (0, 0, 0, n * chunk - T)).view(B, n, chunk, T)
    need = by_chunk.any(2)  # [B, n, T]: keys some query of the chunk sees
    width = int(need.sum(-1).max())
    index = torch.sort((~need).to(torch.uint8), dim=-1, stable=True).indices[..., :width].contiguous()  # needed keys first, in order
    block = by_chunk.gather(3, index[:, :, None, :].expand(B, n, chunk, width))
    block[..., 0] |= ~block.any(-1)  # queries past T see one key: no empty softmax (their outputs are dropped)
    return KeyBlocks(index, block)


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     key_index: torch.Tensor | None = None, **kwargs):
    """AttentionInterface function: query [B, H, T, d], key/value [B, G, T, d] -> [B, T, H, d]. Without
    `key_index` it is transformers' SDPA; with it, `attention_mask` is the `KeyBlocks` chunk mask."""
    if key_index is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    B, H, T, d = query.shape
    G = key.shape[1]
    _, n, width = key_index.shape
    chunk = attention_mask.shape[2]
    # [B * n, G, H/G * chunk, d]: a chunk's queries, the heads that share a K/V head stacked as rows (GQA without copies)
    q = F.pad(query, (0, 0, 0, n * chunk - T)).reshape(B, G, H // G, n, chunk, d).permute(0, 3, 1, 2, 4, 5)
    q = q.reshape(B * n, G, H // G * chunk, d) * (d**-0.5 if scaling is None else scaling)  # scaled here: d < width
    at = key_index.reshape(B, 1, n * width, 1).expand(B, G, n * width, d)
    k, v = (x.gather(2, at).view(B, G, n, width, d).transpose(1, 2).reshape(B * n, G, width, d) for x in (key, value))
    scores = (q @ k.transpose(-1, -2)).view(B * n, G, H // G, chunk, width)
    scores.masked_fill_(~attention_mask.reshape(B * n, 1, 1, chunk, width), float("-inf"))  # in place: the matmul's backward never reads it
    # in the scores' dtype: the softmax accumulates in fp32 either way, and its bf16 output is the fp32 one rounded
    probs = F.dropout(scores.softmax(-1), dropout if module.training else 0.0)
    out = probs.view(B * n, G, H // G * chunk, width) @ v  # [B * n, G, H/G * chunk, d]
    return out.view(B, n, H, chunk, d).transpose(2, 3).reshape(B, n * chunk, H, d)[:, :T], None


AttentionInterface.register(NAME, packed_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)
