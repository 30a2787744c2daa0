"""LightGCN (He et al., 2020): ID embeddings smoothed over the train user-item graph, BPR loss."""
from __future__ import annotations

import torch
from torch import nn

from tca.cf.graph import GraphCF
from tca.cf.loss import next_item_loss


def interacted(batch: dict, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row of the batch [M], item [M]) of every positive of a batch: its history items and target.

    A non-sequential model learns from each (user, item) interaction; the epoch's windows tile each
    user's train sequence, so this makes every interaction a positive about once per epoch."""
    items = torch.cat([batch["history"][:, -max_len:], batch["target"][:, None]], dim=1)
    keep = items > 0
    rows = torch.arange(len(items), device=items.device)[:, None].expand_as(items)
    return rows[keep], items[keep]


class LightGCN(GraphCF):
    def __init__(self, n_items: int, cfg):
        super().__init__(n_items, cfg)
        self.item_emb = nn.Embedding(n_items + 1, cfg.hidden, padding_idx=0)
        nn.init.normal_(self.item_emb.weight[1:], std=cfg.hidden**-0.5)
        self.user_emb = nn.Embedding(1, cfg.hidden)

    def build_users(self, n_users: int) -> None:
        self.user_emb = nn.Embedding(n_users + 1, self.cfg.hidden).to(self.item_emb.weight.device)
        nn.init.normal_(self.user_emb.weight, std=self.cfg.hidden**-0.5)

    def layer0(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user_emb.weight, self.item_emb.weight

    def recommendation_loss(self, batch: dict, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """`cf.loss` (bpr: the paper's) of user vectors [B, d] against every positive of the batch."""
        rows, positives = interacted(batch, self.cfg.max_len)
        return next_item_loss(users[rows], positives, items, self.cfg.loss)

    def calculate_loss(self, batch: dict) -> torch.Tensor:
        users, _, items = self.batch_vectors(batch)
        return self.recommendation_loss(batch, users, items)
