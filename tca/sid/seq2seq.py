"""The generative recommender over semantic IDs (TIGER's): a small T5 trained from scratch.

The encoder reads the SIDs of the history's items (oldest first, the last `max_history` items,
left-padded); the decoder generates the next item's SID, one code per step, and is trained with the
per-position losses of `tca.llm.losses` on its logits (plain NTP, or TCA's soft NTP with q_t from the
collaborative tokenizer run on the SID trie). Decoding is the shared trie-constrained beam search
(`tca.llm.decode.search`) over the SID trie, so every list holds valid items only.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from transformers import T5Config, T5ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput

from tca.cf.base import pad_histories
from tca.collab.store import DistReader
from tca.config import check_keys
from tca.llm.decode import DeviceTrie, excluded_rows, ranked_items, search
from tca.errors import TcaError
from tca.llm.evaluate import EvalConfig, score_lists
from tca.llm.losses import Labels, LossConfig, make_labels, position_losses
from tca.sid.rqvae import PAD
from tca.llm.train import linear_schedule
from tca.collab.trie import Trie


@dataclass(frozen=True)
class Seq2SeqConfig:
    """The `seq2seq:` param section: the T5's size and its training (TIGER's model, scaled for a CPU)."""

    d_model: int = 64
    layers: int = 2  # encoder layers, and as many decoder layers
    heads: int = 4
    d_ff: int = 256
    dropout: float = 0.1
    max_history: int = 10  # most recent history items the encoder reads
    epochs: int = 12
    batch_size: int = 256
    lr: float = 5e-3  # AdamW, linear warmup then decay to 0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    seed: int = 42
    valid_every: int = 1  # epochs between validations (and after the last); 0 = never: the last epoch's weights
    valid_samples: int = 1000  # a seeded random set of the valid split that validation decodes
    patience: int = 3  # validations without improvement before stopping

    @classmethod
    def from_params(cls, params: dict) -> "Seq2SeqConfig":
        check_keys(cls, params, "seq2seq")
        cfg = cls(**params)
        for key in ("d_model", "layers", "heads", "d_ff", "max_history", "epochs", "batch_size", "valid_samples", "patience"):
            if getattr(cfg, key) < 1:
                raise TcaError(f"seq2seq.{key}: {getattr(cfg, key)} must be >= 1")
        if cfg.valid_every < 0:
            raise TcaError(f"seq2seq.valid_every: {cfg.valid_every} must be >= 0 (0 = never)")
        if cfg.d_model % cfg.heads:
            raise TcaError(f"seq2seq.d_model ({cfg.d_model}) must be a multiple of seq2seq.heads ({cfg.heads})")
        if not 0 <= cfg.dropout < 1 or not cfg.lr > 0:
            raise TcaError(f"seq2seq.dropout ({cfg.dropout}) must be in [0, 1) and seq2seq.lr ({cfg.lr}) > 0")
        return cfg


def build_model(cfg: Seq2SeqConfig, vocab_size: int) -> T5ForConditionalGeneration:
    torch.manual_seed(cfg.seed)
    config = T5Config(vocab_size=vocab_size, d_model=cfg.d_model, d_kv=cfg.d_model // cfg.heads, d_ff=cfg.d_ff,
                      num_layers=cfg.layers, num_decoder_layers=cfg.layers, num_heads=cfg.heads, dropout_rate=cfg.dropout,
                      pad_token_id=PAD, decoder_start_token_id=PAD, eos_token_id=PAD, feed_forward_proj="relu")
    return T5ForConditionalGeneration(config)


class SidItems:
    """Item id -> SID tokens, as a table [N+1, L+1] (row 0: PAD) for vectorized lookups."""

    def __init__(self, item_ids: np.ndarray, tokens: np.ndarray):
        item_ids = np.asarray(item_ids, dtype=np.int64)
        table = np.full((int(item_ids.max()) + 1, tokens.shape[1]), PAD, dtype=np.int64)
        table[item_ids] = tokens
        self.table = torch.from_numpy(table)

    @property
    def length(self) -> int:
        return self.table.shape[1]

    def histories(self, histories: pl.Series, max_history: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder ids [B, max_history * (L+1)] and their attention mask (False on padding)."""
        ids = self.table[pad_histories(histories, max_history)].flatten(1)
        return ids, ids != PAD

    def targets(self, items: np.ndarray) -> torch.Tensor:
        return self.table[torch.from_numpy(np.array(items, dtype=np.int64))]


class SidBatcher:
    """Sample rows (`sample_id`, `history`, `item_id`) -> encoder inputs, decoder targets, loss labels."""

    def __init__(self, items: SidItems, trie: Trie, dist: DistReader | None, cfg: LossConfig, max_history: int):
        if cfg.uses_q and dist is None:
            raise TcaError(f"train.loss={cfg.loss} needs q from the cf_dist stage")
        self.items, self.trie, self.dist, self.cfg, self.max_history = items, trie, dist, cfg, max_history

    def __call__(self, rows: pl.DataFrame) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Labels]:
        ids, mask = self.items.histories(rows["history"], self.max_history)
        target = self.items.targets(rows["item_id"].to_numpy())
        soft = self.dist.read(rows["sample_id"].to_numpy()) if self.cfg.uses_q else None
        lengths = np.full(len(target), target.shape[1])
        return ids, mask, target, make_labels(target.flatten().numpy(), lengths, soft, self.trie, self.cfg)


def batch_loss(model, ids: torch.Tensor, mask: torch.Tensor, target: torch.Tensor, labels: Labels, cfg: LossConfig) -> torch.Tensor:
    """Summed loss of the decoder's positions (teacher forcing: the decoder reads PAD, then the gold codes)."""
    decoder_ids = torch.cat([torch.full_like(target[:, :1], PAD), target[:, :-1]], 1)
    logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits.flatten(0, 1)
    if labels.columns is not None:  # MSL: only the columns of this batch's trie children
        logits = logits[:, labels.columns]
    return position_losses(logits, labels, cfg).sum()


@dataclass
class SidValidation:
    """What validation decodes and how: valid samples (`history`, `item_id`), beam search as the eval
    stage runs it (`eval`: beams, history exclusion), and the metric that picks the best epoch."""

    samples: pl.DataFrame
    items: SidItems
    trie: Trie
    eval: EvalConfig
    metric: str = "ndcg@10"

    def __call__(self, model, max_history: int) -> dict:
        ranked, scores = recommend_sids(model, self.items, self.trie, self.samples["history"], self.eval, max_history)
        return score_lists(ranked, scores, self.samples).metrics["llm"]


def train_seq2seq(model, batcher: SidBatcher, samples: pl.DataFrame, cfg: Seq2SeqConfig, device: str = "cpu",
                  log: Callable[[str], None] = print, progress=None, valid: SidValidation | None = None) -> list[dict]:
    """Train on every sample for up to cfg.epochs epochs; returns one record per epoch (mean loss per
    code, and the valid metrics where it validated). With `valid`, validation runs every
    `valid_every` epochs and after the last, the model ends with the best validated epoch's weights
    (a T5 from scratch overfits a small catalogue's train split), and training stops after `patience`
    validations without improvement."""
    model.to(device).train()
    steps_per_epoch = math.ceil(samples.height / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(math.ceil(cfg.warmup_ratio * total), total))
    bar = progress(total=total, unit="step", desc="train") if progress else None
    records, best, best_state, bad = [], None, None, 0
    for epoch in range(cfg.epochs):
        order = np.random.default_rng([cfg.seed, epoch]).permutation(samples.height)
        loss_sum, n_codes, start = 0.0, 0, time.perf_counter()
        for i in range(steps_per_epoch):
            ids, mask, target, labels = batcher(samples[order[i * cfg.batch_size : (i + 1) * cfg.batch_size]])
            loss = batch_loss(model, ids.to(device), mask.to(device), target.to(device), labels.to(device), batcher.cfg)
            optimizer.zero_grad(set_to_none=True)
            (loss / target.numel()).backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            loss_sum, n_codes = loss_sum + loss.item(), n_codes + target.numel()
            if bar is not None:
                bar.update()
        record = {"epoch": epoch + 1, "loss": loss_sum / n_codes, "lr": scheduler.get_last_lr()[0],
                  "samples_per_s": round(samples.height / (time.perf_counter() - start), 1)}
        records.append(record)
        message = f"epoch {epoch + 1}/{cfg.epochs}: loss {record['loss']:.4f}"
        if valid is not None and cfg.valid_every and ((epoch + 1) % cfg.valid_every == 0 or epoch + 1 == cfg.epochs):
            model.eval()
            record["valid"] = valid(model, batcher.max_history)
            model.train()
            value = record["valid"][valid.metric]
            if best is None or value > best:
                best, bad = value, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                record["best"] = True
            else:
                bad += 1
            message += f"; valid {valid.metric} {value:.4f}" + (" (best)" if bad == 0 else f" (best {best:.4f})")
        log(message)
        if bad >= cfg.patience:
            log(f"stopping: {bad} validations without a better valid {valid.metric}")
            break
    if bar is not None:
        bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return records


@torch.inference_mode()
def sid_beam_search(model, ids: torch.Tensor, mask: torch.Tensor, trie: DeviceTrie, num_beams: int = 10,
                    length_penalty: float = 1.0, renormalize: bool = False,
                    excluded: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The `num_beams` best SIDs per history: trie leaves [B, K] (-1 where fewer) and scores [B, K].
    The encoder runs once per history; each step reruns the decoder on the beams' code prefixes
    (an SID is a few codes long, so a KV cache would save little)."""
    encoded = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    prefix = torch.full((len(ids), 1), PAD, dtype=torch.long, device=ids.device)

    def logits_of(prefix: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        out = model(encoder_outputs=BaseModelOutput(last_hidden_state=encoded[sample]), attention_mask=mask[sample],
                    decoder_input_ids=prefix)
        return out.logits[:, -1].float()

    def advance(src, keep, t, tokens):
        nonlocal prefix, encoded, mask
        if keep is not None:
            encoded, mask = encoded[keep], mask[keep]
        prefix = torch.cat([prefix[src], tokens[:, None]], 1)
        return logits_of(prefix, torch.arange(len(encoded), device=ids.device).repeat_interleave(len(src) // len(encoded)))  # row b * W + k: sample b

    return search(trie, logits_of(prefix, torch.arange(len(ids), device=ids.device)), num_beams, length_penalty, renormalize, advance,
                  excluded=None if excluded is None else excluded.to(ids.device))


def recommend_sids(model, items: SidItems, trie: Trie, histories: pl.Series, cfg: EvalConfig, max_history: int,
                   bar=None) -> tuple[np.ndarray, np.ndarray]:
    """Ranked item ids [S, num_beams] (0 = none) and their scores (-inf there) for each history."""
    device = next(model.parameters()).device
    dtrie = DeviceTrie(trie, device)
    out_items = np.zeros((len(histories), cfg.num_beams), dtype=np.int64)
    out_scores = np.full((len(histories), cfg.num_beams), -np.inf, dtype=np.float32)
    model.eval()
    for start in range(0, len(histories), cfg.batch_on(device)):
        batch = histories.slice(start, cfg.batch_on(device))
        ids, mask = items.histories(batch, max_history)
        hist, hist_len = batch.explode().drop_nulls().to_numpy(), batch.list.len().to_numpy()
        excluded = excluded_rows(trie, hist, hist_len) if cfg.exclude_history else None
        leaves, scores = sid_beam_search(model, ids.to(device), mask.to(device), dtrie, cfg.num_beams, cfg.length_penalty,
                                         cfg.renormalize, excluded)
        rows = slice(start, start + len(ids))
        out_items[rows], out_scores[rows] = ranked_items(trie, leaves.cpu().numpy(), scores.cpu().numpy(), cfg.num_beams,
                                                         (hist, hist_len) if cfg.exclude_history else None)
        if bar is not None:
            bar.update(len(ids))
    return out_items, out_scores
