"""Ranking metrics on hand-computed lists, and the eval stage end to end on a tiny Llama with a LoRA
adapter: its files, its metrics recomputed from its own predictions, `tca inspect eval`, `tca recommend`."""
from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
import torch

from pipeline.context import StageContext
from pipeline.runner import Project
from pipeline.stages import eval as eval_stage
from pipeline.stages import trie as trie_stage
from tca.cf.base import CFConfig, pad_histories
from tca.cf.registry import build, save_checkpoint
from tca.errors import TcaError
from tca.llm.evaluate import EvalConfig, evaluate
from tca.metrics import list_ranks, ranking_metrics
from tca.llm.prompt import PromptBuilder
from tca.collab.trie import Trie

TITLES = ["Alien (1979)", "Alien", "Aliens (1986)", "Toy Story (1995)", "Toy Story 2 (1999)", "Fargo (1996)",
          "Heat (1995)", "Up (2009)", "Jaws (1975)", "Jaws", "Jaws 2 (1978)", "Babe (1995)", "Casino (1995)",
          "Clerks (1994)", "Se7en (1995)"]
PARAMS = {
    "prompt": {"domain": "movies", "target_template": "{title}",
               "instruction": "Given the user's interaction history, recommend the {domain} the user is most likely to interact with next."},
    "eval": {"split": "test", "num_beams": 4, "length_penalty": 1.0, "renormalize": False, "batch_size": 3, "precision": "fp32",
             "exclude_history": False},
    "llm": {"attn_implementation": "sdpa"},
    "data": {"history_len": 10},
    "train": {"backbone": "tallrec"},
    "tca": {"alpha": 0.1},
    "cf": {"model": "sasrec"},  # the checkpoint loads only as the caller's cf.model names it
}


def test_list_metrics_by_hand():
    """Lists of 4 items scored at k up to 10, as `evaluate` does (a list shorter than k is padded,
    so a target it lacks is never a hit)."""
    ranked = torch.tensor([[5, 3, 9, 0], [1, 2, 4, 8], [7, 0, 0, 0], [2, 6, 3, 1]])
    target = torch.tensor([3, 7, 7, 1])
    m = ranking_metrics(list_ranks(torch.nn.functional.pad(ranked, (0, 6)), target), ks=(1, 2, 4, 10))
    assert m["hr@1"] == 0.25 and m["hr@2"] == 0.5 and m["hr@4"] == 0.75 and m["hr@10"] == 0.75
    assert m["ndcg@1"] == 0.25
    assert math.isclose(m["ndcg@2"], (1 + 1 / math.log2(3)) / 4)
    assert math.isclose(m["ndcg@4"], (1 + 1 / math.log2(3) + 1 / math.log2(5)) / 4)
    assert m["ndcg@10"] == m["ndcg@4"]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_model_dir, tiny_llama):
    """data, subset, model, trie, cf and train (a LoRA adapter with non-zero weights) artifacts."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("artifacts")
    for stage in ("data", "subset", "trie", "cf", "train"):
        (root / stage).mkdir()
    (root / "model").symlink_to(tiny_model_dir)
    n = len(TITLES)
    pl.DataFrame({"item_id": pl.Series(range(1, n + 1), dtype=pl.Int32), "title": TITLES}).write_parquet(root / "data" / "items.parquet")
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 7, size=11)
    samples = pl.DataFrame({
        "sample_id": np.arange(100, 111), "user_id": pl.Series(np.arange(11) % 4, dtype=pl.Int32),
        "history": pl.Series([rng.integers(1, n + 1, size=k).tolist() for k in lengths], dtype=pl.List(pl.Int32)),
        "item_id": pl.Series(rng.integers(1, n + 1, size=11), dtype=pl.Int32), "timestamp": np.arange(11) * 10,
    })
    for split in ("train", "valid", "test"):
        samples.write_parquet(root / "data" / f"{split}.parquet")
        samples.write_parquet(root / "subset" / f"{split}.parquet")
    trie_stage.run(StageContext("trie", PARAMS, root / "trie", root))
    torch.manual_seed(0)
    save_checkpoint(build(CFConfig(), n).eval(), root / "cf" / "model.pt")
    peft_model = get_peft_model(tiny_llama(seed=0), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, weight in peft_model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    peft_model.save_pretrained(root / "train" / "adapter")
    return root, peft_model


@pytest.fixture(scope="module")
def ran(artifacts):
    root, _ = artifacts
    out = root / "eval"
    out.mkdir()
    eval_stage.run(StageContext("eval", PARAMS, out, root))
    return out


def test_eval_stage_writes_predictions_and_metrics_it_can_reproduce(ran, artifacts, tokenizer):
    root, peft_model = artifacts
    pred = pl.read_parquet(ran / "predictions.parquet")
    metrics = json.loads((ran / "metrics.json").read_text())
    samples = pl.read_parquet(root / "subset" / "test.parquet")
    assert pred["sample_id"].to_list() == samples["sample_id"].to_list()
    assert set(metrics) == {"split", "llm", "cf", "popularity", "n_samples", "exclude_history", "ci", "decode"}
    assert metrics["n_samples"] == 11 and metrics["exclude_history"] is False
    items, scores = pred["items"].to_list(), pred["scores"].to_list()
    for row_items, row_scores in zip(items, scores):
        assert len(row_items) == 4 and len(set(row_items)) == 4 and row_scores == sorted(row_scores, reverse=True)

    # the stage's numbers from its own predictions, by brute force
    targets = samples["item_id"].to_list()
    for k in (1, 5, 10):
        hits = [t in row[:k] for row, t in zip(items, targets)]
        gains = [1 / math.log2(row.index(t) + 2) if t in row[:k] else 0.0 for row, t in zip(items, targets)]
        assert math.isclose(metrics["llm"][f"hr@{k}"], np.mean(hits)) and math.isclose(metrics["llm"][f"ndcg@{k}"], np.mean(gains))
    cf = torch.load(root / "cf" / "model.pt", weights_only=True)
    model = build(CFConfig.from_params(cf["config"]), cf["n_items"])
    model.load_state_dict(cf["state_dict"])
    with torch.no_grad():
        cf_scores = model.eval().score(pad_histories(samples["history"], 10))
    assert math.isclose(metrics["llm"]["cc"], np.mean([row[0] == int(s.argmax()) for row, s in zip(items, cf_scores)]))
    cf_ranks = [int((s[1:] > s[t]).sum()) for s, t in zip(cf_scores, targets)]
    assert math.isclose(metrics["cf"]["hr@5"], np.mean([r < 5 for r in cf_ranks]))
    assert metrics["llm"]["lists_under_10"] == 1.0  # 4 beams: every list is shorter than 10
    assert pred["cf_rank"].to_list() == cf_ranks

    # popularity: counts of the train split's targets, ties to the lower item id
    counts = np.bincount(pl.read_parquet(root / "data" / "train.parquet")["item_id"].to_numpy(), minlength=len(TITLES) + 1)
    pop_ranks = [sum(counts[i] > counts[t] or (counts[i] == counts[t] and i < t) for i in range(1, len(TITLES) + 1))
                 for t in targets]
    assert pred["popularity_rank"].to_list() == pop_ranks
    assert math.isclose(metrics["popularity"]["ndcg@10"], np.mean([1 / math.log2(r + 2) if r < 10 else 0.0 for r in pop_ranks]))
    # every interval holds its metric
    for name in ("llm", "cf", "popularity"):
        for key, (lo, hi) in metrics["ci"][name].items():
            assert lo <= metrics[name][key] + 1e-9 and metrics[name][key] <= hi + 1e-9

    # the merged adapter decodes as the unmerged peft model does, and as `evaluate` called directly
    builder = PromptBuilder(tokenizer, ["", *TITLES])
    direct = evaluate(peft_model, builder, Trie.load(root / "trie" / "trie.npz"), samples, EvalConfig(num_beams=4, batch_size=5))
    assert direct.predictions["items"].to_list() == items
    np.testing.assert_allclose(np.array(direct.predictions["scores"].to_list()), np.array(scores), atol=1e-4)


def test_inspect_eval_shows_llm_and_cf_lists(ran):
    text = eval_stage.inspect(ran, PARAMS)
    assert "hr@10" in text and "LLM top-10" in text and "CF top-10" in text
    assert text.count("target:") == eval_stage.SHOWN
    assert any(title in text for title in TITLES)


def test_eval_params_are_checked(artifacts, tmp_path):
    data = artifacts[0] / "data"
    with pytest.raises(TcaError, match="eval.split"):
        eval_stage.eval_config({**PARAMS, "eval": {**PARAMS["eval"], "split": "train"}}, data)
    with pytest.raises(TcaError, match="eval.beams"):
        eval_stage.eval_config({**PARAMS, "eval": {**PARAMS["eval"], "beams": 3}}, data)
    with pytest.raises(TcaError, match="eval.num_beams"):
        eval_stage.eval_config({**PARAMS, "eval": {**PARAMS["eval"], "num_beams": 0}}, data)
    with pytest.raises(TcaError, match="eval.exclude_history"):
        eval_stage.eval_config({**PARAMS, "eval": {**PARAMS["eval"], "exclude_history": "sometimes"}}, data)
    # auto follows the data: on where under 1% of the train samples repeat an item of their history
    from pipeline.stages.data import REPEATS_NEGLIGIBLE

    train = pl.read_parquet(data / "train.parquet")
    rate = train.select(pl.col("history").list.contains(pl.col("item_id")).mean()).item()
    auto = {**PARAMS, "eval": {**PARAMS["eval"], "exclude_history": "auto"}}
    assert eval_stage.eval_config(auto, data)[0].exclude_history is (rate < REPEATS_NEGLIGIBLE)
    for n_repeats, expected in ((0, True), (1, True), (5, False)):  # of 200 samples: 0%, 0.5%, 2.5%
        other = tmp_path / f"data{n_repeats}"
        other.mkdir()
        pl.DataFrame({"history": [[1, 2]] * 200, "item_id": [2] * n_repeats + [3] * (200 - n_repeats)}).write_parquet(other / "train.parquet")
        assert eval_stage.eval_config(auto, other)[0].exclude_history is expected
    with pytest.raises(TcaError, match="eval.precision: 'fp16' is not one of auto, bf16, fp32"):
        eval_stage.eval_config({**PARAMS, "eval": {**PARAMS["eval"], "precision": "fp16"}}, data)


def test_auto_precision_asks_the_gpu(monkeypatch):
    """`auto` is bf16 on a GPU only where it supports bf16 (a V100 or T4 does not), whatever "cuda" says."""
    from tca.llm.model import use_bf16

    for supported in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)
        assert use_bf16("cuda", "auto", "eval.precision") is supported and use_bf16("cuda:1") is supported
    assert use_bf16("cuda", "fp32") is False and use_bf16("cpu", "bf16") is True
    with pytest.raises(TcaError, match="eval.precision"):
        use_bf16("cpu", "half", "eval.precision")


def test_recommend_by_titles_and_by_user(artifacts, monkeypatch):
    root, _ = artifacts

    class Fake(Project):  # the project's paths and params without reading a stages.yaml
        def __init__(self):
            self.root, self.artifacts, self.params, self.device = root.parent, root, PARAMS, "cpu"

        def artifact(self, name):
            return self.artifacts / name

    from pipeline.recommend import recommend

    text = recommend(Fake(), ["Fargo (1996)", "toy story 2"], None, 3)
    assert "    Fargo (1996)\n    Toy Story 2 (1999)" in text and text.count("\n") == 6  # 2 history, 3 titles
    user = recommend(Fake(), [], 1, 2)
    samples = pl.read_parquet(root / "data" / "test.parquet").filter(pl.col("user_id") == 1)
    latest = samples.row(samples.height - 1, named=True)
    assert f"    {TITLES[latest['item_id'] - 1]}\ntop 2" in user
    with pytest.raises(TcaError, match="matches 3 titles"):
        recommend(Fake(), ["alien"], None, 3)


def test_eval_batch_size_auto_is_wider_on_a_gpu_and_an_explicit_size_wins():
    assert EvalConfig().batch_size == "auto" == EvalConfig.from_params({"batch_size": "auto"}).batch_size
    assert EvalConfig().batch_on("cpu") == 16 and EvalConfig().batch_on(torch.device("cuda", 0)) == 64
    assert EvalConfig(batch_size=5).batch_on("cuda") == 5
    for bad in (0, "big", 2.5):
        with pytest.raises(TcaError, match="eval.batch_size"):
            EvalConfig.from_params({"batch_size": bad})
