"""Full-ranking metrics against hand-computed values and a brute-force sort."""
import math

import numpy as np
import pytest
import torch

from tca.metrics import bootstrap_interval, list_ranks, per_sample_metrics, popularity_scores, ranking_metrics, target_ranks


def brute_rank(row: list[float], target: int) -> int:
    """Position of target in a stable descending sort of items 1..N (ties: lower id first)."""
    order = sorted(range(1, len(row)), key=lambda i: (-row[i], i))
    return order.index(target)


def test_hand_computed_example():
    scores = torch.tensor(
        [
            [9.0, 0.1, 0.9, 0.5, 0.3],  # target 2 is best among 1..4; huge padding score ignored
            [0.0, 0.1, 0.9, 0.5, 0.3],  # target 4: behind 2 and 3 -> rank 2
            [0.0, 0.2, 0.2, 0.2, 0.9],  # target 3 ties with 1 and 2 -> after them -> rank 3
        ]
    )
    target = torch.tensor([2, 4, 3])
    assert target_ranks(scores, target).tolist() == [0, 2, 3]
    m = ranking_metrics(torch.tensor([0, 2, 3]), ks=(1, 5))
    assert m["hr@1"] == pytest.approx(1 / 3)
    assert m["hr@5"] == pytest.approx(1.0)
    assert m["ndcg@1"] == pytest.approx(1 / 3)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(5)) / 3)


def test_ranks_match_brute_force_with_ties():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (50, 21), generator=gen).double()  # many ties
    target = torch.randint(1, 21, (50,), generator=gen)
    expect = [brute_rank(scores[b].tolist(), int(target[b])) for b in range(50)]
    assert target_ranks(scores, target).tolist() == expect
    # a shared score row [1, N+1] broadcasts over the samples (the popularity baseline)
    shared = target_ranks(scores[:1], target)
    assert shared.tolist() == [brute_rank(scores[0].tolist(), int(t)) for t in target]


def test_metrics_match_brute_force():
    ranks = torch.tensor([0, 1, 4, 5, 9, 10, 300])
    m = ranking_metrics(ranks)
    for k in (1, 5, 10):
        hits = [r for r in ranks.tolist() if r < k]
        assert m[f"hr@{k}"] == pytest.approx(len(hits) / 7)
        assert m[f"ndcg@{k}"] == pytest.approx(sum(1 / math.log2(r + 2) for r in hits) / 7)
    assert list(m) == ["hr@1", "hr@5", "hr@10", "ndcg@1", "ndcg@5", "ndcg@10"]


def test_list_ranks():
    ranked = torch.tensor([[5, 3, 7], [1, 2, 4], [9, 8, 6]])
    assert list_ranks(ranked, torch.tensor([7, 1, 2])).tolist() == [2, 0, 3]  # absent -> K


def test_popularity_scores_count_train_targets():
    pop = popularity_scores(torch.tensor([3, 3, 1, 3, 2, 1]), n_items=4)
    assert pop.tolist() == [[0, 2, 1, 3, 0]]
    assert target_ranks(pop, torch.tensor([3, 1, 2, 4])).tolist() == [0, 1, 2, 3]


def test_bootstrap_interval_holds_the_mean_and_has_the_binomial_width():
    hits = (np.random.default_rng(0).random(4000) < 0.2).astype(float)
    lo, hi = bootstrap_interval(hits)
    assert lo < hits.mean() < hi
    half = 1.96 * np.sqrt(hits.mean() * (1 - hits.mean()) / len(hits))  # the normal approximation
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    # rows are independent metrics resampled together; a constant has a zero-width interval
    both = bootstrap_interval(np.stack([hits, np.full(4000, 0.5)]))
    np.testing.assert_allclose(both[0], [lo, hi])
    assert both[1].tolist() == [0.5, 0.5]


def test_paired_interval_is_narrower_than_the_unpaired_one():
    """Two models that agree on most samples: the interval of the per-sample difference is far narrower
    than what two independent intervals would suggest, and it excludes 0 when one model is better."""
    rng = np.random.default_rng(1)
    a = (rng.random(2000) < 0.3).astype(float)
    b = a.copy()
    b[rng.choice(np.flatnonzero(a == 0), 40, replace=False)] = 1.0  # b also hits 40 samples a misses
    lo, hi = bootstrap_interval(b - a)
    assert 0 < lo < (b - a).mean() < hi
    (a_lo, a_hi), (b_lo, b_hi) = bootstrap_interval(np.stack([a, b]))
    assert b_lo < a_hi  # the separate intervals overlap
    assert hi - lo < (a_hi - a_lo) / 2


def test_per_sample_metrics_average_to_ranking_metrics():
    ranks = torch.tensor([0, 3, 9, 10, 2, 50])
    per = per_sample_metrics(ranks.numpy())
    assert {k: pytest.approx(v.mean()) for k, v in per.items()} == ranking_metrics(ranks)
