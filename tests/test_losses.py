"""The sparse losses equal dense references written from DESIGN.md's formulas (value and gradient)."""
import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F

from tca.collab.store import SoftLabels
from tca.errors import TcaError
from tca.llm.losses import LossConfig, Labels, make_labels, position_losses
from tca.collab.trie import build_trie

N, V, K = 12, 40, 6


def random_case(seed: int, gold_in_q: bool = True):
    """float64 logits [N, V], gold [N], and q as padded sparse rows (1..K distinct tokens each)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    gold = torch.randint(0, V, (N,), generator=g)
    q_col = torch.zeros(N, K, dtype=torch.long)
    q_prob = torch.zeros(N, K, dtype=torch.float64)
    for n in range(N):
        k = int(torch.randint(1, K + 1, (1,), generator=g))
        tokens = torch.randperm(V, generator=g)[:k]
        if gold_in_q:
            tokens[0] = gold[n] if gold[n] not in tokens else tokens[0]
        p = torch.rand(k, generator=g, dtype=torch.float64) + 0.05
        q_col[n, :k], q_prob[n, :k] = tokens, p / p.sum()
    return z, gold, q_col, q_prob


def dense_q(q_col, q_prob, width=V):
    return torch.zeros(q_col.shape[0], width, dtype=torch.float64).scatter_add_(1, q_col, q_prob)


def dense_soft_ntp(z, gold, q, alpha, allowed=None, tau=1.0):
    """-log sum_v y~(v) P(v), P the (masked, tempered) softmax, y~ = (1 - alpha) onehot + alpha q: all dense."""
    if allowed is not None:
        z = (z / tau).masked_fill(~allowed, float("-inf"))
    p = z.softmax(1)
    soft = (1 - alpha) * F.one_hot(gold, z.shape[1]).double() + alpha * q
    return -(soft * p).sum(1).log()


def dense_kl(z, gold, q, alpha, allowed=None, tau=1.0):
    if allowed is not None:
        z = (z / tau).masked_fill(~allowed, float("-inf"))
    log_p = z.log_softmax(1)
    kl = torch.where(q > 0, q * (q.log() - log_p), 0.0).sum(1)
    return -log_p.gather(1, gold[:, None])[:, 0] + alpha * kl


def value_and_grad(fn, z):
    z = z.clone().requires_grad_(True)
    loss = fn(z)
    (grad,) = torch.autograd.grad(loss.sum(), z)
    return loss.detach(), grad


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("gold_in_q", [True, False])
def test_soft_ntp_matches_dense_reference(alpha, gold_in_q):
    z, gold, q_col, q_prob = random_case(int(alpha * 10) + gold_in_q, gold_in_q)
    cfg = LossConfig("tca", alpha)
    labels = Labels(gold, q_col, q_prob, None, None)
    ours, grad = value_and_grad(lambda x: position_losses(x, labels, cfg), z)
    q = dense_q(q_col, q_prob)
    ref, ref_grad = value_and_grad(lambda x: dense_soft_ntp(x, gold, q, alpha), z)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-10)
    # the paper's gradient analysis: dL/dz = P - r, r = y~ P / <y~, P>
    p = z.softmax(1)
    soft = (1 - alpha) * F.one_hot(gold, V).double() + alpha * q
    r = soft * p / (soft * p).sum(1, keepdim=True)
    torch.testing.assert_close(grad, p - r, rtol=1e-9, atol=1e-10)


def test_alpha_zero_is_cross_entropy():
    z, gold, q_col, q_prob = random_case(7)
    for loss in ("tca", "kl", "ntp"):
        ours = position_losses(z, Labels(gold, q_col, q_prob, None, None), LossConfig(loss, 0.0))
        torch.testing.assert_close(ours, F.cross_entropy(z, gold, reduction="none"), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_kl_variant_is_ce_plus_alpha_kl(alpha):
    z, gold, q_col, q_prob = random_case(11)
    cfg = LossConfig("kl", alpha)
    ours, grad = value_and_grad(lambda x: position_losses(x, Labels(gold, q_col, q_prob, None, None), cfg), z)
    ref, ref_grad = value_and_grad(lambda x: dense_kl(x, gold, dense_q(q_col, q_prob), alpha), z)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("loss", ["tca", "kl", "ntp"])
@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_msl_matches_dense_masked_softmax(loss, tau):
    """Columns = a subset of the vocabulary, each position allowed some of them (its trie children)."""
    z_full, gold_tok, _, _ = random_case(3)
    g = torch.Generator().manual_seed(5)
    columns = torch.sort(torch.randperm(V, generator=g)[:15]).values
    allowed = torch.rand(N, len(columns), generator=g) < 0.4
    gold = torch.randint(0, len(columns), (N,), generator=g)
    allowed[torch.arange(N), gold] = True
    q_col = torch.zeros(N, K, dtype=torch.long)
    q_prob = torch.zeros(N, K, dtype=torch.float64)
    for n in range(N):  # q on the allowed columns only, always holding the gold
        cols = allowed[n].nonzero()[:, 0][:K]
        cols = torch.unique(torch.cat([gold[n : n + 1], cols]))[:K]
        p = torch.rand(len(cols), generator=g, dtype=torch.float64)
        q_col[n, : len(cols)], q_prob[n, : len(cols)] = cols, p / p.sum()
    alpha = 0.4
    cfg = LossConfig(loss, alpha, msl=True, msl_tau=tau)
    labels = Labels(gold, q_col, q_prob, columns, allowed)
    z = z_full[:, columns]
    ours, grad = value_and_grad(lambda x: position_losses(x, labels, cfg), z)
    # dense reference over the whole vocabulary with the mask mapped back to token ids
    allowed_v = torch.zeros(N, V, dtype=torch.bool)
    allowed_v[:, columns] = allowed
    q_v = dense_q(columns[q_col], q_prob)
    ref_fn = {"tca": dense_soft_ntp, "kl": dense_kl, "ntp": lambda x, gl, q, a, allowed, tau: dense_soft_ntp(x, gl, q, 0.0, allowed, tau)}[loss]
    ref, ref_grad = value_and_grad(lambda x: ref_fn(x, columns[gold], q_v, alpha, allowed_v, tau), z_full)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, ref_grad[:, columns], rtol=1e-9, atol=1e-10)
    assert ref_grad[:, [v for v in range(V) if v not in columns]].abs().max() == 0  # other tokens get no gradient


TITLES = ["Toy Story (1995)", "Toy Soldiers (1991)", "Fargo (1996)", "Fargo (1997)", "Heat (1995)", "Amélie (2001)"]


def test_make_labels_msl_columns_are_trie_children(tokenizer):
    from tca.collab.trie import target_ids

    targets = target_ids(tokenizer, pl.Series(TITLES))
    trie = build_trie(np.arange(1, len(TITLES) + 1), targets)
    seqs = [targets[i].to_list() for i in (0, 3, 5)]
    flat = np.concatenate(seqs).astype(np.int64)
    lengths = np.array([len(s) for s in seqs])
    labels = make_labels(flat, lengths, None, trie, LossConfig("ntp", msl=True))
    # brute force: at each position, the children of the prefix are the next ids of every title sharing it
    all_seqs = [t.to_list() for t in targets]
    n = 0
    for seq in seqs:
        for t in range(len(seq)):
            children = {s[t] for s in all_seqs if s[:t] == seq[:t]}
            got = set(labels.columns[labels.allowed[n]].tolist())
            assert got == children
            assert labels.columns[labels.gold[n]] == seq[t]
            n += 1
    assert n == len(flat)


def test_make_labels_flattens_reader_padding():
    soft = SoftLabels(
        token=torch.tensor([[[5, 6], [7, 0], [0, 0]], [[8, 9], [0, 0], [0, 0]]]),
        prob=torch.tensor([[[0.25, 0.75], [1.0, 0], [0, 0]], [[0.5, 0.5], [0, 0], [0, 0]]]),
        count=torch.tensor([[2, 1, 0], [2, 0, 0]]),
    )
    labels = make_labels(np.array([5, 7, 9]), np.array([2, 1]), soft, None, LossConfig("tca"))
    assert labels.q_col.tolist() == [[5, 6], [7, 0], [8, 9]]
    assert labels.q_prob.tolist() == [[0.25, 0.75], [1.0, 0.0], [0.5, 0.5]]
    with pytest.raises(TcaError, match="number of positions"):
        make_labels(np.array([5, 7, 9, 1]), np.array([3, 1]), soft, None, LossConfig("tca"))
    soft.prob[0, 0, 0] = -0.1
    with pytest.raises(TcaError, match="negative"):
        make_labels(np.array([5, 7, 9]), np.array([2, 1]), soft, None, LossConfig("tca"))


def test_bad_config():
    with pytest.raises(TcaError, match="train.loss"):
        LossConfig("focal")
    with pytest.raises(TcaError, match="tca.alpha"):
        LossConfig(alpha=1.5)
    with pytest.raises(TcaError, match="msl_tau"):
        LossConfig(msl=True, msl_tau=0)
