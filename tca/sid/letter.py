"""LETTER (Wang et al. 2024): the RQ-VAE of rqvae.py with two regularizers.

- Collaborative: an InfoNCE loss over the batch that pulls each item's quantized latent toward
  its own CF item embedding and away from the other items' (cosine similarities / temperature),
  so items the CF model sees as similar share codes. When the latent and the CF embeddings have
  different sizes, a learned linear map takes the CF embeddings into the latent space.
- Diversity: per level, the entropy of the batch's mean soft assignment to the codes (softmax of
  -distance / temperature), pushed toward log(codebook_size), so codes are used evenly and fewer
  items collide. (LETTER clusters the code vectors instead; this targets the same usage skew directly.)
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tca.errors import TcaError
from tca.sid.rqvae import Quantized, RQVAE, SidConfig, TrainedTokenizer, sq_distances, train_rqvae


class LetterRegularizer(nn.Module):
    def __init__(self, cf_emb: np.ndarray, cfg: SidConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("cf", torch.as_tensor(np.asarray(cf_emb, dtype=np.float32)))
        self.project = nn.Identity() if self.cf.shape[1] == cfg.latent_dim else nn.Linear(self.cf.shape[1], cfg.latent_dim, bias=False)

    def collaborative(self, items: torch.Tensor, q: Quantized) -> torch.Tensor:
        z_q = q.z_q + q.residuals[:, 0] - q.residuals[:, 0].detach()  # value z_q; gradient to codes and encoder
        z = F.normalize(z_q, dim=1)
        h = F.normalize(self.project(self.cf[items]), dim=1)
        logits = z @ h.T / self.cfg.cf_temperature
        return F.cross_entropy(logits, torch.arange(len(items)))

    def diversity(self, q: Quantized, model: RQVAE) -> torch.Tensor:
        loss = 0.0
        for level in range(self.cfg.levels):
            p = (-sq_distances(q.residuals[:, level], model.codebooks[level]) / self.cfg.diversity_temperature).softmax(1)
            mean = p.mean(0)
            loss = loss + math.log(self.cfg.codebook_size) + (mean * mean.clamp(min=1e-12).log()).sum()
        return loss

    def forward(self, items: torch.Tensor, q: Quantized, model: RQVAE) -> dict[str, torch.Tensor]:
        return {"cf": self.cfg.cf_weight * self.collaborative(items, q),
                "diversity": self.cfg.diversity_weight * self.diversity(q, model)}


def train_letter(emb: np.ndarray, cf_emb: np.ndarray, cfg: SidConfig, log=None) -> TrainedTokenizer:
    """LETTER's tokenizer from text embeddings [N+1, d] and CF item embeddings [N+1, d_cf] (row 0: padding)."""
    if len(cf_emb) != len(emb):
        raise TcaError(f"the CF model has {len(cf_emb) - 1} items but the text embeddings {len(emb) - 1}; "
                       "rerun the cf and text_emb stages on the same data")
    torch.manual_seed(cfg.seed)  # the projection's init
    regularizer = LetterRegularizer(cf_emb, cfg)
    return train_rqvae(emb, cfg, regularizer, list(regularizer.parameters()), log)
