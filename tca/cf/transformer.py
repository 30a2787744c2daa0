"""Pre-LayerNorm transformer over left-padded item sequences, shared by SASRec and BERT4Rec.

Positions are counted from the right (0 = most recent slot) and padded keys are masked out,
so the output at real positions does not depend on how much left padding there is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def init_embedding(emb: nn.Embedding) -> None:
    """N(0, 0.02) as BERT: torch's N(0, 1) default starts the item softmax far from uniform
    (initial ce loss ~2x ln N) and training spends its first epochs undoing it."""
    nn.init.normal_(emb.weight, std=0.02)
    if emb.padding_idx is not None:
        with torch.no_grad():
            emb.weight[emb.padding_idx].zero_()


class Dropout(nn.Module):
    """Inverted dropout whose mask takes 15 random bits per element, four elements per 64-bit draw:
    on CPU, at SASRec's sizes, about 4x faster than drawing a float per element (torch's generator
    is the cost), and dropout runs five times per training step. p is rounded to a multiple of
    2**-15 and the scale uses the rounded p, so the expectation is exact."""

    def __init__(self, p: float):
        super().__init__()
        self.cut = round(p * 32768)
        self.scale = 1.0 / (1.0 - self.cut / 32768) if self.cut < 32768 else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.cut == 0:
            return x
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()
        lanes = words.view(torch.int16)[:n].view(x.shape).bitwise_and_(0x7FFF)  # random_ leaves bit 63 clear
        return x * lanes.ge_(self.cut).to(x.dtype).mul_(self.scale)


class Block(nn.Module):
    def __init__(self, hidden: int, inner: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.ff = nn.Sequential(nn.Linear(hidden, inner), nn.GELU(), nn.Linear(inner, hidden))
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """`last_only`: queries from the last position only (every key still attended), [B, 1, d] out."""
        B, L, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if last_only:
            q, allowed, x, L = q[:, :, -1:], allowed[:, :, -1:], x[:, -1:], 1
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(B, L, d)))
        return x + self.drop(self.ff(self.ln2(x)))


class Encoder(nn.Module):
    """[B, L, d] item embeddings + [B, L] validity -> [B, L, d] contextual states (zero at padding).

    `inner` is the feed-forward width: d in SASRec's paper, 4d in BERT4Rec's.
    """

    def __init__(self, hidden: int, inner: int, blocks: int, heads: int, dropout: float, max_len: int, causal: bool):
        super().__init__()
        self.causal = causal
        self.pos = nn.Embedding(max_len, hidden)
        init_embedding(self.pos)
        self.drop = Dropout(dropout)
        self.blocks = nn.ModuleList(Block(hidden, inner, heads, dropout) for _ in range(blocks))
        self.ln = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor, valid: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """`last_only`: only the last position's state, [B, 1, d]; the last block then computes one
        query per sequence, which is all a user representation reads (a third less work at eval)."""
        L = x.shape[1]
        keep = valid[..., None].to(x.dtype)
        h = self.drop(x + self.pos(torch.arange(L - 1, -1, -1, device=x.device))) * keep
        allowed = valid[:, None, None, :]  # [B, 1, 1(query), L(key)]
        if self.causal:
            allowed = allowed & torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        # every query may see itself, so padded rows never softmax over nothing (NaN)
        allowed = allowed | torch.eye(L, dtype=torch.bool, device=x.device)
        for i, block in enumerate(self.blocks):
            last = last_only and i == len(self.blocks) - 1
            h = block(h, allowed, last) * (keep[:, -1:] if last else keep)
        return self.ln(h) * (keep[:, -1:] if last_only else keep)
