"""BERT4Rec (Sun et al., 2019): bidirectional encoder trained to fill masked items.

The sequence is the history plus one more slot: the target in training (masked at random with
the other items), a [MASK] token at inference, whose output state is the user representation.
A share `cf.mask_target` of the training sequences masks the target slot alone: the inference
task, which random masking of 20% of the items poses only for a fifth of the targets. With
`cf.objective: last` an epoch is every train sample (history + target), as SASRec's.
"""
from __future__ import annotations

import torch
from torch import nn

from tca.cf.base import CFConfig, CFModel
from tca.cf.loss import next_item_loss
from tca.cf.transformer import Encoder, init_embedding


class BERT4Rec(CFModel):
    def __init__(self, n_items: int, cfg: CFConfig):
        super().__init__(n_items, cfg)
        self.mask_id = n_items + 1
        self.every_sample = cfg.objective == "last"
        self.item_emb = nn.Embedding(n_items + 2, cfg.hidden, padding_idx=0)
        init_embedding(self.item_emb)
        self.encoder = Encoder(cfg.hidden, cfg.inner or 4 * cfg.hidden, cfg.blocks, cfg.heads, cfg.dropout, cfg.max_len + 1, causal=False)
        self.head = nn.Sequential(nn.Linear(cfg.hidden, cfg.hidden), nn.GELU(), nn.LayerNorm(cfg.hidden))

    def states(self, seq: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        return self.head(self.encoder(self.item_emb(seq), seq > 0, last_only))

    def with_slot(self, history: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        return torch.cat([history[:, -self.cfg.max_len :], last[:, None]], dim=1)

    def encode_users(self, history: torch.Tensor) -> torch.Tensor:
        return self.states(self.with_slot(history, torch.full_like(history[:, 0], self.mask_id)), last_only=True)[:, -1]

    def item_embeddings(self) -> torch.Tensor:
        return self.item_emb.weight[: self.n_items + 1]

    def calculate_loss(self, batch: dict) -> torch.Tensor:
        seq = self.with_slot(batch["history"], batch["target"])
        masked = (torch.rand(seq.shape, device=seq.device) < self.cfg.mask_prob) & (seq > 0)
        target_only = torch.rand(len(seq), device=seq.device) < self.cfg.mask_target
        masked &= ~target_only[:, None]
        masked[:, -1] |= target_only | ~masked.any(dim=1)  # at least one masked item per sequence: the target
        states = self.states(torch.where(masked, self.mask_id, seq))
        return next_item_loss(states[masked], seq[masked], self.item_embeddings(), self.cfg.loss, self.cfg.label_smoothing)
