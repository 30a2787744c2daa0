"""CF models: the interface contract (every registered model and an external plugin), training,
checkpoints, bad input, and the `cf` stage on a small synthetic dataset with a planted pattern."""
import json
from collections import Counter

import numpy as np
import polars as pl
import pytest
import torch
from torch import nn

from pipeline.context import StageContext
from pipeline.stages import cf as cf_stage
from tca.cf.base import CFConfig, CFModel, pad_histories
from tca.cf.loss import next_item_loss, sample_negatives
from tca.cf.registry import MODELS, build, load_checkpoint, resolve, save_checkpoint
from tca.cf.train import Samples, evaluate, evaluate_popularity, lr_factor, train_cf, train_epoch
from tca.errors import TcaError

N_ITEMS, HIST = 40, 6


class MeanPool(CFModel):
    """An external model: the user is the mean of the history's item vectors."""

    def __init__(self, n_items, cfg):
        super().__init__(n_items, cfg)
        self.emb = nn.Embedding(n_items + 1, cfg.hidden, padding_idx=0)

    def encode_users(self, history):
        history = history[:, -self.cfg.max_len :]
        return self.emb(history).sum(1) / (history > 0).sum(1, keepdim=True).clamp(min=1)

    def item_embeddings(self):
        return self.emb.weight

    def calculate_loss(self, batch):
        return next_item_loss(self.encode_users(batch["history"]), batch["target"], self.emb.weight, self.cfg.loss)


class Incomplete(CFModel):
    def encode_users(self, history):
        return history.float()

    def item_embeddings(self):
        return torch.zeros(1, 1)


class NotAModel(nn.Module):
    pass


ALL_MODELS = [*MODELS, f"{__name__}:MeanPool"]
GRAPH_MODELS = ["lightgcn", "alpharec", "rlmrec"]


def tiny(**kw) -> CFConfig:
    base = dict(hidden=16, blocks=1, heads=2, dropout=0.0, max_len=HIST, batch_size=32, max_epochs=3, patience=2, lr=1e-2)
    return CFConfig(**{**base, **kw})


def side_inputs(n_users: int = 200, dim: int = 12, seed: int = 0) -> dict:
    """Random stand-ins for the text_emb / profiles artifacts the text-aware models need."""
    rng = np.random.default_rng(seed)
    return {"text_emb": rng.normal(size=(N_ITEMS + 1, dim)).astype(np.float32),
            "item_profiles": rng.normal(size=(N_ITEMS + 1, dim)).astype(np.float32),
            "user_profiles": rng.normal(size=(n_users + 1, dim)).astype(np.float32)}


def make(spec: str, frames: dict, **kw) -> CFModel:
    """A model built and prepared on the planted train split, as train_cf does."""
    model = build(tiny(model=spec, **kw), N_ITEMS)
    model.prepare(Samples.from_frame(frames["train"], HIST), side_inputs())
    return model


def planted_frames(n_users=150, length=22, seed=0) -> dict[str, pl.DataFrame]:
    """Users follow a hidden item permutation (next = perm[prev]) 90% of the time; item 1..10
    are extra popular as random picks, so popularity is a real but weak baseline."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(N_ITEMS) + 1
    seq = np.zeros((n_users, length), np.int64)
    seq[:, 0] = rng.integers(1, N_ITEMS + 1, n_users)
    for t in range(1, length):
        noise = np.where(rng.random(n_users) < 0.5, rng.integers(1, 11, n_users), rng.integers(1, N_ITEMS + 1, n_users))
        seq[:, t] = np.where(rng.random(n_users) < 0.9, perm[seq[:, t - 1] - 1], noise)
    t = np.repeat(np.arange(HIST, length), n_users)
    u = np.tile(np.arange(n_users), length - HIST)
    df = pl.DataFrame(
        {
            "user_id": u,
            "history": [seq[ui, ti - HIST : ti].tolist() for ui, ti in zip(u, t)],
            "item_id": seq[u, t].astype(np.int32),
            "timestamp": t * 1000 + u,
        },
        schema_overrides={"history": pl.List(pl.Int32)},
    ).sort("timestamp").with_row_index("sample_id")
    pos = df["timestamp"] // 1000
    return {
        "train": df.filter(pos < length - 4),
        "valid": df.filter((pos >= length - 4) & (pos < length - 2)),
        "test": df.filter(pos >= length - 2),
    }


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: a second intra-op thread only adds sync cost (and spins on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def frames():
    return planted_frames()


@pytest.fixture(scope="module")
def batch(frames):
    return Samples.from_frame(frames["train"].head(64), HIST).batch(slice(None))


def test_pad_histories_left_pads_and_keeps_latest():
    got = pad_histories([[1, 2, 3], [], list(range(4, 15))], 5)
    assert got.dtype == torch.long
    assert got.tolist() == [[0, 0, 1, 2, 3], [0, 0, 0, 0, 0], [10, 11, 12, 13, 14]]
    series = pl.Series([[7, 8], [9]], dtype=pl.List(pl.Int32))
    assert pad_histories(series, 3).tolist() == [[0, 7, 8], [0, 0, 9]]


@pytest.mark.parametrize("spec", ALL_MODELS)
def test_interface_contract(spec, batch, frames):
    torch.manual_seed(0)
    model = make(spec, frames).eval()
    h = batch["history"][:8]
    with torch.no_grad():
        users, items, scores = model.encode_users(h), model.item_embeddings(), model.score(h)
        assert users.shape == (8, 16) and items.shape == (N_ITEMS + 1, 16)
        assert scores.shape == (8, N_ITEMS + 1)
        assert torch.isneginf(scores[:, 0]).all() and torch.isfinite(scores[:, 1:]).all()
        assert scores.argmax(1).min() >= 1  # padding is never recommended
        torch.testing.assert_close(scores[:, 1:], (users @ items.T)[:, 1:])
        assert torch.equal(model.full_sort_predict({"history": h}), scores)
        assert torch.equal(model(h), users)
        with_users = model.score(h, batch["user"][:8])
        assert with_users.shape == scores.shape and torch.isneginf(with_users[:, 0]).all()
        assert torch.equal(model.full_sort_predict({"history": h, "user": batch["user"][:8]}), with_users)
        if not model.uses_users:  # user ids are only a hint: a model without user vectors ignores them
            assert torch.equal(with_users, scores)
    loss = model.train().calculate_loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():  # the loss reaches every weight (measured: all non-zero here)
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("spec", ALL_MODELS)
def test_padding_and_truncation_do_not_change_scores(spec, batch, frames):
    torch.manual_seed(0)
    model = make(spec, frames).eval()
    h = batch["history"][:8].clone()
    h[0, :3] = 0  # one short history
    wider = torch.cat([torch.zeros(8, 5, dtype=torch.long), h], dim=1)  # extra left padding
    longer = torch.cat([torch.randint(1, N_ITEMS + 1, (8, 3)), h], dim=1)  # items beyond max_len
    narrower = h[:, 3:]  # the short row loses nothing but padding; others lose items
    with torch.no_grad():
        ref = model.score(h)
        torch.testing.assert_close(model.score(wider), ref)
        torch.testing.assert_close(model.score(longer), ref)
        torch.testing.assert_close(model.score(narrower)[0], ref[0])


@pytest.mark.parametrize("loss", ["ce", "bce", "bpr"])
@pytest.mark.parametrize("spec", ALL_MODELS)
def test_training_steps_reduce_loss(spec, loss, batch, frames):
    torch.manual_seed(0)
    model = make(spec, frames, loss=loss).train()
    # a graph model's vectors are means over its propagation layers: each step moves them less
    opt = torch.optim.Adam(model.parameters(), lr=3e-2 if spec in GRAPH_MODELS else 1e-2)
    losses = []
    for _ in range(25):
        value = model.calculate_loss(batch)
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(value.item())
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5])


def test_negative_sampling_never_returns_the_positive():
    torch.manual_seed(0)
    pos = torch.randint(1, 6, (20000,))
    neg = sample_negatives(pos, 5)
    assert (neg != pos).all() and neg.min() == 1 and neg.max() == 5
    counts = torch.bincount(neg[pos == 3], minlength=6)[1:].double()
    assert counts[2] == 0 and (counts[[0, 1, 3, 4]] / counts.sum() - 0.25).abs().max() < 0.03


@pytest.mark.parametrize("spec", ALL_MODELS)
def test_checkpoint_round_trip_gives_identical_scores(spec, batch, frames, tmp_path):
    torch.manual_seed(0)
    model = make(spec, frames)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.calculate_loss(batch).backward()
    opt.step()  # move away from the init
    save_checkpoint(model, tmp_path / "model.pt")
    loaded = load_checkpoint(tmp_path / "model.pt", plugin=spec)  # a plugin loads as the caller's cf.model names it
    assert type(loaded) is type(model) and loaded.cfg == model.cfg
    with torch.no_grad():
        assert torch.equal(loaded.score(batch["history"]), model.eval().score(batch["history"]))
        assert torch.equal(loaded.score(batch["history"], batch["user"]), model.score(batch["history"], batch["user"]))


def test_registry_errors():
    with pytest.raises(TcaError, match="neither a registered model"):
        resolve("nope")
    with pytest.raises(TcaError, match="cannot import module"):
        resolve("no_such_module_xyz:Model")
    with pytest.raises(TcaError, match="not a subclass"):
        resolve(f"{__name__}:NotAModel")
    with pytest.raises(TcaError, match="not a subclass"):
        resolve(f"{__name__}:Missing")
    with pytest.raises(TcaError, match="does not implement calculate_loss"):
        resolve(f"{__name__}:Incomplete")
    assert resolve(f"{__name__}:MeanPool") is MeanPool


def test_config_errors():
    with pytest.raises(TcaError, match="cf.hiden: unknown param"):
        CFConfig.from_params({"hiden": 3})
    with pytest.raises(TcaError, match="cf.loss"):
        CFConfig.from_params({"loss": "hinge"})
    assert CFConfig.from_params({"loss": "bpr"}).loss == "bpr"
    with pytest.raises(TcaError, match="cf.lr_schedule: 'step' is not a schedule"):
        CFConfig.from_params({"lr_schedule": "step"})


def test_cosine_schedule_decays_to_zero_and_is_applied_every_step(frames):
    assert [lr_factor("cosine", p) for p in (0.0, 0.5, 1.0, 1.5)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert lr_factor("constant", 0.7) == 1.0
    train = Samples.from_frame(frames["train"], HIST)
    model = build(tiny(), N_ITEMS)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    seen = []
    train_epoch(model, opt, train, 32, torch.Generator().manual_seed(0), lambda f: seen.append(f) or 0.0)
    n = len(train.windows(torch.Generator().manual_seed(0), every=model.every_sample))
    assert seen == [i / n for i in range(0, n, 32)]  # one call per step, the share of the epoch done
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # lr 0 was used: nothing moved


def test_bert4rec_mask_target_trains_the_inference_task(frames):
    """mask_target 1: every sequence masks its target slot alone, so the loss is the full-softmax
    CE of the user representation used at inference (cf.label_smoothing: (1 - eps) of the mass on
    the target, eps / N on every item)."""
    batch = Samples.from_frame(frames["train"], HIST).batch(slice(0, 64))
    for eps in (0.0, 0.3):
        model = build(tiny(model="bert4rec", mask_target=1.0, label_smoothing=eps), N_ITEMS)
        with torch.no_grad():
            logp = torch.log_softmax(model.encode_users(batch["history"]) @ model.item_embeddings()[1:].T, 1)
            expected = -((1 - eps) * logp.gather(1, batch["target"][:, None] - 1)[:, 0] + eps * logp.mean(1)).mean()
            assert model.calculate_loss(batch).item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(TcaError, match="cf.mask_target"):
        CFConfig.from_params({"mask_target": 1.5})


def test_last_objective_is_the_per_sample_ce_of_the_user_state(frames):
    """cf.objective last: the loss is the mean, over the batch, of each sample's full-softmax CE of
    its target given its whole history, as scored at inference (one sample at a time here)."""
    batch = Samples.from_frame(frames["train"], HIST).batch(slice(0, 48))
    for eps in (0.0, 0.2):  # cf.label_smoothing: (1 - eps) of the mass on the target, eps / N on every item
        torch.manual_seed(0)
        model = build(tiny(objective="last", label_smoothing=eps), N_ITEMS).train()  # tiny: dropout 0, so train mode is deterministic
        with torch.no_grad():
            logp = [torch.log_softmax(model.score(batch["history"][i : i + 1])[0, 1:], 0) for i in range(len(batch["target"]))]
            per_sample = [(1 - eps) * lp[t - 1] + eps * lp.mean() for lp, t in zip(logp, batch["target"].tolist())]
            assert model.calculate_loss(batch).item() == pytest.approx(-torch.stack(per_sample).mean().item(), rel=1e-5)
    with pytest.raises(TcaError, match="cf.objective: 'first' is not an objective"):
        CFConfig.from_params({"objective": "first"})
    with pytest.raises(TcaError, match="cf.label_smoothing: 1.0 must be in"):
        CFConfig.from_params({"label_smoothing": 1.0})


@pytest.mark.parametrize("spec", ["sasrec", "bert4rec"])
def test_last_objective_epoch_trains_on_every_train_sample_once(frames, spec):
    """An epoch of cf.objective last is every train sample once, and nothing else: no valid or
    test sample (a later interaction of its user) reaches the loss. The lambda records batches."""
    train = Samples.from_frame(frames["train"], HIST)
    model = build(tiny(model=spec, objective="last"), N_ITEMS)
    seen = []
    model.calculate_loss = lambda b: seen.append(b) or model.encode_users(b["history"]).sum()
    train_epoch(model, torch.optim.SGD(model.parameters(), lr=0.0), train, 32, torch.Generator().manual_seed(0))
    rows = {key: torch.cat([b[key] for b in seen]) for key in ("history", "target", "user")}

    def keyed(history, target, user):
        return sorted(zip(user.tolist(), map(tuple, history.tolist()), target.tolist()))

    assert keyed(**rows) == keyed(train.history, train.target, train.user)


@pytest.mark.parametrize("spec", ["sasrec", "bert4rec"])
def test_prefixes_add_each_users_first_items_as_targets_and_nothing_else(frames, monkeypatch, spec):
    """cf.prefixes: train_cf trains SASRec / BERT4Rec (objective last) on every train sample plus, per user,
    (h[:k] -> h[k]) of the earliest train sample's history h, left-padded: brute force below.
    Nothing from valid or test enters; objective all (windows) ignores it."""
    df = frames["train"]
    expected = [(u, tuple(r), t) for u, r, t in zip(df["user_id"], df["history"].to_list(), df["item_id"])]
    for u, h in df.sort("timestamp").group_by("user_id", maintain_order=True).first().select("user_id", "history").iter_rows():
        expected += [(u, tuple([0] * (HIST - k) + h[:k]), h[k]) for k in range(1, len(h))]
    seen = []

    def record(model, batch):
        seen.append(batch)
        return model.encode_users(batch["history"]).sum()

    monkeypatch.setattr(resolve(spec), "calculate_loss", record)
    train, valid = (Samples.from_frame(frames[s], HIST) for s in ("train", "valid"))
    train_cf(tiny(model=spec, prefixes=True, max_epochs=1, lr=0.0), N_ITEMS, train, valid)
    got = [(u, tuple(h), t) for b in seen for u, h, t in zip(b["user"].tolist(), b["history"].tolist(), b["target"].tolist())]
    assert sorted(got) == sorted(expected)
    assert len(got) == len(train) + df["user_id"].n_unique() * (HIST - 1)
    seen.clear()
    train_cf(tiny(model=spec, prefixes=False, max_epochs=1, lr=0.0), N_ITEMS, train, valid)
    assert sum(len(b["target"]) for b in seen) == len(train)
    seen.clear()
    train_cf(tiny(model=spec, prefixes=True, objective="all", max_epochs=1, lr=0.0), N_ITEMS, train, valid)
    rows = {(u, tuple(h), t) for b in seen for u, h, t in zip(b["user"].tolist(), b["history"].tolist(), b["target"].tolist())}
    assert rows <= set(expected[: len(train)])  # windows of the train samples, no prefix
    with pytest.raises(TcaError, match="cf.prefixes needs the train split's user_id"):
        Samples(train.history, train.target).with_prefixes()


def test_inner_sets_the_feed_forward_width():
    for spec, own in (("sasrec", 16), ("bert4rec", 64)):  # tiny: hidden 16
        assert build(tiny(model=spec), N_ITEMS).encoder.blocks[0].ff[0].out_features == own
        assert build(tiny(model=spec, inner=24), N_ITEMS).encoder.blocks[0].ff[0].out_features == 24
    with pytest.raises(TcaError, match="cf.inner: -1 must be >= 0"):
        CFConfig.from_params({"inner": -1})


def test_bad_input_stops_before_training(frames):
    train = Samples.from_frame(frames["train"], HIST)
    valid = Samples.from_frame(frames["valid"], HIST)
    bad = Samples(train.history.clone(), train.target, train.from_end)
    bad.history[5, -1] = N_ITEMS + 1
    with pytest.raises(TcaError, match=f"train split: history holds item id {N_ITEMS + 1} outside 0..{N_ITEMS}"):
        train_cf(tiny(), N_ITEMS, bad, valid)
    empty = Samples.from_frame(frames["train"].head(0), HIST)
    with pytest.raises(TcaError, match="train split is empty"):
        train_cf(tiny(), N_ITEMS, empty, valid)


def test_windows_cover_each_users_sequence_once_per_epoch(frames):
    df = frames["train"]
    s = Samples.from_frame(df, HIST)
    later = df.select((pl.col("timestamp").rank("ordinal", descending=True).over("user_id") - 1).alias("r"))["r"]
    assert s.from_end.tolist() == later.to_list()
    targets = df.group_by("user_id").agg((pl.col("timestamp") // 1000).alias("p"))  # sequence positions
    expected = {row["user_id"]: sorted(row["p"]) for row in targets.iter_rows(named=True)}
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        chosen = df[s.windows(gen).numpy()]
        labels: dict[int, list[int]] = {}
        for u, t in zip(chosen["user_id"].to_list(), (chosen["timestamp"] // 1000).to_list()):
            labels.setdefault(u, []).extend(range(t - HIST + 1, t + 1))  # history[1:] + target
        for u, positions in expected.items():
            got = Counter(p for p in labels[u] if p >= positions[0])
            assert sorted(got) == positions  # every training target is a label ...
            assert all(n == 1 for p, n in got.items() if p <= positions[-1] - HIST)  # ... once, but the latest window


def test_training_is_deterministic_under_a_seed(frames):
    train, valid = (Samples.from_frame(frames[s], HIST) for s in ("train", "valid"))
    cfg = tiny(max_epochs=2, dropout=0.2)
    a, _ = train_cf(cfg, N_ITEMS, train, valid)
    b, _ = train_cf(cfg, N_ITEMS, train, valid)
    with torch.no_grad():
        assert torch.equal(a.score(valid.history), b.score(valid.history))


@pytest.mark.parametrize("spec", ["sasrec", "bert4rec"])
def test_models_learn_the_planted_pattern(spec, frames):
    train, valid, test = (Samples.from_frame(frames[s], HIST) for s in ("train", "valid", "test"))
    model, result = train_cf(tiny(model=spec, hidden=32, max_epochs=40, patience=4), N_ITEMS, train, valid)
    ndcg, pop = evaluate(model, test)["ndcg@10"], evaluate_popularity(train, test, N_ITEMS)["ndcg@10"]
    assert result.losses[-1] < result.losses[0]
    assert ndcg > 0.6 and ndcg > 2 * pop, (ndcg, pop, result.best_epoch)


def write_data_artifact(root, frames):
    data = root / "data"
    data.mkdir(parents=True)
    titles = [f"Movie {i} ({1950 + i})" for i in range(1, N_ITEMS + 1)]
    pl.DataFrame({"item_id": np.arange(1, N_ITEMS + 1, dtype=np.int32), "title": titles}).write_parquet(data / "items.parquet")
    for name, df in frames.items():
        df.write_parquet(data / f"{name}.parquet")
    return data


def popularity_reference(train_targets: list[int], test_targets: list[int]) -> dict[str, float]:
    """HR@k / NDCG@k of ranking items by how often they are a train target (ties: lower id first),
    written plainly."""
    count = Counter(train_targets)
    out = {}
    for k in (1, 5, 10):
        ranks = [sum(count[i] > count[t] or (count[i] == count[t] and i < t) for i in range(1, N_ITEMS + 1)) for t in test_targets]
        out[f"hr@{k}"] = sum(r < k for r in ranks) / len(ranks)
        out[f"ndcg@{k}"] = sum(1 / np.log2(r + 2) for r in ranks if r < k) / len(ranks)
    return out


def test_stage_run_and_inspect(frames, tmp_path):
    write_data_artifact(tmp_path / "artifacts", frames)
    params = {"cf": tiny(max_epochs=2).to_dict()}
    out = tmp_path / "out"
    out.mkdir()
    cf_stage.run(StageContext("cf", params, out, tmp_path / "artifacts"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"test", "valid", "popularity"} and set(metrics["popularity"]) == {"test"}
    assert set(metrics["test"]) == {f"{m}@{k}" for m in ("hr", "ndcg") for k in (1, 5, 10)}
    test = Samples.from_frame(frames["test"], HIST)
    model = load_checkpoint(out / "model.pt")
    assert evaluate(model, test) == metrics["test"]
    assert evaluate(model, Samples.from_frame(frames["valid"], HIST)) == metrics["valid"]  # the kept (best) epoch's
    want = popularity_reference(frames["train"]["item_id"].to_list(), frames["test"]["item_id"].to_list())
    assert metrics["popularity"]["test"].keys() == want.keys()
    for key, value in want.items():
        assert metrics["popularity"]["test"][key] == pytest.approx(value, abs=1e-12), key
    assert 0 < want["hr@10"] < 1  # the planted popularity is a real but imperfect baseline here

    (tmp_path / "artifacts" / "cf").symlink_to(out)
    text = cf_stage.inspect(tmp_path / "artifacts" / "cf", params)
    first = frames["test"].row(0, named=True)
    history_part, top_part = text.split("CF top-10:\n")
    assert "ndcg@10" in history_part and f"  Movie {first['history'][0]} ({1950 + first['history'][0]})\n" in history_part
    assert len(top_part.splitlines()) == 10 and all("Movie" in line for line in top_part.splitlines())

    subset = frames["test"].head(3)  # the LLM's test subset, once the subset stage has run: scored by inspect
    (tmp_path / "artifacts" / "subset").mkdir()
    subset.write_parquet(tmp_path / "artifacts" / "subset" / "test.parquet")
    table = cf_stage.inspect(tmp_path / "artifacts" / "cf", params).split("\n\n")[0].splitlines()
    want = evaluate(load_checkpoint(out / "model.pt"), Samples.from_frame(subset, HIST))
    assert table[4].split() == ["LLM", "test", "(3)", *(f"{v:.4f}" for v in want.values())]
    assert table[5].startswith("popularity (LLM)")


def test_stage_rejects_a_bad_items_table(frames, tmp_path):
    data = write_data_artifact(tmp_path / "artifacts", frames)
    pl.DataFrame({"item_id": [2, 3], "title": ["a", "b"]}).write_parquet(data / "items.parquet")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(TcaError, match="item_id must be exactly 1..N"):
        cf_stage.run(StageContext("cf", {"cf": tiny().to_dict()}, out, tmp_path / "artifacts"))


def test_dropout_zeroes_a_share_p_and_keeps_the_mean():
    from tca.cf.transformer import Dropout

    drop, x = Dropout(0.3), torch.ones(3, 66_667)  # numel not a multiple of the 4 lanes per draw
    torch.manual_seed(0)
    y = drop(x)
    assert y.shape == x.shape
    assert abs((y == 0).float().mean().item() - 0.3) < 0.005
    assert abs(y.mean().item() - 1.0) < 0.01 and torch.allclose(y[y > 0], torch.tensor(1 / 0.7), rtol=1e-4)
    assert torch.equal(drop.eval()(x), x) and torch.equal(Dropout(0.0)(x), x)
    assert torch.equal(Dropout(1.0)(x), torch.zeros_like(x))
    columns = torch.stack([(Dropout(0.5)(torch.ones(4000, 4)) == 0).float().mean(0) for _ in range(5)])
    assert ((columns - 0.5).abs() < 0.03).all()  # each of the four lanes of a draw is fair


@pytest.mark.parametrize("model", ["sasrec", "bert4rec"])
def test_user_state_from_the_last_query_equals_the_full_encoding(model):
    from tca.cf.registry import build

    cfg = CFConfig(model=model, hidden=16, max_len=6, dropout=0.5)
    torch.manual_seed(0)
    m = build(cfg, 30).eval()
    history = torch.tensor([[0, 0, 0, 4, 5, 6], [1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 0, 9]])
    seq = history if model == "sasrec" else m.with_slot(history, torch.full_like(history[:, 0], m.mask_id))
    with torch.no_grad():
        assert torch.allclose(m.encode_users(history), m.states(seq)[:, -1], atol=1e-6)
