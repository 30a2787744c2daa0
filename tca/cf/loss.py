"""Next-item losses shared by the CF models: full softmax (ce) or one sampled negative (bce, bpr)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_negatives(positives: torch.Tensor, n_items: int) -> torch.Tensor:
    """One item per positive, uniform over 1..N without the positive itself (vectorized)."""
    neg = torch.randint(1, n_items, positives.shape, device=positives.device)  # 1..N-1
    return neg + (neg >= positives).long()


def next_item_loss(states: torch.Tensor, targets: torch.Tensor, items: torch.Tensor, loss: str,
                   smoothing: float = 0.0) -> torch.Tensor:
    """states [M, d] predict targets [M] (ids 1..N) against item vectors items [N+1, d].
    `smoothing` (ce only): the target gets 1 - smoothing of the label mass, every item smoothing / N."""
    if loss == "ce":
        return F.cross_entropy(states @ items[1:].T, targets - 1, label_smoothing=smoothing)
    negatives = sample_negatives(targets, items.shape[0] - 1)
    pos = (states * items[targets]).sum(-1)
    neg = (states * items[negatives]).sum(-1)
    if loss == "bpr":  # Rendle et al.: -log sigmoid(pos - neg)
        return F.softplus(neg - pos).mean()
    return (F.softplus(-pos) + F.softplus(neg)).mean()
