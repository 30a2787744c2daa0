"""AlphaRec (Sheng et al., 2024): no ID embeddings; item vectors are an MLP of the titles' language
embeddings, users start as the mean language embedding of their train items, both are propagated
over the train graph, and training is InfoNCE on cosine similarity / `cf.tau`.

Scores are cos / tau (the logits the model is trained on), so as a TCA teacher its softmax is the
model's own. Negatives are every item (a full softmax), not the paper's sampled ones. The text
vectors (`text_emb` stage) are centered before use: raw decoder states are anisotropic.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tca.cf.graph import GraphCF
from tca.cf.lightgcn import interacted
from tca.errors import TcaError


def centered_text(vectors: np.ndarray, n_items: int, what: str) -> torch.Tensor:
    """[n_rows, D] language vectors -> float tensor minus the mean of rows 1.., re-normalized; row 0 zeros."""
    if vectors.ndim != 2 or vectors.shape[0] < n_items + 1:
        raise TcaError(f"{what}: expected [>= {n_items + 1}, D] vectors, got {list(vectors.shape)}; rerun the stage that writes it")
    t = torch.from_numpy(np.asarray(vectors, dtype=np.float32))
    t = F.normalize(t - t[1:].mean(0), dim=-1)
    t[0] = 0
    return t


def mlp(dim_in: int, dim_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim_in, dim_out * 4), nn.LeakyReLU(), nn.Linear(dim_out * 4, dim_out))


class AlphaRec(GraphCF):
    needs = ("text_emb",)

    def __init__(self, n_items: int, cfg):
        super().__init__(n_items, cfg)
        self.register_buffer("text", torch.zeros(n_items + 1, 0))
        self.mlp: nn.Module | None = None

    def prepare(self, train, inputs: dict) -> None:
        self.set_text(centered_text(inputs["text_emb"], self.n_items, "text_emb/items.npy")[: self.n_items + 1])
        super().prepare(train, inputs)

    def set_text(self, text: torch.Tensor) -> None:
        self.text = text
        self.mlp = mlp(text.shape[1], self.cfg.hidden)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self.set_text(state_dict["text"])
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def layer0(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Users: the MLP of the mean text of their train items (row-normalized user-item matrix)."""
        if self.mlp is None:
            raise TcaError("AlphaRec has no text vectors: call prepare(train, {'text_emb': ...}) first")
        degree = torch.bincount(self.edge_user, minlength=self.n_users + 1).clamp(min=1).float()
        mean = torch.sparse_coo_tensor(torch.stack([self.edge_user, self.edge_item]), 1.0 / degree[self.edge_user],
                                       (self.n_users + 1, self.n_items + 1), check_invariants=True)
        return self.mlp(torch.sparse.mm(mean, self.text)), self.mlp(self.text)

    def encode_users(self, history: torch.Tensor, users: torch.Tensor | None = None) -> torch.Tensor:
        return F.normalize(super().encode_users(history, users), dim=-1) / self.cfg.tau

    def item_embeddings(self) -> torch.Tensor:
        return F.normalize(self.propagated()[1], dim=-1)

    def calculate_loss(self, batch: dict) -> torch.Tensor:
        """InfoNCE: each positive (history items and target) against every item, on cos / tau."""
        users, _, items = self.batch_vectors(batch)
        rows, positives = interacted(batch, self.cfg.max_len)
        logits = F.normalize(users, dim=-1)[rows] @ F.normalize(items[1:], dim=-1).T / self.cfg.tau
        return F.cross_entropy(logits, positives - 1)
