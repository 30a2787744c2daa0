"""Trie-constrained beam search over a KV cache, vectorized over beams and samples.

Each of a sample's beams is one row of the model's batch (row b * W + k, W = K on a GPU) and
carries its trie node; a dead beam's row stays, masked. Its allowed next tokens are the node's children, gathered
from the CSR arrays on the model's device: no vocabulary-sized mask, no Python loop per beam or per
token, and no read-back to the host inside a step (`Syncs`). The search follows Hugging Face's beam search step for
step (the 2K best candidates per sample; a title that ends there counts only if it ranks among the
top K; the K best unfinished ones go on; finished titles are ranked by score / length ** length_penalty;
HF's default early-stopping rule), so its lists equal `generate` with a prefix-allowed-tokens
function. It is cheaper than `generate` because each prompt is encoded and stored once, not once per
beam (tca.llm.beam_attention), and (on a CPU) finished samples and dead beams leave the batch.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from tca.llm.beam_attention import BeamKV, switched_to
from tca.llm.hybrid_prompt import input_embeds
from tca.llm.prompt import Prompts
from tca.ragged import concat_ranges, pad
from tca.collab.trie import Trie

NEG_INF = float("-inf")


class DeviceTrie:
    """The CSR arrays the search reads, as int64 tensors on the model's device, and the widest node
    of each depth (a host list: step t of the search gathers that many children per beam, a fixed shape)."""

    def __init__(self, trie: Trie, device: torch.device | str):
        self.child_ptr = torch.as_tensor(trie.child_ptr, dtype=torch.long, device=device)
        self.child_token = torch.as_tensor(trie.child_token, dtype=torch.long, device=device)
        self.child_node = torch.as_tensor(trie.child_node, dtype=torch.long, device=device)
        self.node_lo = torch.as_tensor(trie.node_lo, dtype=torch.long, device=device)
        self.node_hi = torch.as_tensor(trie.node_hi, dtype=torch.long, device=device)
        depth = trie.depths()
        self.max_depth = int(depth.max())
        branching = np.zeros(self.max_depth + 1, dtype=np.int64)
        np.maximum.at(branching, depth, np.diff(trie.child_ptr))
        self.branching = branching[: self.max_depth].tolist()

    def children(self, nodes: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """nodes [R] -> edge ids [R, width] (width >= the most children among these nodes) and which of them exist."""
        start = self.child_ptr[nodes]
        count = self.child_ptr[nodes + 1] - start
        offset = torch.arange(width, device=nodes.device)
        valid = offset < count[:, None]
        return torch.where(valid, start[:, None] + offset, 0), valid

    def has_open_items(self, nodes: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
        """nodes [R, C], excluded [R, H] (distinct sorted-item rows of each row's excluded items, -1 padded)
        -> [R, C]: whether some item under the node is not excluded."""
        lo, hi = self.node_lo[nodes], self.node_hi[nodes]
        inside = (excluded[:, None, :] >= lo[..., None]) & (excluded[:, None, :] < hi[..., None])
        return inside.sum(-1) < hi - lo

    def is_leaf(self, nodes: torch.Tensor) -> torch.Tensor:
        return self.child_ptr[nodes + 1] == self.child_ptr[nodes]


def _forward(model, position: torch.Tensor, kv: BeamKV, **tokens) -> torch.Tensor:
    """The next-token logits [R, V] at the last position of `input_ids` (or `inputs_embeds`); adds the
    rows' keys/values to `kv`."""
    out = model(**tokens, position_ids=position, beam_kv=kv, use_cache=False, logits_to_keep=1)
    return out.logits[:, -1].float()


@dataclass(frozen=True)
class Syncs:
    """When the search reads back from the device. On a CPU a read-back costs nothing and every row
    costs compute: check every step, drop finished samples and trim dead beams' rows. On a GPU a read-back
    stalls the queue and a step costs about the same with more rows: check every few steps and keep
    every shape fixed (a step could then be graph-captured or compiled)."""

    check_every: int  # steps between reading back whether any beam still runs (the search's one host sync)
    shrink: bool  # at each check, finished samples leave the batch and rows per sample fall to the most running beams (shapes change)

    @classmethod
    def default(cls, device: torch.device) -> "Syncs":
        return cls(1, True) if device.type == "cpu" else cls(4, False)


@torch.inference_mode()
def beam_search(model, prompts: Prompts, trie: DeviceTrie, num_beams: int = 10, length_penalty: float = 1.0,
                renormalize: bool = False, slot_vectors: torch.Tensor | None = None, tau: float = 1.0,
                excluded: torch.Tensor | None = None, syncs: Syncs | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The `num_beams` best complete titles per prompt: their trie leaves [B, K] (-1 where fewer titles
    finished) and ranked scores [B, K] (-inf there). A title's score is the sum of its tokens' log-probs
    (full softmax, or with `renormalize` the softmax of logits / `tau` over the trie children: the
    distribution MSL trains with its train.msl_tau) / its length ** length_penalty.
    Hybrid prompts (with `prompts.slot`) need the CF vectors of their slots (`HybridPrompt.vectors`).
    `excluded` [B, H] (`excluded_rows`): items no title may lead to (a sample's history): a token is
    allowed only if some item under its node is not excluded. `syncs`: default for the model's device.
    """
    device, K, lp = trie.child_ptr.device, num_beams, length_penalty
    lengths = torch.as_tensor(prompts.lengths, device=device)
    ids = torch.from_numpy(pad(prompts.ids, prompts.lengths, fill=0, left=True)).to(device)  # pad id never attended
    prompt_mask = torch.arange(ids.shape[1], device=device) >= ids.shape[1] - lengths[:, None]
    kv = BeamKV(prompt_mask)
    if prompts.slot is None:
        tokens = {"input_ids": ids}
    else:
        if slot_vectors is None:
            raise ValueError("hybrid prompts need the CF vectors of their slots (slot_vectors)")
        slot = torch.from_numpy(pad(prompts.slot, prompts.lengths, fill=0, left=True)).to(device)
        tokens = {"inputs_embeds": input_embeds(model, ids, slot, slot_vectors)}

    def advance(src: torch.Tensor, keep: torch.Tensor | None, t: int, tokens: torch.Tensor) -> torch.Tensor:
        nonlocal lengths
        if keep is not None:
            lengths = lengths[keep]
        kv.select(src, keep)
        position = lengths[:, None].expand(-1, kv.width).reshape(-1, 1) + t  # row b * W + k: beam k of sample b
        return _forward(model, position, kv, input_ids=tokens[:, None])

    with switched_to(model, ids.shape[1] + trie.max_depth):
        return search(trie, _forward(model, (prompt_mask.cumsum(1) - 1).clamp(min=0), kv, **tokens), K, lp, renormalize, advance, tau,
                      excluded=None if excluded is None else excluded.to(device), syncs=syncs)


def search(trie: DeviceTrie, logits: torch.Tensor, K: int, lp: float, renormalize: bool,
           advance: Callable[[torch.Tensor, torch.Tensor | None, int, torch.Tensor], torch.Tensor],
           tau: float = 1.0, excluded: torch.Tensor | None = None, syncs: Syncs | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The search proper, from each sample's first next-token logits [B, V] (row b: sample b), for
    any model: `advance(src, keep, t, tokens)` makes row b * W + k of the new batch (beam k of its
    b-th sample; W = len(src) / samples) continue row src[b * W + k] of the previous one with
    tokens[b * W + k] at step t and returns the new rows' next-token logits [B' * W, V]; `keep`
    (None: all) are the indices of the previous batch's samples that stay in it (`syncs.shrink`).
    `tau`: the temperature of the renormalized softmax; `excluded`: see `beam_search`.

    A step's shapes depend on (samples in the batch, K, t) only and it reads nothing back to the
    host: rows of dead beams and of finished samples stay in the batch, masked (score -inf), until
    the next check (`Syncs`)."""
    device, B = logits.device, len(logits)
    syncs = syncs or Syncs.default(device)
    # rows of the model's batch, [samples, W] (W = 1 before the first step, K after): trie node and summed log-prob
    node = torch.zeros(B, dtype=torch.long, device=device)
    score = torch.zeros(B, device=device)
    # per sample in the batch: its finished titles, whether it is done, and which input sample it is
    fin_score = torch.full((B, K), NEG_INF, device=device)
    fin_node = torch.full((B, K), -1, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    sample = torch.arange(B, device=device)
    out_score, out_node = fin_score.clone(), fin_node.clone()  # [B, K], by input sample
    for t in range(trie.max_depth):
        n, C = len(sample), trie.branching[t]
        W = len(node) // n
        edge, valid = trie.children(node, C)
        valid &= (score > NEG_INF)[:, None]  # a dead row proposes nothing
        if excluded is not None:
            valid &= trie.has_open_items(trie.child_node[edge].view(n, W * C), excluded).view(n * W, C)
        z = logits.gather(1, trie.child_token[edge])
        if renormalize:
            z = z / tau
            logp = z - z.masked_fill(~valid, NEG_INF).logsumexp(1, keepdim=True)
        else:
            logp = z - logits.logsumexp(1, keepdim=True)
        cand = (score[:, None] + logp).masked_fill(~valid, NEG_INF).view(n, W * C)  # [samples, beams x children]
        cand_edge = edge.view(n, W * C)
        if W * C < 2 * K:  # always 2K candidates, the ones beyond the children -inf
            cand = torch.nn.functional.pad(cand, (0, 2 * K - W * C), value=NEG_INF)
            cand_edge = torch.nn.functional.pad(cand_edge, (0, 2 * K - W * C))
        top_score, top = cand.topk(2 * K)
        top_edge = cand_edge.gather(1, top)
        top_node = trie.child_node[top_edge]
        ends = trie.is_leaf(top_node) & (top_score > NEG_INF)

        # titles that end here join the finished pool if they rank in the top K candidates (as in HF)
        new = torch.where(ends[:, :K], top_score[:, :K] / (t + 1) ** lp, NEG_INF)
        fin_score, best = torch.cat([fin_score, new], 1).topk(K)
        fin_node = torch.cat([fin_node, top_node[:, :K]], 1).gather(1, best)

        # the K best unfinished candidates go on; HF's rule stops a sample once its best running
        # beam, length-penalized at the current length, cannot beat its worst finished title
        run_score, pick = top_score.masked_fill(ends, NEG_INF).topk(K)
        done |= ~(run_score[:, 0] / (t + 1) ** lp > fin_score[:, -1])
        run_score = run_score.masked_fill(done[:, None], NEG_INF)
        pick_row, pick_edge = top.gather(1, pick) // C, top_edge.gather(1, pick)
        keep = None
        if t + 1 == trie.max_depth:
            break
        if (t + 1) % syncs.check_every == 0:
            running = run_score[:, 0] > NEG_INF
            if not running.any():
                break
            if syncs.shrink and not running.all():
                out_score[sample], out_node[sample] = fin_score, fin_node  # final for the samples that leave
                keep = running.nonzero().squeeze(1)
                sample, fin_score, fin_node, done, run_score, pick_row, pick_edge = (
                    x[keep] for x in (sample, fin_score, fin_node, done, run_score, pick_row, pick_edge))
                excluded = None if excluded is None else excluded[keep]
            if syncs.shrink:  # a sample's running beams come first (sorted): as many rows as the most of them
                width = int((run_score > NEG_INF).sum(1).max())
                run_score, pick_row, pick_edge = run_score[:, :width], pick_row[:, :width], pick_edge[:, :width]
        block = torch.arange(len(sample), device=device) if keep is None else keep  # the samples' blocks of rows before the step
        src = (block[:, None] * W + pick_row.clamp(max=W - 1)).flatten()  # padding candidates: any row (dead)
        score, step_edge = run_score.flatten(), pick_edge.flatten()
        node = trie.child_node[step_edge]
        logits = advance(src, keep, t, trie.child_token[step_edge])
    out_score[sample], out_node[sample] = fin_score, fin_node
    return torch.where(out_score > NEG_INF, out_node, -1), out_score


def excluded_rows(trie: Trie, history: np.ndarray, hist_len: np.ndarray) -> torch.Tensor:
    """Ragged item ids per sample -> [B, H]: their distinct rows in the trie's sorted item order, -1 padded."""
    history = np.asarray(history, dtype=np.int64)
    sample = np.repeat(np.arange(len(hist_len)), hist_len)
    rows = np.unique(sample * len(trie.item_order) + trie.item_rank[history])  # sorted, distinct per sample
    sample, rows = np.divmod(rows, len(trie.item_order))
    return torch.from_numpy(pad(rows, np.bincount(sample, minlength=len(hist_len)).astype(np.int64), fill=-1))


def ranked_items(trie: Trie, leaves: np.ndarray, scores: np.ndarray, k: int,
                 excluded: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Ranked leaves [B, K] -> the first k items [B, k] (0 = none) and their scores (-inf there).

    A leaf stands for every item with that exact target (the data stage merges equal titles, so
    normally one); its items share its score and follow each other in item-id order. `excluded`
    (ragged item ids, count per sample) leaves those items out of each sample's list.
    """
    leaves, scores = np.asarray(leaves), np.asarray(scores)
    ok = leaves >= 0
    lo, hi = trie.node_lo[leaves[ok]], trie.node_hi[leaves[ok]]
    count = (hi - lo).astype(np.int64)
    items = trie.item_order[concat_ranges(lo, count)].astype(np.int64)
    owner = np.repeat(np.nonzero(ok)[0], count)
    item_scores = np.repeat(scores[ok], count)
    if excluded is not None:
        history, hist_len = (np.asarray(a, dtype=np.int64) for a in excluded)
        span = int(max(items.max(initial=0), history.max(initial=0))) + 1
        keep = ~np.isin(owner * span + items, np.repeat(np.arange(len(hist_len)), hist_len) * span + history)
        items, owner, item_scores = items[keep], owner[keep], item_scores[keep]
    per_sample = np.bincount(owner, minlength=len(leaves)).astype(np.int64)
    width = max(k, int(per_sample.max(initial=0)))
    return (pad(items, per_sample, fill=0, width=width)[:, :k],
            pad(item_scores, per_sample, fill=NEG_INF, width=width)[:, :k])
