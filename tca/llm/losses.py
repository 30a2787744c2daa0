"""Soft-label alignment: the per-position losses of DESIGN.md "Soft-label alignment", sparse.

At a target position with logits z, gold token y and the collaborative distribution q (sparse):
- `tca` (soft NTP): L = -log sum_v y~(v) P(v), y~ = (1 - alpha) 1[v = y] + alpha q, computed as
  logsumexp(z) - logsumexp over y~'s entries of (z_v + log y~(v)); its logit gradient is
  P - y~ P / <y~, P>.
- `kl` (the paper's "w/o SA"): -log P(y) + alpha KL(q || P).
- `ntp` (TallRec): -log P(y); q is not read.
- MSL (`msl=True`): P is the softmax of z / msl_tau over the trie children of the position's node
  only; combines with each loss above.

Logits come as a matrix over *columns*: the whole vocabulary, or (MSL) only the tokens that are a
child of some position's node in the batch, so y~ and the MSL mask never take a [positions,
vocabulary] tensor. Losses are returned per position: the trainer sums them and divides by the
target tokens of the whole optimizer step, a token-weighted mean that gradient accumulation keeps.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tca.collab.store import SoftLabels
from tca.errors import TcaError
from tca.ragged import concat_ranges, pad
from tca.collab.trie import Trie

LOSSES = ("tca", "kl", "ntp")


@dataclass(frozen=True)
class LossConfig:
    loss: str = "tca"  # tca (soft NTP) | kl (NTP + alpha KL, "w/o SA") | ntp (q unused)
    alpha: float = 0.1  # weight of q in the soft label (tca) or of the KL term (kl)
    msl: bool = False  # softmax over the trie children only (MSL)
    msl_tau: float = 1.0  # MSL's temperature: P = softmax(z / msl_tau) over the children

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise TcaError(f"train.loss: {self.loss!r} is not one of {', '.join(LOSSES)}")
        if not 0 <= self.alpha <= 1:
            raise TcaError(f"tca.alpha: {self.alpha} must be in [0, 1]")
        if not self.msl_tau > 0:
            raise TcaError(f"train.msl_tau: {self.msl_tau} must be > 0")

    @property
    def uses_q(self) -> bool:
        return self.loss != "ntp"

    @property
    def decode_tau(self) -> float:
        """The temperature of the distribution trained over the trie children, which renormalized
        decoding must use too: msl_tau under MSL; 1 otherwise (the full softmax was trained)."""
        return self.msl_tau if self.msl else 1.0


@dataclass
class Labels:
    """The supervision of N target positions, as columns of the logit matrix."""

    gold: torch.Tensor  # int64 [N]: column of the gold token
    q_col: torch.Tensor | None  # int64 [N, K]: columns of q's entries (any valid column where padded); None for ntp
    q_prob: torch.Tensor | None  # float32 [N, K]: q, 0 where padded
    columns: torch.Tensor | None  # int64 [M]: token id of each column (MSL); None: column = token id, M = vocabulary
    allowed: torch.Tensor | None  # bool [N, M]: the columns that are children of the position's node (MSL)

    def to(self, device) -> "Labels":
        move = lambda t: None if t is None else t.to(device)
        return Labels(*(move(t) for t in (self.gold, self.q_col, self.q_prob, self.columns, self.allowed)))


def make_labels(target: np.ndarray, target_len: np.ndarray, soft: SoftLabels | None, trie: Trie | None,
                cfg: LossConfig) -> Labels:
    """Labels for the targets of a batch (flat ids, length per sample) from the reader's padded q
    (`soft`, needed unless loss=ntp) and, with MSL, the trie the targets walk down."""
    target = np.asarray(target, dtype=np.int64)
    q_tok = q_prob = None
    if cfg.uses_q:
        real = soft.count > 0  # [B, T]: the positions each sample has
        if not np.array_equal(real.sum(1).numpy(), target_len):
            raise TcaError("cf_dist has another number of positions than the targets of some samples; "
                           "rerun the cf_dist stage on the current trie and subset")
        q_tok, q_prob = soft.token[real].numpy(), soft.prob[real]
        if not (q_prob >= 0).all():
            raise TcaError("cf_dist holds negative or NaN probabilities; rerun the cf_dist stage")
    if not cfg.msl:
        return Labels(torch.from_numpy(target), None if q_tok is None else torch.from_numpy(q_tok), q_prob, None, None)

    # MSL: the children of n_{t-1} at every position, as columns of the tokens that occur in the batch
    paths = trie.paths(pad(target, target_len, fill=-1))
    nodes = paths[:, :-1][np.arange(paths.shape[1] - 1) < target_len[:, None]]
    if (paths[np.arange(len(target_len)), target_len] < 0).any():
        raise TcaError("a target is not a path of the trie; rerun the trie stage on the current data")
    first = trie.child_ptr[nodes]
    n_children = trie.child_ptr[nodes + 1] - first
    child = trie.child_token[concat_ranges(first, n_children)].astype(np.int64)
    columns = np.unique(child)
    allowed = torch.zeros(len(target), len(columns), dtype=torch.bool)
    allowed[np.repeat(np.arange(len(target)), n_children), np.searchsorted(columns, child)] = True
    col = lambda tokens: torch.from_numpy(np.minimum(np.searchsorted(columns, tokens), len(columns) - 1))
    return Labels(col(target), None if q_tok is None else col(q_tok), q_prob, torch.from_numpy(columns), allowed)


def position_losses(z: torch.Tensor, labels: Labels, cfg: LossConfig) -> torch.Tensor:
    """Loss [N] of each target position from its logits z [N, M] over the label columns."""
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    if cfg.msl:
        z = z / cfg.msl_tau
        log_norm = z.masked_fill(~labels.allowed, float("-inf")).logsumexp(1)
    else:
        log_norm = z.logsumexp(1)
    gold = z.gather(1, labels.gold[:, None])[:, 0]
    if cfg.loss == "ntp":
        return log_norm - gold
    q_z, q = z.gather(1, labels.q_col), labels.q_prob.to(z.dtype)
    if cfg.loss == "kl":
        log_p = q_z - log_norm[:, None]
        return log_norm - gold + cfg.alpha * (torch.xlogy(q, q) - q * log_p).sum(1)
    # soft NTP: y~'s entries are the gold token (weight 1 - alpha) and q's support (weights alpha q);
    # a gold token that is also in q's support simply appears twice, so no scatter is needed
    weight = torch.cat([torch.full_like(gold[:, None], 1.0 - cfg.alpha), cfg.alpha * q], 1)
    entry_z = torch.cat([gold[:, None], q_z], 1)
    return log_norm - (entry_z + weight.log()).logsumexp(1)
