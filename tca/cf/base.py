"""The one interface every CF model implements, so that "any CF model" plugs into TCA4Rec.

Input convention: a history is a LongTensor [B, L] of item ids, LEFT-padded with 0, the most
recent item in the last column. Left padding puts every user's latest item at the same column,
which is where causal and masked encoders read the user representation; models count positions
from the right, so extra left padding never changes a score. `pad_histories` turns a list
column (oldest first) into that tensor.

Models that learn a vector per user (LightGCN, AlphaRec, RLMRec) also take `users`, a LongTensor
[B] of the data artifact's user ids (0 = unknown); called with a history only (as cf_dist, the
hybrid prompts and `tca recommend` do), they fall back to a representation of the history.
Sequential models (and plugins written as `encode_users(history)`) are never passed `users`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass

import numpy as np
import polars as pl
import torch
from torch import nn

from tca.config import check_keys
from tca.errors import TcaError

LR_SCHEDULES = ("constant", "cosine")
OBJECTIVES = ("all", "last")


@dataclass
class CFConfig:
    """The `cf:` param section: which model, its size, its loss and how it is trained."""

    model: str = "sasrec"  # registered name or module:Class
    loss: str = "ce"  # ce: full softmax over items | bce / bpr: one sampled negative per positive
    hidden: int = 64
    blocks: int = 2
    heads: int = 1
    dropout: float = 0.5
    max_len: int = 10  # most recent history items the model reads
    inner: int = 0  # transformers' feed-forward width; 0: the model's own (SASRec hidden, BERT4Rec 4 x hidden)
    mask_prob: float = 0.2  # BERT4Rec: share of items masked in training
    mask_target: float = 0.5  # BERT4Rec: share of training sequences that mask the target slot only
    objective: str = "last"  # SASRec, BERT4Rec. last: every train sample (SASRec: its target only) | all: every position of every 10th window
    prefixes: bool = True  # models that train on every sample (SASRec, BERT4Rec, objective last): also each user's first items as targets
    label_smoothing: float = 0.3  # SASRec, BERT4Rec, loss ce: share of each label's mass spread evenly over all items
    lr: float = 2e-3
    lr_schedule: str = "cosine"  # constant | cosine: from lr down to 0 over max_epochs, step by step
    batch_size: int = 256
    max_epochs: int = 24
    patience: int = 30  # epochs without a better valid NDCG@10 before stopping (>= max_epochs: never)
    seed: int = 42
    train_fraction: float = 1.0  # share of the train split it trains on (whole users, seeded by `seed`)
    layers: int = 3  # graph models: propagation layers over the train user-item graph
    tau: float = 0.15  # alpharec: InfoNCE temperature on cosine similarities (scores are cos / tau)
    align_weight: float = 0.1  # rlmrec: weight of the contrastive CF <-> profile alignment loss
    align_tau: float = 0.2  # rlmrec: temperature of that alignment loss

    @classmethod
    def from_params(cls, params: dict) -> "CFConfig":
        check_keys(cls, params, "cf")
        cfg = cls(**params)
        if cfg.loss not in ("ce", "bce", "bpr"):
            raise TcaError(f"cf.loss: {cfg.loss!r} is not a loss; use ce, bce or bpr")
        if cfg.lr_schedule not in LR_SCHEDULES:
            raise TcaError(f"cf.lr_schedule: {cfg.lr_schedule!r} is not a schedule; use {' or '.join(LR_SCHEDULES)}")
        if cfg.objective not in OBJECTIVES:
            raise TcaError(f"cf.objective: {cfg.objective!r} is not an objective; use {' or '.join(OBJECTIVES)}")
        if cfg.hidden % cfg.heads:
            raise TcaError(f"cf.hidden ({cfg.hidden}) must be a multiple of cf.heads ({cfg.heads})")
        if not 0 < cfg.mask_prob <= 1:
            raise TcaError(f"cf.mask_prob: {cfg.mask_prob} must be in (0, 1]")
        if not 0 <= cfg.mask_target <= 1:
            raise TcaError(f"cf.mask_target: {cfg.mask_target} must be in [0, 1]")
        if not 0 < cfg.train_fraction <= 1:
            raise TcaError(f"cf.train_fraction: {cfg.train_fraction} must be in (0, 1] (1 = the whole train split)")
        if cfg.layers < 0 or cfg.tau <= 0 or cfg.align_tau <= 0 or cfg.align_weight < 0:
            raise TcaError("cf.layers must be >= 0, cf.tau and cf.align_tau > 0, cf.align_weight >= 0")
        if not 0 <= cfg.label_smoothing < 1:
            raise TcaError(f"cf.label_smoothing: {cfg.label_smoothing} must be in [0, 1) (0: plain cross-entropy)")
        if cfg.inner < 0:
            raise TcaError(f"cf.inner: {cfg.inner} must be >= 0 (0: the model's own width)")
        for key in ("hidden", "blocks", "heads", "max_len", "batch_size", "max_epochs", "patience"):
            if getattr(cfg, key) < 1:
                raise TcaError(f"cf.{key}: {getattr(cfg, key)} must be >= 1")
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)


def pad_histories(histories, max_len: int) -> torch.Tensor:
    """List column (oldest first) -> LongTensor [B, max_len], left-padded with 0, last max_len items kept."""
    s = histories if isinstance(histories, pl.Series) else pl.Series(list(histories), dtype=pl.List(pl.Int64))
    s = s.list.tail(max_len)
    lens = s.list.len().fill_null(0).to_numpy().astype(np.int64)
    flat = s.explode().drop_nulls().to_numpy()
    if len(flat) != lens.sum():
        raise TcaError("history lists contain null item ids; rerun the data stage")
    row = np.repeat(np.arange(len(lens)), lens)
    offset_in_row = np.arange(len(flat)) - np.repeat(np.cumsum(lens) - lens, lens)
    out = np.zeros((len(lens), max_len), dtype=np.int64)
    out[row, max_len - lens[row] + offset_in_row] = flat
    return torch.from_numpy(out)


class CFModel(nn.Module, ABC):
    """A CF model TCA4Rec can learn from: a user vector from a history, item vectors, scores.

    Built as `Class(n_items, cfg)`, then `prepare(train, inputs)` once before training. A batch is
    `{"history": [B, L] left-padded, "target": [B]}` plus `"user": [B]` when the split has user ids.
    Column 0 of `score` (padding) is -inf so it is never recommended.
    """

    needs: tuple[str, ...] = ()  # side inputs `prepare` wants, by name (see pipeline/side_inputs.py)
    every_sample: bool = False  # an epoch is every train sample, not one window per history length (Samples.windows)
    uses_users: bool = False  # learns a vector per user: callers pass user ids when they have them

    def __init__(self, n_items: int, cfg: CFConfig):
        super().__init__()
        self.n_items = n_items
        self.cfg = cfg

    def prepare(self, train, inputs: dict) -> None:
        """Called once with the train split (`tca.cf.train.Samples`) and the side inputs named in
        `needs` (numpy arrays) before training; graph models build their graph here."""

    @abstractmethod
    def encode_users(self, history: torch.Tensor, users: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L] left-padded history (and optional [B] user ids) -> [B, d] user representation."""

    @abstractmethod
    def item_embeddings(self) -> torch.Tensor:
        """[N+1, d] item representations; row 0 is padding."""

    @abstractmethod
    def calculate_loss(self, batch: dict) -> torch.Tensor:
        """Scalar training loss of one batch."""

    def score(self, history: torch.Tensor, users: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N+1] scores of every item (dot product); the padding column is -inf."""
        scores = score_samples(self, history, users, encode=True) @ self.item_embeddings().T
        scores[:, 0] = float("-inf")
        return scores

    def forward(self, history: torch.Tensor, users: torch.Tensor | None = None) -> torch.Tensor:
        """RecBole-style: the user representation, i.e. `encode_users`."""
        return score_samples(self, history, users, encode=True)

    def full_sort_predict(self, batch: dict) -> torch.Tensor:
        """RecBole-style: scores of all items for a batch."""
        return self.score(batch["history"], batch.get("user"))


def score_samples(model: CFModel, history: torch.Tensor, users: torch.Tensor | None = None, encode: bool = False) -> torch.Tensor:
    """`model.score` (or `encode_users` when `encode`) with the samples' user ids for a model that
    uses them, with the history only for any other (so plugins written as `score(history)` work)."""
    fn = model.encode_users if encode else model.score
    return fn(history, users) if users is not None and model.uses_users else fn(history)
