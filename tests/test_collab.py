"""q_t of the collaborative tokenizer against a brute-force reference; the Zarr store; the cf_dist stage."""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.context import StageContext
from pipeline.stages import cf_dist as cf_dist_stage
from tca.collab import store as collab_store
from tca.cf import CFConfig, build, pad_histories, save_checkpoint
from tca.cf.sasrec import SASRec
from tca.collab.tokenizer import CollabConfig, TokenDist, token_dist, without_history
from tca.collab.store import DistReader, DistWriter
from tca.errors import TcaError
from tca.collab.trie import Trie, build_trie, target_ids

EOS = 2
catalogs = st.lists(st.lists(st.integers(3, 6), max_size=5), min_size=1, max_size=25)  # shared prefixes, prefix titles, duplicates


def catalog(titles: list[list[int]]) -> tuple[Trie, dict[int, tuple]]:
    seqs = {3 * i + 1: tuple(t) + (EOS,) for i, t in enumerate(titles)}  # sparse item ids
    return build_trie(np.array(list(seqs)), pl.Series(list(seqs.values()), dtype=pl.List(pl.Int32))), seqs


def brute_q(seqs: dict[int, tuple], scores: np.ndarray, gold: int, tau: float) -> list[dict[int, float]]:
    """Per position of gold's ids: softmax (float64) over the items sharing the prefix, summed by next token."""
    out, y = [], seqs[gold]
    for t in range(len(y)):
        cands = [i for i, s in seqs.items() if s[:t] == y[:t]]
        top = max(float(scores[i]) for i in cands)
        w = {i: math.exp((float(scores[i]) - top) / tau) for i in cands}
        q = defaultdict(float)
        for i in cands:
            q[seqs[i][t]] += w[i] / sum(w.values())
        out.append(dict(sorted(q.items())))
    return out


def brute_top_k(q: dict[int, float], gold_token: int, k: int) -> dict[int, float]:
    kept = sorted(q, key=lambda v: -q[v])[:k]
    if gold_token not in kept:
        kept[-1] = gold_token
    return {v: q[v] / sum(q[u] for u in kept) for v in sorted(kept)}


def unpack(dist: TokenDist) -> list[list[dict[int, float]]]:
    """TokenDist -> per sample, per position {token: prob} (plain loops: the test's own reading)."""
    out = []
    for b in range(len(dist.sample_ptr) - 1):
        positions = []
        for p in range(dist.sample_ptr[b], dist.sample_ptr[b + 1]):
            lo, hi = dist.pos_ptr[p], dist.pos_ptr[p + 1]
            positions.append(dict(zip(dist.token[lo:hi].tolist(), dist.prob[lo:hi].tolist())))
        out.append(positions)
    return out


def random_scores(seqs: dict, n_samples: int, seed: int, scale: float) -> torch.Tensor:
    scores = torch.from_numpy(np.random.default_rng(seed).normal(0, scale, (n_samples, max(seqs) + 1)).astype(np.float32))
    scores[:, 0] = float("-inf")  # the padding column, as CF models return it
    return scores


def assert_close(got: list[dict[int, float]], want: list[dict[int, float]], tol: float = 1e-6) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert list(g) == list(w)  # identical support, tokens ascending
        assert max(abs(g[v] - w[v]) for v in w) < tol


@settings(max_examples=100, deadline=None)
@given(catalogs, st.integers(0, 1000), st.sampled_from([0.1, 1.0, 8.0]), st.sampled_from([0.3, 1.0, 2.0]), st.integers(0, 3))
def test_q_matches_brute_force(titles, seed, scale, tau, top_k):
    trie, seqs = catalog(titles)
    golds = np.array(list(seqs) * 2)  # every item as the gold of two samples with different scores
    scores = random_scores(seqs, len(golds), seed, scale)
    dist = token_dist(trie, golds, scores, CollabConfig(temperature=tau, top_k=top_k))
    paths = trie.paths(np.array([list(seqs[g]) + [-1] * (7 - len(seqs[g])) for g in golds]))
    for b, (got, gold) in enumerate(zip(unpack(dist), golds)):
        want = brute_q(seqs, scores[b].double().numpy(), gold, tau)
        y = seqs[gold]
        for t, q in enumerate(want):
            node = paths[b, t]
            assert list(q) == trie.child_token[trie.child_ptr[node] : trie.child_ptr[node + 1]].tolist()
        dropped = [0.0] * len(y)
        if top_k:
            kept = [brute_top_k(q, y[t], top_k) for t, q in enumerate(want)]
            dropped = [1 - sum(q[v] for v in k) for q, k in zip(want, kept)]
            want = kept
        assert_close(got, want)
        p0 = dist.sample_ptr[b]
        np.testing.assert_allclose(dist.dropped[p0 : p0 + len(y)], dropped, atol=1e-9)
        for t, q in enumerate(got):
            assert y[t] in q and abs(sum(q.values()) - 1) < 1e-5
            if len(q) == 1:
                assert q == {y[t]: 1.0}


def test_a_batch_spanning_kernel_chunks_equals_its_samples_one_by_one():
    """fill_entries shares scratch rows across a chunk of samples: nothing of one sample may leak into the next."""
    from tca.collab.kernels import CHUNK

    trie, seqs = catalog([[3, 4], [3, 5], [3, 5, 6], [4, 4], [4, 5], [5], [6], [3]])
    golds = np.resize(np.array(list(seqs)), 2 * CHUNK + 5)
    scores = random_scores(seqs, len(golds), 7, 8.0)
    for top_k in (0, 2):
        cfg = CollabConfig(temperature=0.5, top_k=top_k)
        whole = unpack(token_dist(trie, golds, scores, cfg))
        for b in range(len(golds)):
            assert whole[b] == unpack(token_dist(trie, golds[b : b + 1], scores[b : b + 1], cfg))[0]


def test_uniform_is_one_over_children_and_ignores_scores():
    trie, seqs = catalog([[3, 4], [3, 5], [3, 5, 6], [4], []])
    golds = np.array(list(seqs))
    dist = token_dist(trie, golds, None, CollabConfig(cf_source="uniform"))
    for got, gold in zip(unpack(dist), golds):
        want = [{v: 1 / len(q) for v in q} for q in brute_q(seqs, np.zeros(max(seqs) + 1), gold, 1.0)]
        assert_close(got, want)
    capped = token_dist(trie, golds, None, CollabConfig(cf_source="uniform", top_k=1))
    assert all(list(q) == [seqs[g][t]] for g, qs in zip(golds, unpack(capped)) for t, q in enumerate(qs))


@settings(max_examples=40, deadline=None)
@given(catalogs, st.integers(0, 1000))
def test_tiny_temperature_follows_the_cf_argmax(titles, seed):
    trie, seqs = catalog(titles)
    golds = np.array(list(seqs))
    scores = random_scores(seqs, len(golds), seed, 1.0)
    dist = token_dist(trie, golds, scores, CollabConfig(temperature=1e-6))
    for b, (got, gold) in enumerate(zip(unpack(dist), golds)):
        y = seqs[gold]
        for t, q in enumerate(got):
            cands = [i for i, s in seqs.items() if s[:t] == y[:t]]
            best = max(cands, key=lambda i: scores[b, i].item())
            rivals = [scores[b, i].item() for i in cands if seqs[i][t] != seqs[best][t]]
            if rivals and scores[b, best].item() - max(rivals) < 1e-4:  # a near tie (seed 40 drew one 9e-6 apart) splits the mass
                continue
            assert q[seqs[best][t]] == pytest.approx(1.0, abs=1e-6)


def test_extreme_scores_stay_finite_and_exact():
    """Score gaps of 1e4 underflow the exps taken against the sample's max: those positions are recomputed."""
    trie, seqs = catalog([[3, 4], [3, 5], [3, 5, 6], [4, 4], [4, 5], [5]])
    golds = np.array(list(seqs) * 4)
    rng = np.random.default_rng(0)
    scores = torch.from_numpy((rng.choice([-1e4, 0.0, 1e4], (len(golds), max(seqs) + 1)) + rng.normal(0, 1, (len(golds), max(seqs) + 1))).astype(np.float32))
    for tau in (1.0, 0.01, 100.0):
        dist = token_dist(trie, golds, scores, CollabConfig(temperature=tau))
        assert np.isfinite(dist.prob).all()
        for b, (got, gold) in enumerate(zip(unpack(dist), golds)):
            assert_close(got, brute_q(seqs, scores[b].double().numpy(), gold, tau))


def test_vectorized_exp_matches_numpy():
    from tca.collab.kernels import _exp_shifted

    x = np.concatenate([np.linspace(-705, 0, 100_001), [-706.5, -708.0, -709.0, -1e4, -np.inf]])
    row = np.empty(len(x))
    _exp_shifted(x * 2.0, row, np.empty(len(row), np.int64), 0.0, 0.5)
    np.testing.assert_allclose(row[:-5], np.exp(x[:-5]), rtol=3e-10, atol=0)
    assert row[-5] == pytest.approx(np.exp(-706.5), rel=3e-10) and (row[-3:] == 0).all()


def test_row_max_on_float_bits():
    from tca.collab.kernels import _row_max

    rng = np.random.default_rng(0)
    for row in (rng.normal(0, 50, 1001), -rng.random(7) - 1e-30, np.array([-0.0, 0.0, -1e-45]), np.array([-3.4e38, -np.inf + 0])):
        row = row.astype(np.float32)
        top, n_bad = _row_max(row)
        assert top == np.max(row[np.isfinite(row)]) and n_bad == (~np.isfinite(row)).sum()
    row = rng.normal(0, 1, 100).astype(np.float32)
    row[[3, 50, 99]] = [np.inf, np.nan, -np.inf]
    assert _row_max(row)[1] == 3


class Biased(SASRec):
    """A model with its own `score` (an item bias on top of the dot product)."""

    def score(self, history):
        return super().score(history) + 0.1 * torch.arange(self.n_items + 1)


@pytest.mark.parametrize("cls", [SASRec, Biased])
def test_trie_order_scores_give_the_same_q(cls):
    """trie_scorer's [B, N] scores (a permuted matmul, or a model's own score gathered) = score() by item id."""
    from tca.collab.tokenizer import trie_scorer

    trie, seqs = catalog([[3, 4], [3, 5], [3, 5, 6], [4, 4], [4, 5], [5], [6]])
    torch.manual_seed(0)
    model = cls(max(seqs), CFConfig(hidden=8, blocks=1, max_len=4)).eval()
    history = pad_histories([[1, 4], [7, 10, 13], [19]], 4)
    golds = np.array([1, 10, 19])
    with torch.no_grad():
        by_id = model.score(history)
    ordered = trie_scorer(model, trie)(history)
    torch.testing.assert_close(ordered, by_id[:, torch.from_numpy(trie.item_order.astype(np.int64))])
    cfg = CollabConfig(top_k=2)
    assert_close(sum(unpack(token_dist(trie, golds, ordered, cfg, trie_order=True)), []), sum(unpack(token_dist(trie, golds, by_id, cfg)), []))
    with pytest.raises(TcaError, match="trie order"):
        token_dist(trie, golds, by_id, cfg, trie_order=True)


def test_bad_inputs_raise():
    trie, seqs = catalog([[3], [4]])
    scores = random_scores(seqs, 1, 0, 1.0)
    with pytest.raises(TcaError, match="not in the trie"):
        token_dist(trie, np.array([2]), scores, CollabConfig())
    scores[0, 4] = float("nan")
    with pytest.raises(TcaError, match="NaN"):
        token_dist(trie, np.array([1]), scores, CollabConfig())
    for bad, key in (({"temperature": 0.0}, "tca.temperature"), ({"top_k": -1}, "tca.top_k"), ({"cf_source": "x"}, "tca.cf_source")):
        with pytest.raises(TcaError, match=key):
            CollabConfig(**bad)


@pytest.fixture
def small_shards(monkeypatch):
    """Shards of 16 elements (chunks of 4), so a few samples span many shards."""
    monkeypatch.setattr(collab_store, "CHUNK", 4)
    monkeypatch.setattr(collab_store, "SHARD", 16)


def test_zarr_streaming_round_trip(tmp_path, small_shards):
    trie, seqs = catalog([[3, 4], [3, 5], [3, 5, 6], [4, 4, 3], [4, 5], [5], [6, 6, 6, 6], [3, 5, 6, 3]])
    golds = np.array(list(seqs) * 3)
    sample_ids = np.arange(len(golds)) * 10 + 7
    scores = random_scores(seqs, len(golds), 1, 2.0)
    cfg = CollabConfig(top_k=2)
    whole = token_dist(trie, golds, scores, cfg)

    attrs = {"cf_model": "test", "temperature": 1.0, "top_k": 2, "cf_source": "model", "trie_hash": trie.digest()}
    writer = DistWriter(tmp_path / "batched.zarr", dict(attrs))
    for lo, hi in ((0, 1), (1, 4), (4, 11), (11, len(golds))):
        writer.append(sample_ids[lo:hi], token_dist(trie, golds[lo:hi], scores[lo:hi], cfg))
        assert all(col.size % collab_store.SHARD == 0 for col in writer.cols.values())  # whole shards only
    written = writer.close()
    one = DistWriter(tmp_path / "one.zarr", dict(attrs))
    one.append(sample_ids, whole)
    one.close()

    assert written["nnz"] == len(whole.token) > 2 * collab_store.SHARD
    assert written["dropped_mass_max"] == pytest.approx(whole.dropped.max())
    batched, single = DistReader(tmp_path / "batched.zarr", trie), DistReader(tmp_path / "one.zarr")
    for name in collab_store.ARRAYS:
        np.testing.assert_array_equal(batched.group[name][:], single.group[name][:])
    np.testing.assert_array_equal(batched.group["sample_ptr"][:], whole.sample_ptr)
    np.testing.assert_array_equal(batched.group["pos_ptr"][:], whole.pos_ptr)
    np.testing.assert_array_equal(batched.group["token"][:], whole.token)
    np.testing.assert_array_equal(batched.group["prob"][:], whole.prob)
    assert batched.attrs["trie_hash"] == trie.digest() and batched.attrs["n_samples"] == len(golds)

    order = np.random.default_rng(0).permutation(len(golds))[:9]
    labels = batched.read(sample_ids[order])
    expected = unpack(whole)
    T, K = labels.count.shape[1], labels.token.shape[2]
    assert T == max(len(expected[b]) for b in order) and K == max(len(q) for b in order for q in expected[b])
    for row, b in enumerate(order):
        assert labels.count[row].tolist() == [len(q) for q in expected[b]] + [0] * (T - len(expected[b]))
        for t, q in enumerate(expected[b]):
            n = len(q)
            assert labels.token[row, t, :n].tolist() == list(q) and labels.prob[row, t, :n].tolist() == list(q.values())
            assert (labels.token[row, t, n:] == 0).all() and (labels.prob[row, t, n:] == 0).all()
        assert (labels.prob[row, len(expected[b]) :] == 0).all()

    with pytest.raises(TcaError, match="no sample 8"):
        batched.read(np.array([7, 8]))
    with pytest.raises(TcaError, match="another trie"):
        DistReader(tmp_path / "batched.zarr", catalog([[3]])[0])


TITLES = ["Star Wars (1977)", "Star Wars", "Star Trek (1979)", "Star Kid (1997)", "Toy Story (1995)", "Heat (1995)", "Heat",
          "Twelve Monkeys (1995)", "Twister (1996)"]  # fmt: skip


@pytest.fixture
def artifacts(tmp_path, tiny_model_dir, tokenizer):
    """model (tokenizer), subset/train.parquet, a random tiny SASRec in cf/, and the trie of TITLES."""
    root = tmp_path / "artifacts"
    for stage in ("subset", "cf", "trie"):
        (root / stage).mkdir(parents=True)
    (root / "model").symlink_to(tiny_model_dir)
    rng = np.random.default_rng(0)
    n = len(TITLES)
    pl.DataFrame({
        "sample_id": pl.Series(rng.permutation(50)[:23] + 100, dtype=pl.Int64),
        "user_id": pl.Series(rng.integers(1, 5, 23), dtype=pl.Int32),
        "history": pl.Series([rng.integers(1, n + 1, rng.integers(1, 6)).tolist() for _ in range(23)], dtype=pl.List(pl.Int32)),
        "item_id": pl.Series(rng.integers(1, n + 1, 23), dtype=pl.Int32),
        "timestamp": pl.Series(np.arange(23), dtype=pl.Int64),
    }).write_parquet(root / "subset" / "train.parquet")  # fmt: skip
    torch.manual_seed(0)
    save_checkpoint(build(CFConfig(hidden=8, blocks=1, max_len=4), n).eval(), root / "cf" / "model.pt")
    targets = target_ids(tokenizer, pl.Series(TITLES))
    build_trie(np.arange(1, n + 1), targets).save(root / "trie" / "trie.npz")
    pl.DataFrame({"item_id": pl.Series(range(1, n + 1), dtype=pl.Int32), "token_ids": targets}).write_parquet(root / "trie" / "items.parquet")
    return root


@pytest.mark.parametrize("cf_source", ["model", "uniform"])
def test_cf_dist_stage_run_and_inspect(artifacts, tmp_path, monkeypatch, cf_source):
    from tca.cf import load_checkpoint

    monkeypatch.setattr(cf_dist_stage, "BATCH", 5)  # several batches
    params = {"tca": {"temperature": 0.5, "top_k": 0, "cf_source": cf_source, "alpha": 0.1, "exclude_history": False},
              "train": {"backbone": "tallrec"}, "cf": {"model": "sasrec"}}
    ctx = StageContext(name="cf_dist", params=params, out=tmp_path / "out", artifacts=artifacts)
    ctx.out.mkdir()
    cf_dist_stage.run(ctx)

    subset = pl.read_parquet(artifacts / "subset" / "train.parquet")
    trie = Trie.load(artifacts / "trie" / "trie.npz")
    model = load_checkpoint(artifacts / "cf" / "model.pt")
    with torch.no_grad():
        scores = model.score(pad_histories(subset["history"], model.cfg.max_len)) if cf_source == "model" else None
    whole = token_dist(trie, subset["item_id"].to_numpy(), scores, CollabConfig(temperature=0.5, cf_source=cf_source))
    reader = DistReader(ctx.out / "dist.zarr", trie)
    assert reader.sample_id.tolist() == subset["sample_id"].to_list()  # rows in subset order
    np.testing.assert_array_equal(reader.group["pos_ptr"][:], whole.pos_ptr)
    np.testing.assert_allclose(reader.group["prob"][:], whole.prob, atol=1e-6)
    assert reader.attrs["cf_model"] == ("sasrec" if cf_source == "model" else None)
    assert reader.attrs["temperature"] == 0.5 and reader.attrs["cf_source"] == cf_source

    (artifacts / "cf_dist").symlink_to(ctx.out)
    text = cf_dist_stage.inspect(artifacts / "cf_dist", params)
    first = subset.row(0, named=True)
    assert f"sample {first['sample_id']}, gold item {first['item_id']}: {TITLES[first['item_id'] - 1] + '<|im_end|>'!r}" in text
    assert text.count("*") >= reader.sample_ptr[1] and "children" in text


def test_cf_dist_stage_refuses_a_subset_without_history(artifacts, tmp_path):
    path = artifacts / "subset" / "train.parquet"
    pl.read_parquet(path).drop("history").write_parquet(path)
    params = {"tca": {"temperature": 1.0, "top_k": 0, "cf_source": "model", "alpha": 0.1, "exclude_history": False},
              "cf": {"model": "sasrec"}}
    ctx = StageContext(name="cf_dist", params=params, out=tmp_path / "out", artifacts=artifacts)
    ctx.out.mkdir()
    with pytest.raises(TcaError, match="train.parquet: no column history"):
        cf_dist_stage.run(ctx)


@settings(max_examples=60, deadline=None)
@given(catalogs, st.integers(0, 1000), st.sampled_from([0.3, 1.0, 4.0]), st.integers(0, 4))
def test_excluding_history_drops_those_items_from_every_candidate_set(titles, seed, tau, n_hist):
    """tca.exclude_history: q equals the brute force over the catalog without the sample's history items
    (its gold item always stays, even when the history holds it)."""
    trie, seqs = catalog(titles)
    ids = np.array(list(seqs))
    rng = np.random.default_rng(seed)
    golds = rng.choice(ids, 6)
    histories = [rng.choice(ids, n_hist).tolist() + ([int(g)] if b == 0 else []) for b, g in enumerate(golds)]  # sample 0 repeats its gold
    scores = random_scores(seqs, len(golds), seed, 3.0)
    in_order = scores[:, torch.from_numpy(trie.item_order.astype(np.int64))]
    kept = without_history(in_order, pl.Series(histories, dtype=pl.List(pl.Int64)), golds, trie, tau)
    got = unpack(token_dist(trie, golds, kept, CollabConfig(temperature=tau, exclude_history=True), trie_order=True))
    for b, (gold, hist) in enumerate(zip(golds, histories)):
        allowed = {i: s for i, s in seqs.items() if i not in hist or i == gold}
        nonzero = [{v: p for v, p in pos.items() if p > 0} for pos in got[b]]
        assert_close(nonzero, brute_q(allowed, scores[b].numpy(), int(gold), tau), tol=1e-5)
