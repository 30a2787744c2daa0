"""Evaluation of an LLM recommender on a set of samples: trie-constrained beam search, ranking
metrics of the returned lists, collaborative consistency and the CF model's own metrics on the
same samples. The `eval` stage and the trainer's validation both call `evaluate`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import torch

from tca.cf.base import CFModel, pad_histories, score_samples
from tca.llm.decode import DeviceTrie, beam_search, excluded_rows, ranked_items
from tca.config import check_keys
from tca.errors import TcaError
from tca.llm.hybrid_prompt import HybridPrompt
from tca.llm.model import PRECISIONS
from tca.llm.packing import prefix_histories
from tca.metrics import KS, bootstrap_interval, list_ranks, per_sample_metrics, ranking_metrics, target_ranks
from tca.llm.prompt import PromptBuilder
from tca.ragged import pad
from tca.collab.trie import Trie

CF_BATCH = 1024


@dataclass(frozen=True)
class EvalConfig:
    """The `eval:` param section (less `split`, which only says which subset the stage reads)."""

    num_beams: int = 10
    length_penalty: float = 1.0  # HF's: a title's score is its summed log-prob / length ** length_penalty
    renormalize: bool = False  # log-probs of a softmax over the trie children only (the right choice for MSL)
    batch_size: int | str = "auto"  # samples per beam search (num_beams rows each); auto: `batch_on` the device
    exclude_history: bool = False  # no sample is recommended an item of its history (the LLM's lists and the CF / popularity ranks)
    precision: str = "auto"  # the merged model's weights: auto (bf16 where supported, `tca.llm.model.use_bf16`) | bf16 | fp32
    tau: float = 1.0  # temperature of the renormalized softmax: not an eval param, the model's (LossConfig.decode_tau)

    @classmethod
    def from_params(cls, params: dict) -> "EvalConfig":
        check_keys(cls, params, "eval", also=("split",))
        cfg = cls(**params)
        if not isinstance(cfg.exclude_history, bool):
            raise TcaError(f"eval.exclude_history: {cfg.exclude_history!r} must be true or false here (auto is resolved by the stage)")
        if cfg.num_beams < 1:
            raise TcaError(f"eval.num_beams: {cfg.num_beams} must be >= 1")
        if cfg.batch_size != "auto" and not (isinstance(cfg.batch_size, int) and cfg.batch_size >= 1):
            raise TcaError(f"eval.batch_size: {cfg.batch_size!r} must be auto or an integer >= 1")
        if cfg.precision not in PRECISIONS:
            raise TcaError(f"eval.precision: {cfg.precision!r} is not one of {', '.join(PRECISIONS)}")
        return cfg

    def batch_on(self, device: torch.device | str) -> int:
        """Samples per beam search: `batch_size`, or for auto 64 on a GPU (a decode step there costs about
        the same for 10 rows as for 640, so wider batches are nearly free) and 16 on a CPU (its steps cost
        in proportion to the rows)."""
        if self.batch_size != "auto":
            return self.batch_size
        return 64 if torch.device(device).type == "cuda" else 16


@dataclass
class Evaluation:
    metrics: dict  # {"llm": {"hr@1", ..., "ndcg@10", "lists_under_10"[, "cc"]}, ["cf": {...},] "n_samples", "decode": {...}}
    predictions: pl.DataFrame  # sample_id, items (ranked item ids), scores, in the order of the samples


def recommend(model, builder: PromptBuilder, trie: Trie, histories: pl.Series, cfg: EvalConfig,
              bar=None, hybrid: HybridPrompt | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Ranked item ids [S, num_beams] (0 = none) and their scores (-inf there) for each history
    (list column of item ids, oldest first). Batches group prompts of similar length (less padding).
    A builder with CF slots (LLaRA, CoLLM) needs the `hybrid` prompt that fills them."""
    lengths = histories.list.len().to_numpy().astype(np.int64)
    order = np.argsort(builder.build(histories.explode().drop_nulls().to_numpy(), lengths).lengths, kind="stable")
    device = next(model.parameters()).device
    dtrie, batch_size = DeviceTrie(trie, device), cfg.batch_on(device)
    items = np.zeros((len(order), cfg.num_beams), dtype=np.int64)
    scores = np.full((len(order), cfg.num_beams), -np.inf, dtype=np.float32)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = histories.gather(rows)
            hist = batch.explode().drop_nulls().to_numpy()
            prompts = builder.build(hist, lengths[rows])
            vectors = None
            if hybrid is not None:  # what each user slot shows: the history, or (items format) each of its prefixes
                users = prefix_histories(batch) if builder.items_format and "user" in hybrid.slots else batch
                vectors = hybrid.vectors(torch.from_numpy(pad(prompts.slot, prompts.lengths, 0)), users)
            excluded = excluded_rows(trie, hist, lengths[rows]) if cfg.exclude_history else None
            leaves, leaf_scores = beam_search(model, prompts, dtrie, cfg.num_beams, cfg.length_penalty, cfg.renormalize, vectors,
                                              cfg.tau, excluded)
            items[rows], scores[rows] = ranked_items(trie, leaves.cpu().numpy(), leaf_scores.cpu().numpy(), cfg.num_beams,
                                                     (hist, lengths[rows]) if cfg.exclude_history else None)
            if bar is not None:
                bar.update(len(rows))
    finally:
        model.train(was_training)
    return items, scores


def without_history(scores: torch.Tensor, histories: pl.Series) -> torch.Tensor:
    """Full-ranking scores [B, N+1] with each sample's history items at -inf (ranked after every other item)."""
    lengths = torch.from_numpy(histories.list.len().to_numpy().astype(np.int64))
    hist = torch.from_numpy(histories.explode().drop_nulls().to_numpy().astype(np.int64))
    row = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    out = scores.expand(len(lengths), -1).clone()
    out[row.to(out.device), hist.to(out.device)] = float("-inf")
    return out


@torch.no_grad()
def cf_ranking(cf: CFModel, histories: pl.Series, target: torch.Tensor,
               users: torch.Tensor | None = None, exclude_history: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The CF model's full-ranking 0-based rank of each target and its top-1 item, in batches
    (`users`: the samples' user ids, for models that learn a vector per user; `exclude_history`:
    history items are ranked last, as the LLM's search never returns them)."""
    device = next(cf.parameters()).device
    ranks, top1 = [], []
    for start in range(0, len(histories), CF_BATCH):
        batch_users = None if users is None else users[start : start + CF_BATCH].to(device)
        batch = histories.slice(start, CF_BATCH)
        scores = score_samples(cf, pad_histories(batch, cf.cfg.max_len).to(device), batch_users)
        if exclude_history:
            scores = without_history(scores, batch)
        ranks.append(target_ranks(scores, target[start : start + CF_BATCH].to(device)).cpu())
        top1.append(scores.argmax(dim=1).cpu())  # first maximum: ties go to the lower item id, as in target_ranks
    return torch.cat(ranks), torch.cat(top1)


def evaluate(model, builder: PromptBuilder, trie: Trie, samples: pl.DataFrame, cfg: EvalConfig,
             cf: CFModel | None = None, bar=None, hybrid: HybridPrompt | None = None,
             popularity: torch.Tensor | None = None) -> Evaluation:
    """Beam-search every sample (`sample_id`, `history`, `item_id`) and score the ranked lists
    (`hybrid`: the CF slots of a LLaRA / CoLLM builder's prompts); see `score_lists`."""
    start = time.perf_counter()
    items, scores = recommend(model, builder, trie, samples["history"], cfg, bar, hybrid)
    seconds = time.perf_counter() - start
    result = score_lists(items, scores, samples, cf, popularity, cfg.exclude_history)
    result.metrics["decode"] = {"seconds": round(seconds, 2), "samples_per_s": round(samples.height / seconds, 3),
                                "num_beams": cfg.num_beams, "batch_size": cfg.batch_on(next(model.parameters()).device),
                                "device": str(next(model.parameters()).device),
                                "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    return result


def score_lists(items: np.ndarray, scores: np.ndarray, samples: pl.DataFrame, cf: CFModel | None = None,
                popularity: torch.Tensor | None = None, exclude_history: bool = False) -> Evaluation:
    """Metrics and predictions of ranked lists (`recommend`'s items [S, beams], 0 = none, and scores)
    for these samples. A function of the lists alone, so lists decoded in shards or on several ranks
    and concatenated give exactly the metrics of one run.

    With a CF model, also collaborative consistency (share of samples whose top-1 item is the CF
    model's top-1) and the CF model's own full-ranking metrics on the same samples; with `popularity`
    (interaction counts [N+1] of the train split), the most-popular baseline's. `exclude_history`
    ranks history items last in both (the lists are expected to hold none). Every metric comes with
    its 95% bootstrap interval over the samples (`ci`), and the predictions keep each sample's 0-based
    rank under every model (`rank`, `cf_rank`, `popularity_rank`; the list length where absent), so
    that two runs on the same samples can be compared pair by pair.
    """
    target = torch.from_numpy(samples["item_id"].to_numpy().astype(np.int64))
    found = items > 0
    padded = np.pad(items, ((0, 0), (0, max(0, max(KS) - items.shape[1]))))  # absent targets rank beyond every k
    ranks = {"llm": list_ranks(torch.from_numpy(padded), target)}
    llm = ranking_metrics(ranks["llm"])
    llm[f"lists_under_{max(KS)}"] = float((found.sum(axis=1) < max(KS)).mean())
    metrics = {"llm": llm}
    if cf is not None:
        users = torch.from_numpy(samples["user_id"].to_numpy().astype("int64")) if "user_id" in samples.columns else None
        ranks["cf"], cf_top1 = cf_ranking(cf, samples["history"], target, users, exclude_history)
        llm["cc"] = float((torch.from_numpy(items[:, 0]) == cf_top1).double().mean())
        metrics["cf"] = ranking_metrics(ranks["cf"])
    if popularity is not None:
        pop = popularity.double()[None]
        pop = without_history(pop, samples["history"]) if exclude_history else pop
        ranks["popularity"] = target_ranks(pop, target)
        metrics["popularity"] = ranking_metrics(ranks["popularity"])
    metrics["n_samples"] = samples.height
    metrics["exclude_history"] = exclude_history
    metrics["ci"] = {}
    for name, r in ranks.items():
        per = per_sample_metrics(r.numpy())
        bounds = bootstrap_interval(np.stack(list(per.values())))
        metrics["ci"][name] = {key: [round(float(lo), 6), round(float(hi), 6)] for key, (lo, hi) in zip(per, bounds)}
    offsets = pa.array(np.concatenate([[0], np.cumsum(found.sum(axis=1))]).astype(np.int32))
    predictions = pl.DataFrame({
        "sample_id": samples["sample_id"],
        "items": pl.from_arrow(pa.ListArray.from_arrays(offsets, pa.array(items[found].astype(np.int32)))),
        "scores": pl.from_arrow(pa.ListArray.from_arrays(offsets, pa.array(scores[found]))),
        **{("rank" if name == "llm" else f"{name}_rank"): r.numpy().astype(np.int32) for name, r in ranks.items()},
    })
    return Evaluation(metrics, predictions)


def read_lists(predictions: pl.DataFrame, num_beams: int) -> tuple[np.ndarray, np.ndarray]:
    """`score_lists`' predictions table back to padded (items, scores) arrays [S, num_beams]."""
    counts = predictions["items"].list.len().to_numpy().astype(np.int64)
    items = pad(predictions["items"].explode().drop_nulls().to_numpy().astype(np.int64), counts, fill=0, width=num_beams)
    scores = pad(predictions["scores"].explode().drop_nulls().to_numpy().astype(np.float32), counts, fill=-np.inf, width=num_beams)
    return items, scores
