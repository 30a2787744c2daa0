"""The collaborative tokenizer: CF item scores -> sparse per-position token distributions q_t.

For a sample with gold item g, position t of g's target ids has candidates C_t (the items whose
ids start with y_<t); q_t puts on each next token v the CF softmax mass (over C_t) of the items
whose next id is v. That turns an item-level CF model into token-level soft labels for the LLM.
Scores come from the CF model in torch batches, in the trie's sorted item order (what the
kernel sweeps); the per-sample walk is a Numba kernel.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from tca.cf import CFModel, pad_histories
from tca.cf.base import score_samples
from tca.errors import TcaError
from tca.collab.kernels import count_entries, fill_entries
from tca.collab.trie import Trie

CF_SOURCES = ("model", "uniform")


@dataclass(frozen=True)
class CollabConfig:
    temperature: float = 1.0  # tau of the CF softmax; -> 0 puts all mass on the CF argmax path
    top_k: int = 0  # keep the k largest entries per position (and the gold token); 0 keeps all
    cf_source: str = "model"  # model | uniform (uniform over children: the paper's "w/o CT")
    exclude_history: bool = False  # drop the sample's history items (but its gold) from C_t before normalizing

    def __post_init__(self):
        if not self.temperature > 0:
            raise TcaError(f"tca.temperature: {self.temperature} must be > 0")
        if self.top_k < 0:
            raise TcaError(f"tca.top_k: {self.top_k} must be >= 0 (0 keeps every child)")
        if self.cf_source not in CF_SOURCES:
            raise TcaError(f"tca.cf_source: {self.cf_source!r} is not one of {', '.join(CF_SOURCES)}")


@dataclass
class TokenDist:
    """q_t of a batch as CSR: samples -> positions -> entries (tokens ascending within a position)."""

    sample_ptr: np.ndarray  # int64 [B + 1]: sample b's positions are sample_ptr[b]:sample_ptr[b + 1]
    pos_ptr: np.ndarray  # int64 [P + 1]: position p's entries are pos_ptr[p]:pos_ptr[p + 1]
    token: np.ndarray  # int32 [nnz]
    prob: np.ndarray  # float32 [nnz]
    dropped: np.ndarray  # float64 [P]: mass top_k removed before renormalizing (0 without top_k)


def token_dist(trie: Trie, items: np.ndarray, scores: torch.Tensor | None, cfg: CollabConfig, trie_order: bool = False) -> TokenDist:
    """q_t for every position of every sample (gold items `items`). scores: CF scores [B, N+1] by
    item id, or [B, N] in trie.item_order when `trie_order` (as `trie_scorer` gives them); None if uniform."""
    items = np.asarray(items, dtype=np.int64)
    rank = trie.item_rank[np.clip(items, 0, len(trie.item_rank) - 1)]
    missing = (items < 0) | (items >= len(trie.item_rank)) | (rank < 0)
    if missing.any():
        raise TcaError(f"item id {items[missing][0]} is not in the trie; rerun the trie stage on the same data")
    uniform = cfg.cf_source == "uniform"
    if uniform:
        scores = np.zeros((len(items), 0), dtype=np.float32)
    else:
        scores = torch.as_tensor(scores).detach()
        top_id = int(trie.item_order.max())
        fits = scores.shape[1] == len(trie.item_order) if trie_order else scores.shape[1] > top_id
        if scores.ndim != 2 or scores.shape[0] != len(items) or not fits:
            cover = f"the {len(trie.item_order)} trie items in trie order" if trie_order else f"item ids 0..{top_id}"
            raise TcaError(f"CF scores of shape {tuple(scores.shape)} do not cover {len(items)} samples x {cover}; "
                           "the CF model and the trie come from different data: rerun the cf and trie stages")
        if not trie_order:
            scores = scores[:, torch.from_numpy(trie.item_order.astype(np.int64)).to(scores.device)]
        scores = np.ascontiguousarray(scores.float().cpu().numpy())  # one compiled signature
    n_pos, n_ent = count_entries(rank, cfg.top_k, trie.child_ptr, trie.child_node, trie.node_hi)
    pos_start, ent_start = np.cumsum(n_pos) - n_pos, np.cumsum(n_ent) - n_ent
    pos_end = np.empty(n_pos.sum(), dtype=np.int64)
    token = np.empty(n_ent.sum(), dtype=np.int32)
    prob = np.empty(n_ent.sum(), dtype=np.float32)
    dropped = np.empty(n_pos.sum(), dtype=np.float64)
    bad = np.zeros(len(items), dtype=np.bool_)
    fill_entries(
        scores, rank, pos_start, ent_start, 1.0 / cfg.temperature, uniform, cfg.top_k,
        trie.child_ptr, trie.child_token, trie.child_node, trie.node_lo, trie.node_hi,
        pos_end, token, prob, dropped, bad,
    )  # fmt: skip
    if bad.any():
        raise TcaError("the CF model returned NaN or infinite scores for some items; retrain it (the cf stage)")
    return TokenDist(
        sample_ptr=np.concatenate([[0], np.cumsum(n_pos)]),
        pos_ptr=np.concatenate([[0], pos_end]),
        token=token,
        prob=prob,
        dropped=dropped,
    )


def trie_scorer(model: CFModel, trie: Trie, device: str = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """history [B, L] (and optional user ids [B]) -> CF scores [B, N] in trie.item_order, under no_grad. A model that keeps
    CFModel's dot-product `score` gets them from one matmul against its item vectors permuted once
    (no gather per batch); a model with its own `score` has that gathered into the order."""
    order = torch.from_numpy(trie.item_order.astype(np.int64)).to(device)
    dot = type(model).score is CFModel.score
    with torch.no_grad():
        items = model.item_embeddings()[order].T.contiguous() if dot else None  # [d, N]

    @torch.no_grad()
    def score(history: torch.Tensor, users: torch.Tensor | None = None) -> torch.Tensor:
        return score_samples(model, history, users, encode=True) @ items if dot else score_samples(model, history, users)[:, order]

    return score


EXCLUDED = 1000.0  # temperatures below a row's lowest score: exp underflows to exactly 0 in float64


def without_history(scores: torch.Tensor, history: pl.Series, items: np.ndarray, trie: Trie, temperature: float) -> torch.Tensor:
    """Scores [B, N] in trie order with each sample's history items (other than its gold item) pushed
    `EXCLUDED` temperatures below the row's lowest score: they get no mass in any p_t, so the teacher
    does not teach recommending what the user already has."""
    lengths = history.list.len().to_numpy().astype(np.int64)
    hist = history.explode().drop_nulls().to_numpy().astype(np.int64)
    row = np.repeat(np.arange(len(lengths)), lengths)
    drop = hist != np.repeat(np.asarray(items, dtype=np.int64), lengths)
    out = scores.clone()
    floor = out.masked_fill(~out.isfinite(), float("inf")).min(dim=1).values - EXCLUDED * temperature
    at_row = torch.from_numpy(row[drop]).to(out.device)
    out[at_row, torch.from_numpy(trie.item_rank[hist[drop]].astype(np.int64)).to(out.device)] = floor[at_row]
    return out


def stream_token_dist(
    trie: Trie, batches: Iterable[pl.DataFrame], model: CFModel | None, cfg: CollabConfig, device: str = "cpu"
) -> Iterator[tuple[np.ndarray, TokenDist]]:
    """(sample ids, q_t) per batch of samples (`sample_id`, `history`, `item_id`), CF-scored under no_grad."""
    score = trie_scorer(model, trie, device) if cfg.cf_source == "model" else None
    for df in batches:
        users = torch.from_numpy(df["user_id"].to_numpy().astype("int64")).to(device) if "user_id" in df.columns else None
        scores = None if score is None else score(pad_histories(df["history"], model.cfg.max_len).to(device), users)
        if scores is not None and cfg.exclude_history:
            scores = without_history(scores, df["history"], df["item_id"].to_numpy(), trie, cfg.temperature)
        yield df["sample_id"].to_numpy(), token_dist(trie, df["item_id"].to_numpy(), scores, cfg, trie_order=True)
