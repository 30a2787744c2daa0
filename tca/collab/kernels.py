"""Numba kernels (the only ones in tca/): the per-sample walk of the collaborative tokenizer.

Both kernels take numpy arrays and return or fill numpy arrays, `prange` over (chunks of) samples. The trie
is passed as its CSR arrays (see tca/collab/trie.py); sample b's gold item sits at row rank[b] of the
sorted items, so its path is found by descending into the child whose range holds that row.
CF scores arrive in that sorted order too (column j = item item_order[j]), so every pass over a
sample's scores is a contiguous, vectorized sweep rather than a gather.
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
EXP_DEGREE = 8  # Taylor terms of exp(r), |r| <= ln(2) / 2: relative error < 3e-10, far below float32 probs
EXP_COEFFS = tuple(1.0 / math.factorial(k) for k in range(EXP_DEGREE - 1, -1, -1))  # Horner: 1/7!, ..., 1/0!
EXP_LEAD = 1.0 / math.factorial(EXP_DEGREE)


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


@njit(cache=True)
def _row_max(scores):
    """(max, number of non-finite values) of a float32 row, on the integer view of its bits: LLVM
    vectorizes integer max reductions but not float ones (3-7x faster on 20k items)."""
    bits = scores.view(np.int32)
    top, n_bad = np.int32(-2147483648), 0
    for j in range(len(bits)):
        i = bits[j]
        n_bad += (i & 0x7F800000) == 0x7F800000  # exponent all ones: inf or NaN
        top = max(top, i ^ ((i >> 31) & 0x7FFFFFFF))  # floats ordered as signed ints (negatives mirrored)
    out = np.empty(1, dtype=np.int32)
    out[0] = top ^ ((top >> 31) & 0x7FFFFFFF)  # the same map is its own inverse
    return np.float64(out.view(np.float32)[0]), n_bad


@njit(cache=True, fastmath=FAST)
def _exp_shifted(scores, row, bits, top, inv_tau):
    """row <- exp((scores - top) * inv_tau) in float64 for scores <= top, written so that LLVM
    vectorizes it (a call to libm's exp would not be): exp(x) = 2^n exp(r), n = round(x / ln 2),
    |r| <= ln(2) / 2, exp(r) by its Taylor series to r^EXP_DEGREE, 2^n assembled from its exponent
    bits (bits: int64 scratch). Results below 1e-307 are flushed to 0 (x is clamped at -708 so that
    2^n stays a normal float)."""
    for j in range(len(row)):
        x = max((np.float64(scores[j]) - top) * inv_tau, -708.0)
        n = np.floor(x * LOG2E + 0.5)
        r = (x - n * LN2_HI) - n * LN2_LO
        p = EXP_LEAD
        for c in EXP_COEFFS:
            p = p * r + c
        row[j] = p
        bits[j] = (np.int64(n) + 1023) << 52
    scale = bits.view(np.float64)
    for j in range(len(row)):
        row[j] = row[j] * scale[j] if scale[j] > 1e-307 else 0.0


@njit(cache=True)
def _kth_largest(mass, k):
    """The k-th largest of the non-negative `mass` (1 <= k <= len): the largest t with at least k
    masses >= t, found bit by bit on the int64 view (an order-preserving one for non-negative floats).
    Each of the 63 steps is one vectorized counting pass: no data-dependent branches, which made
    a quickselect 3x slower on the root's ~1000 children."""
    bits = mass.view(np.int64)
    t = np.int64(0)
    for bit in range(62, -1, -1):
        candidate = t | (np.int64(1) << bit)
        n = 0
        for i in range(len(bits)):
            n += bits[i] >= candidate
        if n >= k:
            t = candidate
    out = np.empty(1, dtype=np.int64)
    out[0] = t
    return out.view(np.float64)[0]


@njit(cache=True)
def _keep_top_k(mass, keep, k, gold):
    """keep <- the k largest masses (ties to the smaller token, as a stable sort), the gold one
    always: if it is not among them it replaces the smallest kept. Linear time; returns the kept mass."""
    m = len(mass)
    threshold = _kth_largest(mass, k)
    room = k
    for i in range(m):
        room -= mass[i] > threshold  # places left for masses equal to the threshold
    for i in range(m):
        keep[i] = mass[i] > threshold or (mass[i] == threshold and room > 0)
        room -= mass[i] == threshold and keep[i]
    if not keep[gold]:
        for i in range(m - 1, -1, -1):  # the smallest kept mass is the threshold: drop its last holder
            if keep[i] and mass[i] == threshold:
                keep[i] = False
                break
        keep[gold] = True
    kept = 0.0
    for i in range(m):
        kept += mass[i] if keep[i] else 0.0
    return kept


CHUNK = 16  # samples per prange task sharing scratch rows (2 x 8 bytes x items): fresh rows per sample cost ~10 us of page faults each


@njit(parallel=True, cache=True, fastmath=FAST)
def fill_entries(
    scores, rank, pos_start, ent_start, inv_tau, uniform, top_k,
    child_ptr, child_token, child_node, node_lo, node_hi,
    pos_end, token, prob, dropped, bad,
):  # fmt: skip
    """Write q_t of every position of every sample (scores: float32 [B, N] in sorted-item order).

    q_t(child) = the softmax(scores / tau) mass over the parent's items of the items under the
    child. Per sample, the scores are exponentiated once against their max (float64); each
    position then sums its children's ranges in one sweep over the parent's range (the children
    tile it in order). Where the parent's sum underflows (its best item is ~700 tau below the
    sample's best) the position is recomputed from the scores against the parent's own max.
    `uniform` puts 1 on each child instead. With top_k > 0 only the k largest entries are kept
    (the gold child always), renormalized; dropped[p] is the mass removed. Entries stay in token
    order within a position; pos_end[p] is the end offset of position p's entries. bad[b] marks
    (and skips) non-finite scores.
    """
    max_children = np.max(np.diff(child_ptr))
    n_items = 0 if uniform else scores.shape[1]
    for c in prange((len(rank) + CHUNK - 1) // CHUNK):
        mass = np.empty(max_children, dtype=np.float64)
        keep = np.empty(max_children, dtype=np.bool_)
        row = np.empty(n_items, dtype=np.float64)
        bits = np.empty(n_items, dtype=np.int64)
        for b in range(c * CHUNK, min((c + 1) * CHUNK, len(rank))):
            _fill_sample(
                b, scores, rank, pos_start, ent_start, inv_tau, uniform, top_k,
                child_ptr, child_token, child_node, node_lo, node_hi,
                pos_end, token, prob, dropped, bad, mass, keep, row, bits,
            )  # fmt: skip


@njit(cache=True, fastmath=FAST)
def _fill_sample(
    b, scores, rank, pos_start, ent_start, inv_tau, uniform, top_k,
    child_ptr, child_token, child_node, node_lo, node_hi,
    pos_end, token, prob, dropped, bad, mass, keep, row, bits,
):  # fmt: skip
    """fill_entries for sample b, with the caller's scratch arrays."""
    if not uniform:
        top, n_bad = _row_max(scores[b])
        if n_bad:
            bad[b] = True
            return
        _exp_shifted(scores[b], row, bits, top, inv_tau)
    node, p, e, r = 0, pos_start[b], ent_start[b], rank[b]
    while child_ptr[node + 1] > child_ptr[node]:
        c0, c1 = child_ptr[node], child_ptr[node + 1]
        m = c1 - c0
        gold = _gold_edge(c0, c1, r, child_node, node_hi) - c0
        total = 0.0
        if uniform or m == 1:  # (a single child takes all the mass, whatever the scores)
            mass[:m] = 1.0
            total = m
        else:
            j = node_lo[node]
            for k in range(m):
                end = node_hi[child_node[c0 + k]]
                s0, s1 = row[j], 0.0  # two chains: the sweep is bound by the adds' latency
                j += 1
                while j + 1 < end:
                    s0 += row[j]
                    s1 += row[j + 1]
                    j += 2
                if j < end:
                    s0 += row[j]
                    j += 1
                mass[k] = s0 + s1
                total += mass[k]
            if total < TINY:
                parent_top = -np.inf
                for j in range(node_lo[node], node_hi[node]):
                    parent_top = max(parent_top, np.float64(scores[b, j]))
                total = 0.0
                for k in range(m):
                    child = child_node[c0 + k]
                    s = 0.0
                    for j in range(node_lo[child], node_hi[child]):
                        s += math.exp((np.float64(scores[b, j]) - parent_top) * inv_tau)
                    mass[k] = s
                    total += s
        kept = total
        if 0 < top_k < m:
            kept = _keep_top_k(mass[:m], keep[:m], top_k, gold)
            scale = 1.0 / kept
            for k in range(m):
                if keep[k]:
                    token[e] = child_token[c0 + k]
                    prob[e] = mass[k] * scale
                    e += 1
        else:
            scale = 1.0 / kept
            for k in range(m):
                token[e + k] = child_token[c0 + k]
                prob[e + k] = mass[k] * scale
            e += m
        dropped[p] = 1.0 - kept / total
        pos_end[p] = e
        p += 1
        node = child_node[c0 + gold]
