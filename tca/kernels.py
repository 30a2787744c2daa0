"""Numba kernels (the only ones in tca/): the per-sample walk of the collaborative tokenizer.

Both kernels take numpy arrays and return or fill numpy arrays, `prange` over samples. The trie
is passed as its CSR arrays (see tca/trie.py); sample b's gold item sits at row rank[b] of the
sorted items, so its path is found by descending into the child whose range holds that row.
Count pass first (sizes only), then the caller allocates flat outputs and the fill pass writes
each sample's slice at its offsets: no per-sample Python objects, no locks.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

TINY = 1e-250  # a sum of exps below this may have lost terms to underflow (float64 min normal: 2e-308)
# Vectorizable float math (reassociation, FMA contraction) but NaN/inf kept meaningful: the kernels test finiteness.
FAST = {"reassoc", "contract", "arcp", "nsz", "afn"}
LOG2E, LN2_HI, LN2_LO = 1.4426950408889634, 0.693145751953125, 1.42860682030941723212e-6  # ln 2 = HI + LO
EXP_COEFFS = tuple(1.0 / math.factorial(k) for k in range(11, -1, -1))  # Horner: 1/11!, ..., 1/1!, 1/0!


@njit(cache=True)
def _gold_edge(c0, c1, r, child_node, node_hi):
    """The edge in [c0, c1) whose child's item range holds sorted row r (children ranges ascend)."""
    while c0 < c1 - 1:
        mid = (c0 + c1) // 2
        if node_hi[child_node[mid - 1]] > r:
            c1 = mid
        else:
            c0 = mid
    return c0


@njit(parallel=True, cache=True)
def count_entries(rank, top_k, child_ptr, child_node, node_hi):
    """Per sample: positions on its gold path, and entries stored (children, capped at top_k if > 0)."""
    n_pos = np.zeros(len(rank), dtype=np.int64)
    n_ent = np.zeros(len(rank), dtype=np.int64)
    for b in prange(len(rank)):
        node = 0
        while child_ptr[node + 1] > child_ptr[node]:
            c0, c1 = child_ptr[node], child_ptr[node + 1]
            n_pos[b] += 1
            n_ent[b] += min(c1 - c0, top_k) if top_k > 0 else c1 - c0
            node = child_node[_gold_edge(c0, c1, rank[b], child_node, node_hi)]
    return n_pos, n_ent


@njit(cache=True, fastmath=FAST)
def _exp_shifted(row, bits, top, inv_tau):
    """row <- exp((row - top) * inv_tau) for row <= top, written so that LLVM vectorizes it (a call
    to libm's exp would not be): exp(x) = 2^n exp(r), n = round(x / ln 2), |r| <= ln(2) / 2, exp(r)
    by its Taylor series to r^12, 2^n assembled from its exponent bits (relative error < 1e-13).
    Results below 1e-307 are flushed to 0 (x is clamped at -708 so that 2^n stays a normal float)."""
    for j in range(len(row)):
        x = max((row[j] - top) * inv_tau, -708.0)
        n = np.floor(x * LOG2E + 0.5)
        r = (x - n * LN2_HI) - n * LN2_LO
        p = 1.0 / 479001600.0
        for c in EXP_COEFFS:
            p = p * r + c
        row[j] = p
        bits[j] = (np.int64(n) + 1023) << 52
    scale = bits.view(np.float64)
    for j in range(len(row)):
        row[j] = row[j] * scale[j] if scale[j] > 1e-307 else 0.0


@njit(cache=True)
def _keep_top_k(mass, keep, k, gold):
    """keep <- the k largest masses (ties to the smaller token, as a stable sort), the gold one
    always: if it is not among them it replaces the smallest kept. Linear time (a partition)."""
    m = len(mass)
    threshold = np.partition(mass, m - k)[m - k]  # the k-th largest
    room = k - np.sum(mass > threshold)  # places left for masses equal to the threshold
    for i in range(m):
        keep[i] = mass[i] > threshold or (mass[i] == threshold and room > 0)
        room -= mass[i] == threshold and keep[i]
    if not keep[gold]:
        for i in range(m - 1, -1, -1):  # the smallest kept mass is the threshold: drop its last holder
            if keep[i] and mass[i] == threshold:
                keep[i] = False
                break
        keep[gold] = True


@njit(parallel=True, cache=True, fastmath=FAST)
def fill_entries(
    scores, rank, pos_start, ent_start, inv_tau, uniform, top_k,
    child_ptr, child_token, child_node, node_lo, node_hi, item_order,
    pos_end, token, prob, dropped, bad,
):  # fmt: skip
    """Write q_t of every position of every sample (scores: [B, > max item id] by item id).

    q_t(child) = the softmax(scores / tau) mass over the parent's items of the items under the
    child. Per sample, the scores are gathered into sorted-item order and exponentiated once
    against their max (float64); each position then only sums ranges. Where the parent's sum
    underflows (its best item is ~700 tau below the sample's best) the position is recomputed
    from the scores against the parent's own max. `uniform` puts 1 on each child instead.
    With top_k > 0 only the k largest entries are kept (the gold child always), renormalized;
    dropped[p] is the mass removed. Entries stay in token order within a position; pos_end[p]
    is the end offset of position p's entries. bad[b] marks (and skips) non-finite scores.
    """
    max_children = np.max(np.diff(child_ptr))
    n_items = 0 if uniform else len(item_order)
    for b in prange(len(rank)):
        mass = np.empty(max_children, dtype=np.float64)
        keep = np.empty(max_children, dtype=np.bool_)
        row = np.empty(n_items, dtype=np.float64)
        bits = np.empty(n_items, dtype=np.int64)
        top, check = -np.inf, 0.0
        for j in range(n_items):  # one pass: gather into sorted-item order, max, finiteness
            v = np.float64(scores[b, item_order[j]])
            row[j] = v
            top = v if v > top else top
            check += v  # float32 scores cannot overflow a float64 sum: it is finite iff they all are
        if not np.isfinite(check):
            bad[b] = True
            continue
        _exp_shifted(row, bits, top, inv_tau)
        node, p, e, r = 0, pos_start[b], ent_start[b], rank[b]
        while child_ptr[node + 1] > child_ptr[node]:
            c0, c1 = child_ptr[node], child_ptr[node + 1]
            m = c1 - c0
            gold = _gold_edge(c0, c1, r, child_node, node_hi) - c0
            if uniform or m == 1:  # (a single child takes all the mass, whatever the scores)
                mass[:m] = 1.0
            else:
                for k in range(m):
                    child = child_node[c0 + k]
                    mass[k] = row[node_lo[child] : node_hi[child]].sum()
                if mass[:m].sum() < TINY:
                    parent_top = -np.inf
                    for j in range(node_lo[node], node_hi[node]):
                        parent_top = max(parent_top, np.float64(scores[b, item_order[j]]))
                    for k in range(m):
                        child = child_node[c0 + k]
                        s = 0.0
                        for j in range(node_lo[child], node_hi[child]):
                            s += math.exp((np.float64(scores[b, item_order[j]]) - parent_top) * inv_tau)
                        mass[k] = s
            total = mass[:m].sum()
            kept = total
            keep[:m] = True
            if 0 < top_k < m:
                _keep_top_k(mass[:m], keep[:m], top_k, gold)
                kept = mass[:m][keep[:m]].sum()
            for k in range(m):
                if keep[k]:
                    token[e] = child_token[c0 + k]
                    prob[e] = mass[k] / kept
                    e += 1
            dropped[p] = 1.0 - kept / total
            pos_end[p] = e
            p += 1
            node = child_node[c0 + gold]
