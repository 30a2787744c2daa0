"""SASRec (Kang & McAuley, 2018): causal self-attention; the user is the state at the latest item."""
from __future__ import annotations

import torch
from torch import nn

from tca.cf.base import CFConfig, CFModel
from tca.cf.loss import next_item_loss
from tca.cf.transformer import Encoder, init_embedding


class SASRec(CFModel):
    def __init__(self, n_items: int, cfg: CFConfig):
        super().__init__(n_items, cfg)
        self.item_emb = nn.Embedding(n_items + 1, cfg.hidden, padding_idx=0)
        init_embedding(self.item_emb)
        self.encoder = Encoder(cfg.hidden, cfg.hidden, cfg.blocks, cfg.heads, cfg.dropout, cfg.max_len, causal=True)

    def states(self, history: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        return self.encoder(self.item_emb(history), history > 0, last_only)

    def encode_users(self, history: torch.Tensor) -> torch.Tensor:
        return self.states(history[:, -self.cfg.max_len :], last_only=True)[:, -1]

    def item_embeddings(self) -> torch.Tensor:
        return self.item_emb.weight

    def calculate_loss(self, batch: dict) -> torch.Tensor:
        """Every position predicts its next item: inputs = history, labels = history[1:] + target."""
        history = batch["history"][:, -self.cfg.max_len :]
        labels = torch.cat([history[:, 1:], batch["target"][:, None]], dim=1)
        at = (history > 0) & (labels > 0)
        return next_item_loss(self.states(history)[at], labels[at], self.item_emb.weight, self.cfg.loss)
