"""The CF training loop: shuffled mini-batches, Adam, early stopping on valid NDCG@10."""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import polars as pl
import torch
from tqdm.auto import tqdm

from tca.cf.base import CFConfig, CFModel, pad_histories, score_samples
from tca.cf.registry import build
from tca.errors import TcaError
from tca.metrics import popularity_scores, ranking_metrics, target_ranks

EVAL_BATCH = 1024


@dataclass
class Samples:
    """One split as tensors: left-padded histories [S, max_len], targets [S], user ids [S] (when the
    frame has `user_id`) and, for training, each sample's distance from its user's latest sample
    (0 = latest; from `user_id`, `timestamp`)."""

    history: torch.Tensor
    target: torch.Tensor
    from_end: torch.Tensor | None = None
    user: torch.Tensor | None = None

    def batch(self, idx) -> dict:
        """The samples at `idx` as a model batch (`history`, `target`, and `user` when known)."""
        out = {"history": self.history[idx], "target": self.target[idx]}
        return out if self.user is None else {**out, "user": self.user[idx]}

    @classmethod
    def from_frame(cls, df: pl.DataFrame, max_len: int) -> "Samples":
        from_end = None
        if {"user_id", "timestamp"} <= set(df.columns):
            ranked = (
                df.select("user_id", "timestamp").with_row_index("row")
                .sort("user_id", "timestamp", "row")
                .with_columns(from_end=pl.len().over("user_id") - 1 - pl.int_range(pl.len()).over("user_id"))
                .sort("row")
            )
            from_end = torch.from_numpy(ranked["from_end"].to_numpy().astype("int64"))
        target = torch.from_numpy(df["item_id"].to_numpy().astype("int64"))
        user = torch.from_numpy(df["user_id"].to_numpy().astype("int64")) if "user_id" in df.columns else None
        return cls(pad_histories(df["history"], max_len), target, from_end, user)

    def windows(self, generator: torch.Generator, every: bool = False) -> torch.Tensor:
        """Indices of one epoch's training samples: each user's sequence cut into windows.

        A sample (history + target) is a window of the user's chronological sequence; every
        `width`-th sample of a user (width = history length) tiles it, so each interaction is
        a label once per epoch, at every position (SASRec). The tiling's phase is random per
        epoch, so an item is seen after contexts of every length; each user's latest sample is
        always added, so the phase never drops the most recent interactions (they may then
        count twice). Without user ids, or with `every`, every sample is a window.
        """
        if self.from_end is None or every:
            return torch.arange(len(self))
        width = max(int((self.history > 0).sum(dim=1).max()), 1)
        phase = torch.randint(width, (), generator=generator)
        return torch.nonzero(((self.from_end + phase) % width == 0) | (self.from_end == 0)).squeeze(1)

    def with_prefixes(self) -> "Samples":
        """These samples plus, per user, the next-item samples inside their earliest sample's
        history: (h[:k] -> h[k]) for each real h[k] after the first, left-padded.

        The data stage keeps only samples with data.min_history earlier items, so a user's first
        items are never a target; their prefixes are train interactions (earlier than the earliest
        train target), so no valid or test interaction enters. `from_end` is dropped: the result is
        for models that train on every sample (SASRec, cf.objective last), not on windows.
        """
        if self.user is None or self.from_end is None:
            raise TcaError("cf.prefixes needs the train split's user_id and timestamp columns; rerun the data stage")
        earliest = self.from_end == torch.bincount(self.user)[self.user] - 1
        first, users = self.history[earliest], self.user[earliest]  # [U, L]: each user's earliest sample
        L = first.shape[1]
        row, col = torch.nonzero(first[:, :-1] > 0, as_tuple=True)  # targets first[row, col + 1]: a real item before
        col = col + 1
        src = torch.arange(L, device=first.device)[None, :] - (L - col)[:, None]  # left-pad the col items before it to width L
        history = torch.where(src >= 0, first[row[:, None], src.clamp(min=0)], 0)
        return Samples(torch.cat([self.history, history]), torch.cat([self.target, first[row, col]]),
                       None, torch.cat([self.user, users[row]]))

    def __len__(self) -> int:
        return len(self.target)

    def check(self, n_items: int, name: str) -> None:
        """Fail before training on ids the model cannot embed, or on an empty split."""
        if len(self) == 0:
            raise TcaError(f"{name} split is empty: loosen the data.* filters or use a larger dataset")
        for what, ids, low in (("history", self.history, 0), ("item_id", self.target, 1)):
            bad = (ids < low) | (ids > n_items)
            if bad.any():
                raise TcaError(
                    f"{name} split: {what} holds item id {ids[bad][0].item()} outside {low}..{n_items} "
                    "(the items table has N items); rerun the data stage"
                )

    def to(self, device: str) -> "Samples":
        def move(t):
            return None if t is None else t.to(device)

        return Samples(self.history.to(device), self.target.to(device), move(self.from_end), move(self.user))


@dataclass
class FitResult:
    best_epoch: int
    best_valid: dict
    epochs: int
    seconds: float
    losses: list[float] = field(default_factory=list)  # mean training loss per epoch


@torch.no_grad()
def evaluate(model: CFModel, samples: Samples) -> dict[str, float]:
    """Full-ranking HR@k / NDCG@k of the model on every sample (no history masking; with user ids
    when the samples have them)."""
    model.eval()
    ranks = []
    for i in range(0, len(samples), EVAL_BATCH):
        batch = samples.batch(slice(i, i + EVAL_BATCH))
        ranks.append(target_ranks(score_samples(model, batch["history"], batch.get("user")), batch["target"]))
    return ranking_metrics(torch.cat(ranks))


def evaluate_popularity(train: Samples, samples: Samples, n_items: int) -> dict[str, float]:
    return ranking_metrics(target_ranks(popularity_scores(train.target, n_items).to(samples.target.device), samples.target))


def lr_factor(schedule: str, progress: float) -> float:
    """The share of cf.lr to use at `progress` (0..1) through cf.max_epochs. Cosine decay ends
    training at a near-zero step size, so the last epochs' valid curve is smooth and the early
    stop lands on a settled model rather than on a lucky point of a noisy plateau."""
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) if schedule == "cosine" else 1.0


def train_epoch(model: CFModel, opt: torch.optim.Optimizer, train: Samples, batch_size: int, gen: torch.Generator,
                lr: Callable[[float], float] | None = None) -> float:
    """One pass over this epoch's windows in shuffled mini-batches; returns the mean loss.
    `lr(f)`, when given, sets the learning rate before each step from f, the share of the epoch done."""
    model.train()
    windows = train.windows(gen, every=model.every_sample).cpu()
    order = windows[torch.randperm(len(windows), generator=gen)].to(train.target.device)
    total = torch.zeros((), device=train.target.device)
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        if lr is not None:
            for group in opt.param_groups:
                group["lr"] = lr(i / len(order))
        loss = model.calculate_loss(train.batch(idx))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.detach() * len(idx)
    return total.item() / len(order)


def fit(model: CFModel, train: Samples, valid: Samples, cfg: CFConfig, desc: str = "cf") -> FitResult:
    """Train with cfg.lr_schedule over cfg.max_epochs, stopping early once valid NDCG@10 has not
    improved for cfg.patience epochs; keep the best state."""
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)  # one kernel per step, not one per tensor
    best, best_state, best_epoch, losses = None, None, 0, []
    start = time.perf_counter()
    bar = tqdm(range(1, cfg.max_epochs + 1), desc=desc, unit="epoch", dynamic_ncols=True)
    for epoch in bar:
        def lr(f: float, epoch: int = epoch) -> float:
            return cfg.lr * lr_factor(cfg.lr_schedule, (epoch - 1 + f) / cfg.max_epochs)

        losses.append(train_epoch(model, opt, train, cfg.batch_size, gen, lr))
        metrics = evaluate(model, valid)
        if best is None or metrics["ndcg@10"] > best["ndcg@10"]:
            best, best_epoch, best_state = metrics, epoch, copy.deepcopy(model.state_dict())
        bar.set_postfix(loss=f"{losses[-1]:.4f}", ndcg10=f"{metrics['ndcg@10']:.4f}", best=f"{best['ndcg@10']:.4f}@{best_epoch}")
        if epoch - best_epoch >= cfg.patience:
            break
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    return FitResult(best_epoch, best, epoch, time.perf_counter() - start, losses)


def train_cf(cfg: CFConfig, n_items: int, train: Samples, valid: Samples, device: str = "cpu",
             inputs: dict | None = None) -> tuple[CFModel, FitResult]:
    """Check the data, build the model under cfg.seed, add the train split's prefixes (cf.prefixes, for a
    model that trains on every sample), prepare it (graph, side `inputs`) and fit it on `device`."""
    train.check(n_items, "train")
    valid.check(n_items, "valid")
    torch.manual_seed(cfg.seed)
    model = build(cfg, n_items)
    if cfg.prefixes and model.every_sample:
        train = train.with_prefixes()
    model.prepare(train, inputs or {})
    model = model.to(device)
    return model, fit(model, train.to(device), valid.to(device), cfg, desc=f"cf {cfg.model}/{cfg.loss}")
