"""Semantic IDs: the RQ-VAE and LETTER tokenizers, q_t on an SID trie, the T5 recommender over SIDs."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from test_collab import assert_close, brute_q, random_scores, unpack

from tca.collab.tokenizer import CollabConfig, token_dist
from tca.collab.store import DistReader, DistWriter
from tca.errors import TcaError
from tca.llm.evaluate import EvalConfig
from tca.llm.losses import LossConfig
from tca.sid.letter import train_letter
from tca.sid.rqvae import FIRST, SidConfig, semantic_ids, sid_targets, train_rqvae, vocab_size
from tca.sid.seq2seq import SidBatcher, SidItems, Seq2SeqConfig, build_model, recommend_sids, train_seq2seq
from tca.sid.seq2seq import batch_loss as seq2seq_loss
from tca.collab.trie import Trie, build_trie

SMALL = dict(levels=2, codebook_size=8, latent_dim=8, hidden=(32,), epochs=40, batch_size=64, kmeans_iters=10, lr=1e-2)


def clustered(n: int = 120, d: int = 16, seed: int = 0) -> np.ndarray:
    """[n+1, d] embeddings around 6 centers (row 0: padding)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (6, d))
    x = centers[rng.integers(0, 6, n)] + rng.normal(0, 1, (n, d))
    return np.concatenate([np.zeros((1, d)), x]).astype(np.float32)


def test_reconstruction_falls_and_codes_are_seeded():
    cfg = SidConfig(**SMALL)
    a, b = train_rqvae(clustered(), cfg), train_rqvae(clustered(), cfg)
    assert a.history[-1]["recon"] < 0.5 * a.history[0]["recon"]
    assert np.array_equal(a.codes, b.codes)
    assert a.codes.shape == (120, 2) and a.codes.min() >= 0 and a.codes.max() < 8
    other = train_rqvae(clustered(), SidConfig(**SMALL | {"seed": 7}))
    assert not np.array_equal(a.codes, other.codes)


def test_every_item_gets_a_unique_sid():
    codes = np.array([[1, 2], [0, 5], [1, 2], [1, 2], [0, 5], [3, 3]])
    tokens, stats = semantic_ids(codes, codebook_size=8)
    assert len({tuple(t) for t in tokens.tolist()}) == len(codes)
    assert tokens[:, -1].tolist() == [FIRST + 16 + j for j in (0, 0, 1, 2, 1, 0)]  # rank among its colliders, by item id
    assert tokens[0, :2].tolist() == [FIRST + 1, FIRST + 8 + 2]  # level l's code c -> FIRST + l * K + c
    assert stats["collision_rate"] == pytest.approx(5 / 6) and stats["max_items_per_prefix"] == 3
    assert stats["codebook_usage"] == [3 / 8, 3 / 8]

    trained = train_rqvae(clustered(), SidConfig(**SMALL))
    tokens, _ = semantic_ids(trained.codes, 8)
    assert len(np.unique(tokens, axis=0)) == 120


def test_letter_pulls_quantized_latents_toward_cf_embeddings():
    emb = clustered()
    cf = (emb @ np.random.default_rng(3).normal(size=(16, 8))).astype(np.float32)  # alignable, but not what RQ-VAE's latents are

    def cosine(trained) -> float:
        z = trained.model.encode(torch.from_numpy(emb[1:])).z_q
        return torch.nn.functional.cosine_similarity(z, torch.from_numpy(cf[1:]), dim=1).mean().item()

    cfg = SidConfig(**SMALL | {"epochs": 60, "codebook_size": 16})
    before = cosine(train_rqvae(emb, cfg))
    after = cosine(train_letter(emb, cf, SidConfig(**SMALL | {"epochs": 60, "codebook_size": 16, "cf_weight": 1.0})))
    assert after > before + 0.15  # measured: 0.15 -> 0.41

    projected = train_letter(emb, cf[:, :5], SidConfig(**SMALL))  # other CF size: a learned projection
    assert projected.codes.shape == (120, 2)
    with pytest.raises(TcaError, match="items"):
        train_letter(emb, cf[:50], SidConfig(**SMALL))


def code_entropy(codes: np.ndarray, level: int) -> float:
    """Entropy (nats) of the items' codes at one level."""
    p = np.bincount(codes[:, level]) / len(codes)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def test_diversity_regularizer_spreads_codes():
    """The regularizer is log K - H(mean soft assignment) per level, and training with it spreads
    the second level's codes (the first follows the data's 6 clusters either way)."""
    from tca.sid.letter import LetterRegularizer

    emb = clustered()
    cfg = SidConfig(**SMALL | {"cf_weight": 0.0, "codebook_size": 16})
    plain = train_letter(emb, emb[:, :8], cfg)
    diverse = train_letter(emb, emb[:, :8], replace(cfg, diversity_weight=5.0))
    # measured: 1.90 -> 2.31 nats (other seeds: +0.21 to +0.65); a regularizer that does nothing gives +0
    assert code_entropy(diverse.codes, 1) > code_entropy(plain.codes, 1) + 0.2

    x = torch.from_numpy(emb[1:])
    q = plain.model.encode(x)
    want = 0.0
    for level in range(cfg.levels):
        d = ((q.residuals[:, level, None] - plain.model.codebooks[level][None]) ** 2).sum(-1)
        mean = (-d / cfg.diversity_temperature).softmax(1).mean(0)
        want += np.log(cfg.codebook_size) + (mean * mean.log()).sum().item()
    got = LetterRegularizer(emb[:, :8], cfg).diversity(q, plain.model).item()
    assert got == pytest.approx(want, rel=1e-4) and got > 0.01


def test_bad_params_and_embeddings_raise():
    with pytest.raises(TcaError, match="sid.levels"):
        SidConfig.from_params({"levels": 0})
    with pytest.raises(TcaError, match="sid.nope"):
        SidConfig.from_params({"nope": 1})
    assert SidConfig.from_params({"hidden": [64, 32]}).hidden == (64, 32)
    with pytest.raises(TcaError, match="embeddings"):
        train_rqvae(np.full((5, 4), np.nan), SidConfig(**SMALL))


def test_q_on_an_sid_trie_matches_brute_force():
    """The collaborative tokenizer's checks, on SIDs: q_t over codes equals the brute-force softmax sums."""
    trained = train_rqvae(clustered(40), SidConfig(**SMALL | {"codebook_size": 4}))
    tokens, _ = semantic_ids(trained.codes, 4)
    item_ids = np.arange(1, 41)
    trie = build_trie(item_ids, sid_targets(tokens))
    assert trie.stats()["max_depth"] == 3 and trie.stats()["items_per_leaf_max"] == 1
    seqs = {int(i): tuple(t) for i, t in zip(item_ids, tokens.tolist())}
    gold = np.array([1, 7, 40, 23])
    scores = random_scores(seqs, len(gold), seed=1, scale=2.0)
    for tau in (0.5, 1.0):
        got = unpack(token_dist(trie, gold, scores, CollabConfig(temperature=tau)))
        for b, g in enumerate(gold):
            assert_close(got[b], brute_q(seqs, scores[b].numpy(), int(g), tau))


# ----- the T5 recommender over SIDs -----

N_ITEMS = 24


def sid_catalog() -> tuple[SidItems, Trie, np.ndarray]:
    codes = np.random.default_rng(0).integers(0, 3, (N_ITEMS, 2))  # collisions on purpose
    tokens, _ = semantic_ids(codes, 3)
    item_ids = np.arange(1, N_ITEMS + 1)
    return SidItems(item_ids, tokens), build_trie(item_ids, sid_targets(tokens)), tokens


def cyclic_samples(n: int, seed: int = 0) -> pl.DataFrame:
    """Histories of consecutive items; the next item follows the last one (a pattern to learn)."""
    rng = np.random.default_rng(seed)
    first = rng.integers(1, N_ITEMS + 1, n)
    length = rng.integers(3, 8, n)
    hist = [[(f + k - 1) % N_ITEMS + 1 for k in range(m)] for f, m in zip(first, length)]
    return pl.DataFrame({"sample_id": np.arange(n), "history": hist, "item_id": [(h[-1]) % N_ITEMS + 1 for h in hist]})


TINY_T5 = Seq2SeqConfig(d_model=32, layers=1, heads=2, d_ff=64, dropout=0.0, max_history=5, epochs=40, batch_size=32, lr=1e-2)


def sid_log_probs(model, items: SidItems, trie: Trie, histories: pl.Series, max_history: int, renormalize: bool) -> np.ndarray:
    """[samples, items] summed log-probs of every item's SID after every history, teacher-forced (the
    decoder reads PAD then the gold codes); with `renormalize`, each softmax runs over the trie children."""
    ids, mask = items.histories(histories, max_history)
    sids = items.table[1:]
    nodes = trie.paths(sids.numpy())
    out = np.zeros((len(ids), len(sids)))
    for row in range(len(ids)):
        decoder = torch.cat([torch.full((len(sids), 1), 0), sids[:, :-1]], 1)
        with torch.no_grad():
            logits = model(input_ids=ids[row].expand(len(sids), -1), attention_mask=mask[row].expand(len(sids), -1),
                           decoder_input_ids=decoder).logits.double()
        for col, sid in enumerate(sids.tolist()):
            for t, token in enumerate(sid):
                node = nodes[col, t]
                support = trie.child_token[trie.child_ptr[node] : trie.child_ptr[node + 1]] if renormalize else slice(None)
                out[row, col] += (logits[col, t, token] - logits[col, t, support].logsumexp(0)).item()
    return out


@pytest.mark.parametrize("renormalize", [False, True])
def test_constrained_decoding_over_sids_equals_teacher_forced_log_probs(renormalize):
    """With as many beams as items the search is exhaustive: every item once, each scored by its SID's
    teacher-forced log-prob / length, best first."""
    items, trie, tokens = sid_catalog()
    model = build_model(TINY_T5, vocab_size(items.table.numpy())).eval()  # untrained
    samples = cyclic_samples(6)
    cfg = EvalConfig(num_beams=N_ITEMS + 2, batch_size=4, renormalize=renormalize)
    ranked, scores = recommend_sids(model, items, trie, samples["history"], cfg, 5)
    want = sid_log_probs(model, items, trie, samples["history"], 5, renormalize) / tokens.shape[1]
    assert want.std(1).min() > 0.05  # the reference tells the items apart (measured: 0.41)
    assert ranked.shape == (6, N_ITEMS + 2) and (ranked[:, N_ITEMS:] == 0).all() and np.isneginf(scores[:, N_ITEMS:]).all()
    for row in range(6):
        assert sorted(ranked[row, :N_ITEMS].tolist()) == list(range(1, N_ITEMS + 1))
        np.testing.assert_allclose(scores[row, :N_ITEMS], want[row, ranked[row, :N_ITEMS] - 1], atol=1e-4, rtol=0)
    assert (np.diff(scores[:, :N_ITEMS], axis=1) <= 0).all()  # best first


@pytest.fixture
def sid_dist(tmp_path):
    """dist.zarr of q_t on the SID trie, from random CF scores, for the cyclic samples."""
    items, trie, _ = sid_catalog()
    samples = cyclic_samples(96)
    writer = DistWriter(tmp_path / "dist.zarr", {"trie_hash": trie.digest()})
    scores = torch.randn(samples.height, N_ITEMS + 1, generator=torch.Generator().manual_seed(0))
    writer.append(samples["sample_id"].to_numpy(), token_dist(trie, samples["item_id"].to_numpy(), scores, CollabConfig()))
    writer.close()
    return DistReader(tmp_path / "dist.zarr", trie), samples


def dense_decoder_losses(model, items: SidItems, trie: Trie, dist: DistReader, rows: pl.DataFrame, cfg: LossConfig,
                         max_history: int) -> float:
    """The summed loss written plainly over the whole vocabulary, position by position: the decoder
    reads PAD then the gold codes; P is its softmax (MSL: over the node's trie children, of z / tau);
    tca: -log <(1 - alpha) 1[gold] + alpha q, P>; kl: -log P(gold) + alpha KL(q || P)."""
    ids, mask = items.histories(rows["history"], max_history)
    target = items.targets(rows["item_id"].to_numpy())
    decoder = torch.cat([torch.zeros_like(target[:, :1]), target[:, :-1]], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits.double()
    soft = dist.read(rows["sample_id"].to_numpy())
    nodes = trie.paths(target.numpy())
    total = 0.0
    for b in range(len(target)):
        for t, gold in enumerate(target[b].tolist()):
            z = logits[b, t]
            if cfg.msl:
                node = nodes[b, t]
                children = torch.from_numpy(trie.child_token[trie.child_ptr[node] : trie.child_ptr[node + 1]].astype(np.int64))
                log_p = torch.full_like(z, float("-inf"))
                log_p[children] = (z[children] / cfg.msl_tau).log_softmax(0)
            else:
                log_p = z.log_softmax(0)
            k = int(soft.count[b, t])
            q = torch.zeros_like(z).index_add_(0, soft.token[b, t, :k], soft.prob[b, t, :k].double())
            if cfg.loss == "ntp":
                total -= log_p[gold].item()
            elif cfg.loss == "kl":
                kl = torch.where(q > 0, q * (q.log() - log_p), 0.0).sum()
                total += (-log_p[gold] + cfg.alpha * kl).item()
            else:
                y = cfg.alpha * q
                y[gold] += 1 - cfg.alpha
                total -= (y * log_p.exp()).sum().log().item()
    return total


@pytest.mark.parametrize("cfg", [LossConfig("ntp"), LossConfig("ntp", msl=True), LossConfig("tca", alpha=0.5),
                                 LossConfig("tca", alpha=0.3, msl=True, msl_tau=0.5), LossConfig("kl", alpha=0.4)],
                         ids=["ntp", "ntp-msl", "tca", "tca-msl-tau", "kl"])
def test_soft_ntp_takes_decoder_logits(sid_dist, cfg):
    """The T5's summed loss over a batch equals the dense per-position reference on its decoder logits."""
    dist, samples = sid_dist
    items, trie, _ = sid_catalog()
    model = build_model(TINY_T5, vocab_size(items.table.numpy())).eval()
    rows = samples.head(8)
    batch = SidBatcher(items, trie, dist, cfg, TINY_T5.max_history)(rows)
    with torch.no_grad():
        got = seq2seq_loss(model, *batch, cfg).item()
    assert got == pytest.approx(dense_decoder_losses(model, items, trie, dist, rows, cfg, TINY_T5.max_history), rel=1e-5)
    with pytest.raises(TcaError, match="cf_dist"):
        SidBatcher(items, trie, None, LossConfig("tca"), 5)


@pytest.mark.parametrize("loss", ["ntp", "tca"])
def test_t5_learns_a_pattern_over_sids(sid_dist, loss):
    dist, samples = sid_dist
    items, trie, _ = sid_catalog()
    model = build_model(TINY_T5, vocab_size(items.table.numpy()))
    batcher = SidBatcher(items, trie, dist, LossConfig(loss, alpha=0.1), TINY_T5.max_history)
    log = train_seq2seq(model, batcher, samples, TINY_T5, log=lambda _: None)
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]
    ranked, _ = recommend_sids(model, items, trie, samples["history"], EvalConfig(num_beams=5), TINY_T5.max_history)
    assert (ranked == samples["item_id"].to_numpy()[:, None]).any(1).mean() > 0.8  # hr@5


class ScriptedValidation:
    """Stands in for SidValidation: returns scripted metrics and keeps the weights it was shown."""

    metric = "ndcg@10"

    def __init__(self, values: list[float]):
        self.values, self.seen = values, []

    def __call__(self, model, max_history: int) -> dict:
        assert not model.training  # validation decodes without dropout
        self.seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return {"ndcg@10": self.values[len(self.seen) - 1]}


def same_weights(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_training_keeps_the_best_validated_epoch_and_stops_after_patience(sid_dist):
    """Valid ndcg 0.1, 0.3, 0.2, 0.25, 0.1 with patience 3: stop after epoch 5, end with epoch 2's weights."""
    dist, samples = sid_dist
    items, trie, _ = sid_catalog()
    batcher = SidBatcher(items, trie, dist, LossConfig("ntp"), TINY_T5.max_history)
    model = build_model(TINY_T5, vocab_size(items.table.numpy()))
    valid = ScriptedValidation([0.1, 0.3, 0.2, 0.25, 0.1, 0.9])
    log = train_seq2seq(model, batcher, samples, replace(TINY_T5, epochs=6, patience=3), log=lambda _: None, valid=valid)
    assert [r["epoch"] for r in log] == [1, 2, 3, 4, 5] and len(valid.seen) == 5
    assert [r.get("best", False) for r in log] == [True, True, False, False, False]
    assert [r["valid"]["ndcg@10"] for r in log] == [0.1, 0.3, 0.2, 0.25, 0.1]
    assert not same_weights(valid.seen[1], valid.seen[4])  # training moved on after the best epoch
    assert same_weights(model.state_dict(), valid.seen[1]) and not model.training


def test_validation_every_n_epochs_and_after_the_last(sid_dist):
    """valid_every 2 over 5 epochs validates after epochs 2, 4 and 5; valid_every 0 never, the last weights stay."""
    dist, samples = sid_dist
    items, trie, _ = sid_catalog()
    batcher = SidBatcher(items, trie, dist, LossConfig("ntp"), TINY_T5.max_history)
    valid = ScriptedValidation([0.5, 0.1, 0.2])
    log = train_seq2seq(build_model(TINY_T5, vocab_size(items.table.numpy())), batcher, samples,
                        replace(TINY_T5, epochs=5, valid_every=2), log=lambda _: None, valid=valid)
    assert [r["epoch"] for r in log if "valid" in r] == [2, 4, 5]
    never = ScriptedValidation([])
    model = build_model(TINY_T5, vocab_size(items.table.numpy()))
    log = train_seq2seq(model, batcher, samples, replace(TINY_T5, epochs=2, valid_every=0), log=lambda _: None, valid=never)
    assert not never.seen and all("valid" not in r for r in log)
    with pytest.raises(TcaError, match="seq2seq.valid_every"):
        Seq2SeqConfig.from_params({"valid_every": -1})
    with pytest.raises(TcaError, match="seq2seq.patience"):
        Seq2SeqConfig.from_params({"patience": 0})


def test_sid_validation_scores_the_eval_lists(sid_dist):
    """SidValidation's metrics are score_lists' of recommend_sids' lists (history excluded as configured)."""
    from tca.llm.evaluate import score_lists
    from tca.sid.seq2seq import SidValidation

    _, samples = sid_dist
    items, trie, _ = sid_catalog()
    model = build_model(TINY_T5, vocab_size(items.table.numpy())).eval()
    cfg = EvalConfig(num_beams=10, batch_size=16, exclude_history=True)
    got = SidValidation(samples, items, trie, cfg)(model, TINY_T5.max_history)
    ranked, scores = recommend_sids(model, items, trie, samples["history"], cfg, TINY_T5.max_history)
    assert got == score_lists(ranked, scores, samples).metrics["llm"]
    hist = samples["history"].to_list()
    assert not any(set(r) & set(h) for r, h in zip(ranked.tolist(), hist))


# ----- the stages: sid -> trie -> cf_dist -> train -> eval for tiger and letter -----


@pytest.fixture(scope="module")
def sid_artifacts(tmp_path_factory):
    """data (items, no model needed), text_emb, a tiny SASRec in cf/, train/valid/test subsets of cyclic samples."""
    from tca.cf import CFConfig, build, save_checkpoint

    root = tmp_path_factory.mktemp("artifacts")
    for stage in ("data", "text_emb", "cf", "subset"):
        (root / stage).mkdir()
    pl.DataFrame({"item_id": pl.Series(range(1, N_ITEMS + 1), dtype=pl.Int32),
                  "title": [f"Movie {i}" for i in range(1, N_ITEMS + 1)]}).write_parquet(root / "data" / "items.parquet")
    np.save(root / "text_emb" / "items.npy", clustered(N_ITEMS, 12))
    torch.manual_seed(0)
    save_checkpoint(build(CFConfig(hidden=8, blocks=1, max_len=4), N_ITEMS).eval(), root / "cf" / "model.pt")
    for split, seed in (("train", 0), ("valid", 1), ("test", 2)):
        cyclic_samples(64, seed).with_columns(user_id=pl.lit(1, pl.Int32)).write_parquet(root / "subset" / f"{split}.parquet")
    shutil.copy(root / "subset" / "train.parquet", root / "data" / "train.parquet")  # popularity's counts
    shutil.copy(root / "subset" / "valid.parquet", root / "data" / "valid.parquet")  # tiger / letter's validation
    return root


def stage_params(backbone: str) -> dict:
    import yaml

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "stages.yaml").read_text())["params"]
    params["sid"] |= {"levels": 2, "codebook_size": 4, "latent_dim": 8, "hidden": [16], "epochs": 10, "batch_size": 32, "lr": 0.01}
    params["seq2seq"] |= {"d_model": 16, "layers": 1, "heads": 2, "d_ff": 32, "epochs": 2, "batch_size": 16, "max_history": 4}
    params["train"]["backbone"] = backbone
    params["eval"] |= {"num_beams": 5, "batch_size": 8, "exclude_history": False}
    return params


@pytest.mark.parametrize("backbone", ["tiger", "letter"])
def test_sid_backbones_run_through_the_stages(sid_artifacts, tmp_path, backbone):
    from pipeline.context import StageContext
    from pipeline.stages import cf_dist, eval as eval_stage, sid, train, trie as trie_stage

    root = tmp_path / "artifacts"
    shutil.copytree(sid_artifacts, root)
    params = stage_params(backbone)
    for name, module in (("sid", sid), ("trie", trie_stage), ("cf_dist", cf_dist), ("train", train), ("eval", eval_stage)):
        (root / name).mkdir()
        module.run(StageContext(name, params, root / name, root, device_request="cpu"))

    for tokenizer in ("tiger", "letter"):
        written = pl.read_parquet(root / "sid" / tokenizer / "items.parquet")
        assert written["item_id"].to_list() == list(range(1, N_ITEMS + 1))
        assert len(set(map(tuple, written["token_ids"].to_list()))) == N_ITEMS  # unique SIDs
    assert (root / "trie" / "trie.npz").read_bytes() == (root / "sid" / backbone / "trie.npz").read_bytes()
    assert DistReader(root / "cf_dist" / "dist.zarr", Trie.load(root / "trie" / "trie.npz")).attrs["n_positions"] == 64 * 3
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert metrics["n_samples"] == 64 and set(metrics["llm"]) >= {"hr@5", "ndcg@5", "cc"} and "hr@5" in metrics["cf"]
    predictions = pl.read_parquet(root / "eval" / "predictions.parquet")
    assert all(len(row) == 5 and set(row) <= set(range(1, N_ITEMS + 1)) for row in predictions["items"].to_list())

    from pipeline.stages.eval import load_sid_recommender
    from tca.sid.seq2seq import SidValidation

    records = [json.loads(line) for line in (root / "train" / "log.jsonl").read_text().splitlines()]
    assert all("valid" in r for r in records) and records[0]["best"]
    model, items, trie, record = load_sid_recommender(root, "cpu")  # the saved T5 is the kept epoch's
    decode = EvalConfig(num_beams=params["train"]["valid_beams"], batch_size=params["eval"]["batch_size"])
    valid = SidValidation(pl.read_parquet(root / "data" / "valid.parquet"), items, trie, decode)
    assert valid(model, record["max_history"]) == [r for r in records if r.get("best")][-1]["valid"]
    assert f"{backbone}: T5 from scratch" in train.inspect(root / "train", params)
    assert "valid ndcg@10" in train.inspect(root / "train", params)
    assert "collision rate" in sid.inspect(root / "sid", params) and f"over {backbone} SIDs" in trie_stage.inspect(root / "trie", params)
    assert "Movie" in eval_stage.inspect(root / "eval", params)
    assert "children)" in cf_dist.inspect(root / "cf_dist", params)

    from pipeline.recommend import recommend
    from pipeline.runner import Project

    class Fake(Project):  # the project's paths and params without reading a stages.yaml
        def __init__(self):
            self.root, self.artifacts, self.params, self.device = root.parent, root, params, "cpu"

        def artifact(self, name):
            return self.artifacts / name

    (root / "model").mkdir()
    text = recommend(Fake(), ["Movie 3", "Movie 4"], None, 3)
    assert "    Movie 3\n    Movie 4\n" in text and f"{backbone} T5 over SIDs" in text and text.count("\n") == 6


def test_sid_and_text_emb_are_stand_ins_unless_a_sid_backbone_reads_them(sid_artifacts, tmp_path):
    from pipeline.context import StageContext
    from pipeline.stages import sid, text_emb

    assert text_emb.needed(stage_params("tiger")) and text_emb.needed(stage_params("letter"))
    assert not text_emb.needed(stage_params("tallrec"))
    out = tmp_path / "sid"
    out.mkdir()
    sid.run(StageContext("sid", stage_params("msl"), out, sid_artifacts))
    assert sorted(p.name for p in out.iterdir()) == ["letter", "meta.json", "tiger"] and not any((out / "tiger").iterdir())
    assert "a stand-in" in sid.inspect(out, stage_params("msl"))
    stand_in = tmp_path / "artifacts"
    shutil.copytree(sid_artifacts, stand_in)
    (stand_in / "text_emb" / "meta.json").write_text(json.dumps({"needed": False, "reason": "test"}))
    (tmp_path / "again").mkdir()
    with pytest.raises(TcaError, match="stand-in"):
        sid.run(StageContext("sid", stage_params("tiger"), tmp_path / "again", stand_in))
