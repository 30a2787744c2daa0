"""The item trie over target token ids, stored as flat CSR arrays.

Items are sorted lexicographically by their target ids (title + EOS), so every trie node covers
a contiguous range [node_lo, node_hi) of the sorted items and its children split that range.
Ranges let the collaborative tokenizer sum CF probabilities per child without per-item pointers,
and flat arrays let kernels (Numba) and vectorized decoding read the trie without Python objects.
Node 0 is the root; nodes are numbered breadth-first, so a node's children are consecutive.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path

import numpy as np
import polars as pl

from tca.errors import TcaError
from tca.ragged import concat_ranges, pad


def template_parts(template: str) -> tuple[str, str]:
    """The text of `prompt.target_template` before and after its one `{title}`."""
    try:
        prefix, suffix = template.format(title="\0").split("\0")
    except (KeyError, IndexError, ValueError) as e:
        raise TcaError(f"prompt.target_template: {template!r} must contain {{title}} once and no other field ({e})") from e
    return prefix, suffix


def target_ids(tokenizer, titles: pl.Series, template: str = "{title}") -> pl.Series:
    """Each title through `template`, tokenized without special tokens, EOS appended: list[int32].

    These exact ids are both the LLM's training targets and the trie's paths.
    """
    prefix, suffix = template_parts(template)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TcaError("the tokenizer of the model stage defines no EOS token; targets need one to end")
    texts = pl.concat_str([pl.lit(prefix), titles.cast(pl.String), pl.lit(suffix)], ignore_nulls=False)
    ids = pl.Series(tokenizer(pl.select(texts).to_series().to_list(), add_special_tokens=False)["input_ids"], dtype=pl.List(pl.Int32))
    has_eos = ids.list.contains(eos)
    if has_eos.any():
        i = int(np.flatnonzero(has_eos.to_numpy())[0])
        raise TcaError(f"title {titles[i]!r} tokenizes to the EOS token; remove {tokenizer.eos_token!r} from it in the data stage")
    return ids.list.concat(pl.lit([eos], dtype=pl.List(pl.Int32)))


@dataclass(frozen=True, eq=False)
class Trie:
    child_ptr: np.ndarray  # int64 [n_nodes + 1]: node n's edges are child_ptr[n]:child_ptr[n + 1]
    child_token: np.ndarray  # int32 [n_edges]: the token on each edge, increasing within a node
    child_node: np.ndarray  # int32 [n_edges]: the node each edge leads to
    node_lo: np.ndarray  # int32 [n_nodes]: first sorted item under the node
    node_hi: np.ndarray  # int32 [n_nodes]: one past the last sorted item under the node
    item_order: np.ndarray  # int32 [n_items]: item ids in lexicographic order of their target ids

    @property
    def n_nodes(self) -> int:
        return len(self.node_lo)

    @cached_property
    def item_rank(self) -> np.ndarray:
        """int64 [max item id + 1]: position of each item in `item_order` (-1 for ids not in the trie)."""
        rank = np.full(int(self.item_order.max(initial=0)) + 1, -1, dtype=np.int64)
        rank[self.item_order] = np.arange(len(self.item_order))
        return rank

    @cached_property
    def _edge_key(self) -> np.ndarray:
        """parent * n_tokens + token per edge: globally sorted, so one searchsorted finds any edge."""
        parent = np.repeat(np.arange(self.n_nodes, dtype=np.int64), np.diff(self.child_ptr))
        return parent * self._n_tokens + self.child_token

    @cached_property
    def _n_tokens(self) -> int:
        return int(self.child_token.max(initial=0)) + 1

    def is_leaf(self, nodes: np.ndarray) -> np.ndarray:
        return self.child_ptr[np.asarray(nodes) + 1] == self.child_ptr[nodes]

    def step(self, nodes: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """The child of each node along each token, -1 where there is none (or the node is -1)."""
        nodes, tokens = np.asarray(nodes, dtype=np.int64), np.asarray(tokens, dtype=np.int64)
        valid = (nodes >= 0) & (tokens >= 0) & (tokens < self._n_tokens)
        key = np.where(valid, nodes * self._n_tokens + tokens, -1)
        edge = np.minimum(np.searchsorted(self._edge_key, key), len(self._edge_key) - 1)
        found = valid & (self._edge_key[edge] == key)
        return np.where(found, self.child_node[edge], -1)

    def paths(self, tokens: np.ndarray) -> np.ndarray:
        """[B, L] token ids (padded with -1) -> [B, L + 1] nodes n_0 = root, n_t = child of n_{t-1} along y_t; -1 off the trie."""
        tokens = np.asarray(tokens)
        out = np.full((tokens.shape[0], tokens.shape[1] + 1), -1, dtype=np.int64)
        out[:, 0] = 0
        for t in range(tokens.shape[1]):  # one vectorized step per position
            out[:, t + 1] = self.step(out[:, t], tokens[:, t])
        return out

    def leaf_items(self, leaf: int) -> np.ndarray:
        """The item ids that end at this leaf (several only when their target ids are identical)."""
        return self.item_order[self.node_lo[leaf] : self.node_hi[leaf]]

    def depths(self) -> np.ndarray:
        """int64 [n_nodes]: the length of each node's prefix, level by level from the root."""
        depth = np.zeros(self.n_nodes, dtype=np.int64)
        level, d = np.zeros(1, dtype=np.int64), 0
        while len(level):
            depth[level] = d
            start = self.child_ptr[level]
            level, d = self.child_node[concat_ranges(start, self.child_ptr[level + 1] - start)], d + 1
        return depth

    def stats(self) -> dict:
        leaves = np.flatnonzero(self.is_leaf(np.arange(self.n_nodes)))
        per_leaf = self.node_hi[leaves] - self.node_lo[leaves]
        return {
            "items": len(self.item_order),
            "nodes": self.n_nodes,
            "leaves": len(leaves),
            "max_depth": int(self.depths().max()),
            "root_branching": int(self.child_ptr[1] - self.child_ptr[0]),
            "items_per_leaf_mean": float(per_leaf.mean()),
            "items_per_leaf_max": int(per_leaf.max()),
        }

    def digest(self) -> str:
        """sha256 of the arrays: names the exact trie a cf_dist artifact was computed against."""
        h = hashlib.sha256()
        for f in fields(self):
            a = np.ascontiguousarray(getattr(self, f.name))
            h.update(f"{f.name}:{a.dtype.str}:{a.shape}".encode())
            h.update(a.tobytes())
        return h.hexdigest()

    def save(self, path: Path) -> None:
        np.savez(path, **{f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def load(cls, path: Path) -> "Trie":
        with np.load(path) as z:
            return cls(**{f.name: z[f.name] for f in fields(cls)})


def build_trie(item_ids: np.ndarray, targets: pl.Series) -> Trie:
    """CSR trie of the items' target id sequences (list[int]), built with array ops only.

    Sorted rows that share a prefix are adjacent, so a node of depth k+1 starts at every row whose
    first k+1 ids differ from the previous row's and ends where the next such row starts.
    """
    item_ids = np.asarray(item_ids, dtype=np.int32)
    lengths = targets.list.len().to_numpy().astype(np.int64)
    if len(item_ids) == 0 or len(np.unique(item_ids)) != len(item_ids) or lengths.min() < 1:
        raise TcaError("the trie needs at least one item, unique item ids and a non-empty target per item")
    seq = pad(targets.explode().to_numpy().astype(np.int64), lengths, fill=-1)  # -1 sorts before any token
    n, width = seq.shape
    order = np.lexsort((item_ids, *seq.T[::-1]))  # lexicographic by ids, ties by item id
    seq, lengths, item_ids = seq[order], lengths[order], item_ids[order]

    differs = seq[1:] != seq[:-1]
    first_diff = np.concatenate([[0], np.where(differs.any(axis=1), differs.argmax(axis=1), width)])
    prefix = (first_diff[1:] == lengths[:-1]) & (lengths[:-1] < width)  # row r-1 is a proper prefix of row r
    if prefix.any():
        r = int(np.flatnonzero(prefix)[0])
        raise TcaError(f"the target ids of item {item_ids[r]} are a prefix of item {item_ids[r + 1]}'s; every target must end with EOS")

    depth = np.arange(width)[:, None]  # k: a node of depth k+1 is the prefix seq[r, :k+1]
    node_k, node_r = np.nonzero((first_diff <= depth) & (lengths > depth))  # breadth-first order
    stride = n + 1  # key k * stride + r orders (depth, row) pairs
    key = node_k * stride + node_r
    bound_k, bound_r = np.nonzero(first_diff <= depth)
    bounds = np.sort(np.concatenate([bound_k * stride + bound_r, np.arange(width) * stride + n]))
    hi = bounds[np.searchsorted(bounds, key, side="right")] - node_k * stride
    parent = np.searchsorted(key, (node_k - 1) * stride + node_r, side="right")  # 0 = root, i = i-th node (id i)

    n_nodes = len(key) + 1
    return Trie(
        child_ptr=np.concatenate([[0], np.cumsum(np.bincount(parent, minlength=n_nodes))]).astype(np.int64),
        child_token=seq[node_r, node_k].astype(np.int32),
        child_node=np.arange(1, n_nodes, dtype=np.int32),
        node_lo=np.concatenate([[0], node_r]).astype(np.int32),
        node_hi=np.concatenate([[n], hi]).astype(np.int32),
        item_order=item_ids,
    )
