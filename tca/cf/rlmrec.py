"""RLMRec (Ren et al., 2024), its contrastive variant: LightGCN whose propagated user and item vectors
are aligned, by InfoNCE with in-batch negatives, with an MLP of the language embeddings of
LLM-written user and item profiles (the `profiles` stage). Scoring is LightGCN's.

The paper wrote the profiles with a far larger LLM (GPT-3.5); ours come from the embedded
SmolLM2-135M, so the semantic signal is much weaker. The profile vectors are only a training
signal: they are not kept in the checkpoint.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tca.cf.alpharec import centered_text, mlp
from tca.cf.lightgcn import LightGCN, interacted
from tca.errors import TcaError


def info_nce(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """Row i of a and row i of b are a pair; the other rows of b are its negatives (cosine / tau)."""
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / tau
    return F.cross_entropy(logits, torch.arange(len(a), device=a.device))


class RLMRec(LightGCN):
    needs = ("user_profiles", "item_profiles")

    def prepare(self, train, inputs: dict) -> None:
        super().prepare(train, inputs)
        users = inputs["user_profiles"]
        if users.shape[0] < self.n_users + 1:
            raise TcaError(f"profiles/users.npy has {users.shape[0]} rows; the train split has user ids up to {self.n_users}; rerun the profiles stage")
        self.register_buffer("user_profile", centered_text(users[: self.n_users + 1], self.n_users, "profiles/users.npy"), persistent=False)
        self.register_buffer("item_profile", centered_text(inputs["item_profiles"], self.n_items, "profiles/items.npy")[: self.n_items + 1], persistent=False)
        self.user_mlp = mlp(self.user_profile.shape[1], self.cfg.hidden)
        self.item_mlp = mlp(self.item_profile.shape[1], self.cfg.hidden)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """The profile MLPs only shape training: a prepared model (training keeps its best state
        this way) loads them; one rebuilt from a checkpoint, without profiles, scores without them."""
        if not hasattr(self, "user_mlp"):
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(("user_mlp.", "item_mlp."))}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def calculate_loss(self, batch: dict) -> torch.Tensor:
        """cf.loss (bpr in the paper) + align_weight * (user + item InfoNCE against their profiles)."""
        user_table, items = self.propagated()
        users = self.user_vectors(user_table, items, batch["history"], batch.get("user"))
        return self.recommendation_loss(batch, users, items) + self.cfg.align_weight * self.alignment_loss(batch, user_table, items)

    def alignment_loss(self, batch: dict, user_table: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """InfoNCE of the batch's distinct items (and known users) against their projected profiles."""
        iid = torch.unique(interacted(batch, self.cfg.max_len)[1])
        align = info_nce(items[iid], self.item_mlp(self.item_profile[iid]), self.cfg.align_tau)
        if "user" in batch:
            uid = torch.unique(batch["user"][self.known(batch["user"])])
            align = align + info_nce(user_table[uid], self.user_mlp(self.user_profile[uid]), self.cfg.align_tau)
        return align
