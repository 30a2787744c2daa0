"""RQ-VAE item tokenizer (TIGER, Rajput et al. 2023): text embedding -> `levels` residual codes.

An MLP encoder maps an item's embedding to a latent z; level l picks the code of codebook l
nearest to the residual left by the levels before it, so the codes go from coarse to fine and
their sum approximates z. A decoder reconstructs the embedding from that sum (straight-through
gradient). Loss: reconstruction MSE + per level ||sg(r_l) - e_l||^2 + beta ||r_l - sg(e_l)||^2 (all means over dims).
Codebooks start from k-means of the initial residuals, level by level, so no code starts dead.
Inputs are centered and scaled to unit RMS first (the model keeps the shift and scale).
Items whose codes collide get one more code (0, 1, 2, ... in item-id order) that makes each SID unique.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import torch
from torch import nn

from tca.config import check_keys
from tca.errors import TcaError

PAD = 0  # the SID vocabulary: 0 pads histories and starts the decoder; codes follow from FIRST
FIRST = 1


@dataclass(frozen=True)
class SidConfig:
    """The `sid:` param section: the quantizer's shape and training, and LETTER's regularizers."""

    levels: int = 3  # codebooks (the SID has levels + 1 codes: the last one resolves collisions)
    codebook_size: int = 256
    latent_dim: int = 32
    hidden: tuple[int, ...] = (256, 128)  # encoder widths (the decoder mirrors them)
    beta: float = 0.25  # commitment weight
    epochs: int = 300
    batch_size: int = 1024
    lr: float = 1e-3
    kmeans_iters: int = 25
    seed: int = 42
    cf_weight: float = 0.02  # LETTER: weight of the contrastive alignment with the CF item embeddings
    cf_temperature: float = 0.1  # LETTER: temperature of that contrastive loss (cosine similarities)
    diversity_weight: float = 0.01  # LETTER: weight of the codebook-usage entropy regularizer
    diversity_temperature: float = 1.0  # LETTER: softmax temperature of the soft code assignments

    @classmethod
    def from_params(cls, params: dict) -> "SidConfig":
        check_keys(cls, params, "sid")
        cfg = cls(**{**params, "hidden": tuple(params.get("hidden", cls.hidden))})
        for key in ("levels", "codebook_size", "latent_dim", "epochs", "batch_size", "kmeans_iters"):
            if getattr(cfg, key) < 1:
                raise TcaError(f"sid.{key}: {getattr(cfg, key)} must be >= 1")
        if any(h < 1 for h in cfg.hidden):
            raise TcaError(f"sid.hidden: {list(cfg.hidden)} must be positive layer widths")
        for key in ("beta", "cf_weight", "diversity_weight"):
            if getattr(cfg, key) < 0:
                raise TcaError(f"sid.{key}: {getattr(cfg, key)} must be >= 0")
        for key in ("lr", "cf_temperature", "diversity_temperature"):
            if not getattr(cfg, key) > 0:
                raise TcaError(f"sid.{key}: {getattr(cfg, key)} must be > 0")
        return cfg


def _mlp(dims: list[int]) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def sq_distances(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """[B, d] x [K, d] -> squared Euclidean distances [B, K] (one matmul)."""
    return (x * x).sum(1, keepdim=True) - 2 * x @ codes.T + (codes * codes).sum(1)


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """k centers of the rows of x (Lloyd; seeded from random rows, an empty cluster keeps its center)."""
    n = len(x)
    if n >= k:
        centers = x[torch.randperm(n, generator=generator)[:k]].clone()
    else:  # fewer points than codes: repeat points with a little noise so the centers differ
        centers = x[torch.randint(n, (k,), generator=generator)] + 1e-3 * torch.randn(k, x.shape[1], generator=generator)
    for _ in range(iters):
        assign = sq_distances(x, centers).argmin(1)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        centers = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centers)
    return centers


@dataclass
class Quantized:
    codes: torch.Tensor  # int64 [B, L]
    residuals: torch.Tensor  # [B, L, d]: what level l quantizes
    chosen: torch.Tensor  # [B, L, d]: the code vector level l picked

    @property
    def z_q(self) -> torch.Tensor:
        """The quantized latent: the sum of the chosen codes."""
        return self.chosen.sum(1)


class RQVAE(nn.Module):
    def __init__(self, in_dim: int, cfg: SidConfig):
        super().__init__()
        self.cfg = cfg
        dims = [in_dim, *cfg.hidden, cfg.latent_dim]
        self.encoder, self.decoder = _mlp(dims), _mlp(dims[::-1])
        self.codebooks = nn.Parameter(torch.zeros(cfg.levels, cfg.codebook_size, cfg.latent_dim))
        self.register_buffer("center", torch.zeros(in_dim))  # inputs are centered and scaled to unit RMS:
        self.register_buffer("scale", torch.ones(()))  # LLM title states are anisotropic (cosine ~0.98)

    def fit_scaling(self, x: torch.Tensor) -> None:
        self.center = x.mean(0)
        self.scale = (x - self.center).pow(2).mean().sqrt().clamp(min=1e-12)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.center) / self.scale

    def quantize(self, z: torch.Tensor) -> Quantized:
        residual, codes, residuals, chosen = z, [], [], []
        for level in range(self.cfg.levels):  # levels are sequential by definition
            code = sq_distances(residual.detach(), self.codebooks[level]).argmin(1)
            vector = self.codebooks[level][code]
            codes.append(code)
            residuals.append(residual)
            chosen.append(vector)
            residual = residual - vector.detach()
        return Quantized(torch.stack(codes, 1), torch.stack(residuals, 1), torch.stack(chosen, 1))

    def losses(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], Quantized]:
        """Reconstruction and quantization (codebook + commitment) losses of a batch of embeddings."""
        x = self.normalize(x)
        z = self.encoder(x)
        q = self.quantize(z)
        z_q = z + (q.z_q - z).detach()  # straight-through: the decoder's gradient reaches the encoder
        recon = (self.decoder(z_q) - x).pow(2).mean()  # means over dims, as TIGER: a sum over the 576 input
        codebook = (q.residuals.detach() - q.chosen).pow(2).mean(2).mean(0).sum()  # dims drowned the quantization
        commit = (q.residuals - q.chosen.detach()).pow(2).mean(2).mean(0).sum()  # terms (ML-100k level-1 usage 14% -> 49%)
        return {"recon": recon, "quant": codebook + self.cfg.beta * commit}, q

    @torch.no_grad()
    def init_codebooks(self, x: torch.Tensor, generator: torch.Generator) -> None:
        """k-means of the residuals, level by level, on the encoder's initial latents of x."""
        residual = self.encoder(self.normalize(x))
        for level in range(self.cfg.levels):
            self.codebooks[level] = kmeans(residual, self.cfg.codebook_size, self.cfg.kmeans_iters, generator)
            residual = residual - self.codebooks[level][sq_distances(residual, self.codebooks[level]).argmin(1)]

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> Quantized:
        return self.quantize(self.encoder(self.normalize(x)))


# an extra loss on a batch: (item rows, quantization of the batch, model) -> named loss terms
Regularizer = Callable[[torch.Tensor, Quantized, RQVAE], dict[str, torch.Tensor]]


@dataclass
class TrainedTokenizer:
    model: RQVAE
    codes: np.ndarray  # int64 [N, levels]: the codes of items 1..N
    history: list[dict] = field(default_factory=list)  # mean losses per epoch


def train_rqvae(emb: np.ndarray, cfg: SidConfig, regularizer: Regularizer | None = None,
                extra_params: list[nn.Parameter] = (), log: Callable[[str], None] | None = None) -> TrainedTokenizer:
    """Train on the item embeddings `emb` [N+1, d] (row 0: padding, unused); `regularizer` adds
    LETTER's terms (with its own `extra_params`). Deterministic under cfg.seed on one device."""
    emb = np.asarray(emb, dtype=np.float32)
    if emb.ndim != 2 or len(emb) < 2 or not np.isfinite(emb).all():
        raise TcaError(f"item embeddings of shape {emb.shape}: need [N+1, d] finite values (row 0 = padding)")
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    x = torch.from_numpy(emb[1:])
    model = RQVAE(x.shape[1], cfg)
    model.fit_scaling(x)
    model.init_codebooks(x, generator)
    optimizer = torch.optim.AdamW([*model.parameters(), *extra_params], lr=cfg.lr)
    history = []
    for epoch in range(cfg.epochs):
        sums: dict[str, float] = {}
        perm = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), cfg.batch_size):
            rows = perm[start : start + cfg.batch_size]
            terms, q = model.losses(x[rows])
            if regularizer is not None:
                terms |= regularizer(rows + 1, q, model)  # item ids are rows + 1
            loss = sum(terms.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value.item() * len(rows) / len(x)
        history.append({"epoch": epoch + 1, **sums})
        if log is not None and (epoch + 1) % max(1, cfg.epochs // 5) == 0:
            log(f"epoch {epoch + 1}/{cfg.epochs}: " + ", ".join(f"{k} {v:.4f}" for k, v in sums.items()))
    model.eval()
    return TrainedTokenizer(model, model.encode(x).codes.numpy(), history)


def semantic_ids(codes: np.ndarray, codebook_size: int) -> tuple[np.ndarray, dict]:
    """Codes [N, L] -> SID token ids [N, L+1] and their statistics.

    Level l's code c is token FIRST + l * codebook_size + c; the last token, FIRST + L * codebook_size
    + j, is the item's index j among the items sharing its L codes (in item-id order), so SIDs are unique.
    """
    codes = np.asarray(codes, dtype=np.int64)
    n, levels = codes.shape
    order = np.lexsort((np.arange(n), *codes.T[::-1]))
    new = np.concatenate([[True], (codes[order][1:] != codes[order][:-1]).any(1)])
    group = np.cumsum(new) - 1
    start = np.flatnonzero(new)
    dup = np.empty(n, dtype=np.int64)
    dup[order] = np.arange(n) - start[group]
    size = np.diff(np.append(start, n))[group]
    tokens = np.concatenate([FIRST + np.arange(levels) * codebook_size + codes, (FIRST + levels * codebook_size + dup)[:, None]], 1)
    stats = {
        "items": n,
        "codebook_usage": [len(np.unique(codes[:, level])) / codebook_size for level in range(levels)],
        "collision_rate": float((size > 1).mean()),  # share of items whose L codes another item also has
        "unique_prefixes": int(len(start)),
        "max_items_per_prefix": int(size.max()),
    }
    return tokens.astype(np.int32), stats


def vocab_size(tokens: np.ndarray) -> int:
    return int(tokens.max()) + 1


def sid_targets(tokens: np.ndarray) -> pl.Series:
    """SID tokens [N, L+1] of items 1..N -> the list[int32] column the trie and cf_dist read."""
    return pl.Series("token_ids", tokens.tolist(), dtype=pl.List(pl.Int32))
