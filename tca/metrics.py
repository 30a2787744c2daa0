"""Full-ranking top-k metrics (HR@k, NDCG@k), shared by the CF stage and the LLM evaluation.

Everything goes through the 0-based rank of the target among items 1..N; a target that is not
ranked at all (e.g. missing from a beam search's list) has rank >= every k and scores 0.
Ties are broken by item id (lower id first), as a stable sort would, so tied scores never
flatter a model. Item 0 is padding and never ranked.
"""
from __future__ import annotations

import numpy as np
import torch

KS = (1, 5, 10)


def target_ranks(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """scores [B or 1, N+1], target [B] -> 0-based rank [B] of each target among items 1..N."""
    scores = scores[:, 1:]
    t = (target - 1)[:, None]
    mine = scores.expand(len(target), -1).gather(1, t)
    ids = torch.arange(scores.shape[1], device=scores.device)
    ahead = (scores > mine) | ((scores == mine) & (ids < t))
    return ahead.sum(dim=1)


def list_ranks(ranked: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """ranked [B, K] item ids, best first -> rank [B] of the target (K if it is absent)."""
    hit = ranked == target[:, None]
    return torch.where(hit.any(dim=1), hit.int().argmax(dim=1), ranked.shape[1])


def ranking_metrics(ranks: torch.Tensor, ks=KS) -> dict[str, float]:
    """0-based ranks [B] -> {"hr@k": ..., "ndcg@k": ...} averaged over samples."""
    ranks = ranks.double()
    gain = 1.0 / torch.log2(ranks + 2.0)
    hr = {f"hr@{k}": (ranks < k).double().mean().item() for k in ks}
    return hr | {f"ndcg@{k}": torch.where(ranks < k, gain, 0.0).mean().item() for k in ks}


def popularity_scores(train_targets: torch.Tensor, n_items: int) -> torch.Tensor:
    """[1, N+1] interaction counts of the training targets: the most-popular baseline's scores."""
    return torch.bincount(train_targets, minlength=n_items + 1)[None].double()


def per_sample_metrics(ranks: torch.Tensor | np.ndarray, ks=KS) -> dict[str, np.ndarray]:
    """0-based ranks [S] -> each metric's value per sample (their means are `ranking_metrics`)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    gain = np.where(np.isfinite(ranks), 1.0 / np.log2(ranks + 2.0), 0.0)
    return {f"hr@{k}": (ranks < k).astype(np.float64) for k in ks} | {f"ndcg@{k}": np.where(ranks < k, gain, 0.0) for k in ks}


BOOTSTRAP = 2000  # resamples: the 2.5% / 97.5% percentiles move by well under 1% of the interval between seeds


def bootstrap_interval(values: np.ndarray, level: float = 0.95, n: int = BOOTSTRAP, seed: int = 0) -> np.ndarray:
    """Percentile bootstrap interval of the mean of each row of `values` [M, S] (or [S]) over the S
    samples: [M, 2] (or [2]). Pass per-sample differences of two models on the same samples for a
    paired interval. Resamples are drawn as multinomial counts, one [n, S] matrix for every row."""
    values = np.asarray(values, dtype=np.float64)
    flat = values.reshape(-1, values.shape[-1])
    S = flat.shape[1]
    if S == 0:
        return np.full(values.shape[:-1] + (2,), np.nan)
    counts = np.random.default_rng(seed).multinomial(S, np.full(S, 1.0 / S), size=n).astype(np.float64)  # [n, S]
    means = counts @ flat.T / S  # [n, M]
    tail = (1 - level) / 2
    return np.quantile(means, [tail, 1 - tail], axis=0).T.reshape(values.shape[:-1] + (2,))
