"""What LightGCN, AlphaRec and RLMRec share: the train user-item graph and its propagation.

The graph is the train split's interactions: every (user, item) pair among the samples' targets
and history items (a history precedes its target, so no valid/test interaction leaks in). It is
kept as two edge buffers, saved in the checkpoint; the normalized adjacency D^-1/2 A D^-1/2 of
the bipartite graph is a sparse torch tensor rebuilt from them (never a dense N x N matrix).
Propagated embeddings are LightGCN's: the mean of layers 0..K. In eval mode they are computed
once and cached until the next `train()` or `load_state_dict`.

Users: a sample whose user id has edges takes that user's propagated vector. Any other user
(unseen in train, id 0, or no ids given, as cf_dist and the LLM stages call `score(history)`)
falls back to the mean of the propagated vectors of its history items (its last `cf.max_len`);
a one-layer LightGCN user is a normalized sum of its items' vectors, so this folds the history
into the same space.
"""
from __future__ import annotations

from abc import abstractmethod

import torch

from tca.cf.base import CFModel
from tca.errors import TcaError


def graph_edges(user: torch.Tensor, history: torch.Tensor, target: torch.Tensor, n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique (user, item) pairs of the samples' targets and non-padding history items, sorted."""
    users = torch.cat([user[:, None].expand_as(history), user[:, None]], dim=1)
    items = torch.cat([history, target[:, None]], dim=1)
    keep = items > 0
    pairs = torch.unique(users[keep] * (n_items + 1) + items[keep])
    return pairs // (n_items + 1), pairs % (n_items + 1)


def normalized_adjacency(edge_user: torch.Tensor, edge_item: torch.Tensor, n_users: int, n_items: int) -> torch.Tensor:
    """Sparse symmetric D^-1/2 A D^-1/2 over n_users + 1 user nodes, then n_items + 1 item nodes."""
    n_nodes = n_users + 1 + n_items + 1
    u, i = edge_user, edge_item + n_users + 1
    rows, cols = torch.cat([u, i]), torch.cat([i, u])
    deg = torch.bincount(rows, minlength=n_nodes).float()
    values = (deg[rows] * deg[cols]).rsqrt()
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (n_nodes, n_nodes), check_invariants=True).coalesce()


class GraphCF(CFModel):
    """A CF model over the train user-item graph; subclasses give the layer-0 vectors and the loss."""

    uses_users = True

    def __init__(self, n_items: int, cfg):
        super().__init__(n_items, cfg)
        self.register_buffer("edge_user", torch.zeros(0, dtype=torch.long))
        self.register_buffer("edge_item", torch.zeros(0, dtype=torch.long))
        self.n_users = 0
        self._adj: torch.Tensor | None = None
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def prepare(self, train, inputs: dict) -> None:
        if train.user is None:
            raise TcaError(f"cf.model={self.cfg.model} needs user ids: the train split has no user_id column; rerun the data stage")
        self.set_graph(*graph_edges(train.user, train.history, train.target, self.n_items))

    def set_graph(self, edge_user: torch.Tensor, edge_item: torch.Tensor) -> None:
        """Install the graph; `n_users` = the largest user id in it (tables have n_users + 1 rows)."""
        self.edge_user, self.edge_item = edge_user.long(), edge_item.long()
        self.n_users = int(edge_user.max()) if len(edge_user) else 0
        self.build_users(self.n_users)
        self._adj, self._cache = None, None

    def build_users(self, n_users: int) -> None:
        """Create the per-user tables of a graph of n_users (called by `set_graph`, also on load)."""

    @abstractmethod
    def layer0(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer-0 vectors: users [n_users + 1, d], items [N + 1, d]."""

    def adjacency(self) -> torch.Tensor:
        if not len(self.edge_user):
            raise TcaError(f"{type(self).__name__} has no graph: call prepare(train, inputs) (train_cf does) before using it")
        if self._adj is None or self._adj.device != self.edge_user.device:
            self._adj = normalized_adjacency(self.edge_user, self.edge_item, self.n_users, self.n_items)
        return self._adj

    def propagated(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(users [n_users + 1, d], items [N + 1, d]) after `cfg.layers` rounds; item 0 is zeros."""
        if self._cache is not None and not self.training:
            return self._cache
        users, items = self.layer0()
        x = torch.cat([users, items])
        total = x
        adj = self.adjacency()
        for _ in range(self.cfg.layers):
            x = torch.sparse.mm(adj, x)
            total = total + x
        out = total / (self.cfg.layers + 1)
        users, items = out[: self.n_users + 1], out[self.n_users + 1 :]
        items = torch.cat([torch.zeros_like(items[:1]), items[1:]])
        if not self.training and not torch.is_grad_enabled():
            self._cache = (users, items)
        return users, items

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Size the graph and user tables from the checkpoint's edges, then load as usual."""
        self.set_graph(state_dict["edge_user"], state_dict["edge_item"])
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def known(self, users: torch.Tensor) -> torch.Tensor:
        """[B] bool: users with at least one train edge."""
        degree = torch.bincount(self.edge_user, minlength=self.n_users + 1) > 0
        inside = (users > 0) & (users <= self.n_users)
        return inside & degree[users.clamp(0, self.n_users)]

    def user_vectors(self, user_table: torch.Tensor, item_table: torch.Tensor, history: torch.Tensor,
                     users: torch.Tensor | None) -> torch.Tensor:
        """[B, d]: the user's row when known, else the mean of its history items' rows."""
        history = history[:, -self.cfg.max_len :]
        fallback = item_table[history].sum(1) / (history > 0).sum(1, keepdim=True).clamp(min=1)
        if users is None:
            return fallback
        known = self.known(users)
        return torch.where(known[:, None], user_table[users.clamp(0, self.n_users)], fallback)

    def encode_users(self, history: torch.Tensor, users: torch.Tensor | None = None) -> torch.Tensor:
        user_table, item_table = self.propagated()
        return self.user_vectors(user_table, item_table, history, users)

    def item_embeddings(self) -> torch.Tensor:
        return self.propagated()[1]

    def batch_vectors(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training: (user vectors [B, d], positive items [B], item table [N + 1, d]) of one batch,
        with gradients through the propagation."""
        user_table, item_table = self.propagated()
        return self.user_vectors(user_table, item_table, batch["history"], batch.get("user")), batch["target"], item_table
