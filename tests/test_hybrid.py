"""LLaRA and CoLLM hybrid prompts on a tiny random Llama with the real tokenizer and random SASRec /
BERT4Rec models: slots where a sample-by-sample reference puts them (right-padded training batches,
left-padded beam search), projector(CF vector) at each slot, the curriculum's text-only prompts equal
to the plain text prompts, the schedule, learning, the projector saved and loaded with the adapter,
and the train / eval stages and `tca recommend` end to end."""
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from pipeline.context import StageContext
from tca.cf.base import CFConfig, pad_histories
from tca.cf.registry import build, save_checkpoint
from tca.collab.tokenizer import CollabConfig, token_dist
from tca.collab.store import DistReader, DistWriter
from tca.llm.decode import DeviceTrie, beam_search, ranked_items
from tca.errors import TcaError
from tca.llm.evaluate import EvalConfig, evaluate
from tca.llm.hybrid_prompt import PROJECTOR, SLOTS, HybridPrompt, input_embeds, mix_ratio
from tca.llm.model import ItemTargets, LoraSettings, load_model, target_hidden
from tca.llm.prompt import USER_SLOT_TEXT, PromptBuilder, PromptConfig
from tca.ragged import pad
from tca.llm.train import Batcher, TrainConfig, Trainer
from tca.collab.trie import build_trie, target_ids

TITLES = ["", "Toy Story (1995)", "Toy Soldiers (1991)", "Fargo (1996)", "Heat (1995)", "Amélie (2001)", "Alien (1979)",
          "Aliens (1986)", "Casino (1995)", "Clueless (1995)", "Babe (1995)", "Braveheart (1995)", "Batman (1989)"]
N_ITEMS = len(TITLES) - 1
LORA = LoraSettings(r=4, alpha=8, dropout=0.0)
BASE = TrainConfig(epochs=1, micro_batch=4, grad_accum=2, lr=5e-3, warmup_ratio=0.0, eval_every=0, log_every=1,
                   valid_beams=5, valid_metric="hr@5", precision="fp32", loss="ntp")
CASES = [(backbone, cf) for backbone in SLOTS for cf in ("sasrec", "bert4rec")]


def make_samples(n: int, seed: int, start_id: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 7, n)
    return pl.DataFrame({
        "sample_id": np.arange(start_id, start_id + n, dtype=np.int64),
        "history": [rng.integers(1, N_ITEMS + 1, k).astype(np.int32).tolist() for k in lengths],
        "item_id": rng.integers(1, N_ITEMS + 1, n).astype(np.int32),
    }, schema_overrides={"history": pl.List(pl.Int32)})


def cf_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return build(CFConfig(model=name, hidden=16, max_len=4), N_ITEMS).eval()  # max_len 4 < some histories


@pytest.fixture(scope="module")
def world(tokenizer, tmp_path_factory):
    """Targets, trie, 24 train + 5 valid samples and a dist.zarr of q from random CF scores."""
    targets = target_ids(tokenizer, pl.Series(TITLES[1:]))
    trie = build_trie(np.arange(1, N_ITEMS + 1), targets)
    samples, valid = make_samples(24, 0), make_samples(5, 1, start_id=100)
    scores = torch.randn(samples.height, N_ITEMS + 1, generator=torch.Generator().manual_seed(0)) * 2
    path = tmp_path_factory.mktemp("dist") / "dist.zarr"
    writer = DistWriter(path, {"trie_hash": trie.digest()})
    writer.append(samples["sample_id"].to_numpy(), token_dist(trie, samples["item_id"].to_numpy(), scores, CollabConfig()))
    writer.close()
    return {"targets": ItemTargets(np.arange(1, N_ITEMS + 1), targets), "target_list": targets.to_list(), "trie": trie,
            "dist": DistReader(path, trie), "samples": samples, "valid": valid, "pad": tokenizer.pad_token_id}


@pytest.fixture(scope="module")
def peaky_model_dir(tiny_llama, tokenizer, tmp_path_factory) -> Path:
    """Larger initial weights: peaked next-token distributions that a few steps visibly move."""
    out = tmp_path_factory.mktemp("peaky") / "model"
    tiny_llama(seed=0, initializer_range=0.3).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def reference_prompt(tokenizer, history, slots, cfg=PromptConfig()) -> tuple[list[int], list[int]]:
    """(ids, slot marks) of one prompt, piece by piece: a slot is the pad id after a title (mark: the
    item) or after the user text (mark: -1)."""
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
    ids = enc(cfg.instruction.format(domain=cfg.domain) + "\nUser interaction history: ")
    marks = [0] * len(ids)
    for j, item in enumerate(history):
        piece = (enc(", ") if j else []) + enc(f'"{TITLES[item]}"')
        ids, marks = ids + piece, marks + [0] * len(piece)
        if "item" in slots:
            ids, marks = ids + [tokenizer.pad_token_id], marks + [item]
    if "user" in slots:
        piece = enc(USER_SLOT_TEXT)
        ids, marks = ids + piece + [tokenizer.pad_token_id], marks + [0] * len(piece) + [-1]
    tail = enc(f"\nThe {cfg.domain} the user is most likely to interact with next:\n")
    return ids + tail, marks + [0] * len(tail)


@torch.no_grad()
def reference_embeds(model, cf, ids, marks, history) -> torch.Tensor:
    """Input embeddings [T, h] of one sequence, slot by slot: projector(CF item embedding / CF user vector)."""
    out = model.get_input_embeddings()(torch.tensor(ids)).clone()
    projector = getattr(model, PROJECTOR)
    user = cf.encode_users(pad_histories([history], cf.cfg.max_len))[0]
    for t, mark in enumerate(marks):
        if mark:
            out[t] = projector(cf.item_embeddings()[mark] if mark > 0 else user)
    return out


def hybrid_model(model_dir, cf, backbone, seed=0):
    hybrid = HybridPrompt(cf, backbone)
    torch.manual_seed(seed)
    return hybrid, load_model(model_dir, lora=LORA, cf_dim=hybrid.cf_dim)


@pytest.mark.parametrize("slots", [("item",), ("user", "item")])
def test_builder_slots_match_reference(tokenizer, slots):
    histories = [[1, 2, 3], [12], [], [2, 2, 1, 4, 3]]
    builder = PromptBuilder(tokenizer, TITLES, slots=slots)
    prompts = builder.build(np.concatenate([np.array(h, dtype=np.int64) for h in histories]), np.array([len(h) for h in histories]))
    expected = [reference_prompt(tokenizer, h, slots) for h in histories]
    assert [r.tolist() for r in prompts.rows()] == [ids for ids, _ in expected]
    assert prompts.slot.tolist() == [m for _, marks in expected for m in marks]
    # item_end: just after each item's slot
    assert (prompts.slot[np.repeat(np.cumsum(prompts.lengths) - prompts.lengths, [len(h) for h in histories]) + prompts.item_end - 1]
            == np.concatenate(histories)).all()

    # fit counts the slots: the newest items whose whole prompt fits, by brute force
    history = np.array([3, 1, 4, 1, 5, 9, 2, 6])
    for budget in range(len(expected[2][0]), len(expected[0][0]) + 60, 7):
        kept, n = builder.fit(history, np.array([len(history)]), np.array([budget]))
        best = max(k for k in range(len(history) + 1) if k == 0 or len(reference_prompt(tokenizer, history[len(history) - k :], slots)[0]) <= budget)
        assert n[0] == best and kept.tolist() == history[len(history) - best :].tolist()


@pytest.mark.parametrize("backbone,cf_name", CASES)
def test_slots_hold_projected_cf_vectors_right_and_left_padded(world, tokenizer, tiny_model_dir, backbone, cf_name):
    cf = cf_model(cf_name)
    hybrid, model = hybrid_model(tiny_model_dir, cf, backbone)
    builder = PromptBuilder(tokenizer, TITLES, slots=hybrid.slots)
    rows = world["samples"].head(6)
    histories = rows["history"].to_list()
    refs = [reference_prompt(tokenizer, h, hybrid.slots) for h in histories]

    # right-padded training batch: prompt + target ids, slots filled by one masked scatter
    batcher = Batcher(builder, world["targets"], world["trie"], None, replace(BASE).loss_config, 512, world["pad"], hybrid)
    inputs, _ = batcher(rows)
    with torch.no_grad():
        embeds = input_embeds(model, inputs.input_ids, inputs.slot, inputs.slot_vectors)
    for b, ((ids, marks), history) in enumerate(zip(refs, histories)):
        n = len(ids)
        assert inputs.input_ids[b, :n].tolist() == ids and inputs.slot[b, :n].tolist() == marks
        assert not inputs.slot[b, n:].any()
        torch.testing.assert_close(embeds[b, :n], reference_embeds(model, cf, ids, marks, history), rtol=1e-5, atol=1e-6)
    assert (inputs.attention_mask.sum(1) == torch.tensor([len(i) for i, _ in refs]) + torch.tensor(inputs.target_len)).all()

    # left-padded beam search: the embeddings its prompt pass reads
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args, kw: seen.append(kw.get("inputs_embeds")), with_kwargs=True)
    prompts = builder.build(rows["history"].explode().to_numpy(), rows["history"].list.len().to_numpy())
    vectors = hybrid.vectors(torch.from_numpy(pad(prompts.slot, prompts.lengths, fill=0)), rows["history"])
    beam_search(model, prompts, DeviceTrie(world["trie"], "cpu"), 3, slot_vectors=vectors)
    hook.remove()
    first = seen[0]
    assert first is not None and all(e is None for e in seen[1:])  # generated tokens enter as ids
    for b, ((ids, marks), history) in enumerate(zip(refs, histories)):
        torch.testing.assert_close(first[b, first.shape[1] - len(ids):], reference_embeds(model, cf, ids, marks, history), rtol=1e-5, atol=1e-6)


def test_beam_search_on_hybrid_prompts_equals_exhaustive_reference(world, tokenizer, tiny_llama, tmp_path):
    """With beams covering the catalog, the ranked lists are every title by its teacher-forced score."""
    model_dir = tmp_path / "model"
    tiny_llama(seed=1, initializer_range=0.15).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    cf = cf_model("bert4rec", seed=3)
    hybrid, model = hybrid_model(model_dir, cf, "collm")
    builder = PromptBuilder(tokenizer, TITLES, slots=hybrid.slots)
    histories = [[1, 4, 5, 6], [7], [3, 2, 8, 9, 10, 12, 11]]
    k = N_ITEMS
    items, scores = evaluate_lists(model, builder, world, hybrid, histories, k)
    targets = world["target_list"]
    for row, history in enumerate(histories):
        ids, marks = reference_prompt(tokenizer, history, hybrid.slots)
        prompt = reference_embeds(model, cf, ids, marks, history)
        score = []
        for target in targets:
            with torch.no_grad():
                seq = torch.cat([prompt, model.get_input_embeddings()(torch.tensor(target[:-1]))])
                logp = model(inputs_embeds=seq[None]).logits[0, len(ids) - 1 :].double().log_softmax(-1)
            score.append(logp[torch.arange(len(target)), torch.tensor(target)].sum().item() / len(target))
        ref = sorted(zip(score, range(1, N_ITEMS + 1)), key=lambda s: (-s[0], s[1]))
        assert items[row].tolist() == [i for _, i in ref]
        np.testing.assert_allclose(scores[row], [s for s, _ in ref], atol=1e-4, rtol=0)


def evaluate_lists(model, builder, world, hybrid, histories, k):
    from tca.llm.evaluate import recommend

    series = pl.Series(histories, dtype=pl.List(pl.Int64))
    return recommend(model, builder, world["trie"], series, EvalConfig(num_beams=k, batch_size=2), hybrid=hybrid)


def test_text_only_prompts_equal_the_plain_prompts(world, tokenizer, tiny_model_dir):
    """Before the curriculum starts every sample is text-only: its slots are masked out, and the target
    hidden states equal those of the same model on the prompts built without slots."""
    cf = cf_model("sasrec")
    hybrid = HybridPrompt(cf, "llara", curriculum=(0.5, 1.0))
    torch.manual_seed(0)
    model = load_model(tiny_model_dir, lora=LORA, cf_dim=hybrid.cf_dim)
    with torch.no_grad():
        for name, weight in model.named_parameters():  # a LoRA that does something
            if "lora_B" in name:
                weight.normal_(0, 0.3)
    rows = world["samples"].head(8)
    cfg = BASE.loss_config
    plain = Batcher(PromptBuilder(tokenizer, TITLES), world["targets"], world["trie"], None, cfg, 512, world["pad"])
    mixed = Batcher(PromptBuilder(tokenizer, TITLES, slots=hybrid.slots), world["targets"], world["trie"], None, cfg, 512,
                    world["pad"], hybrid)
    text_inputs, _ = plain(rows)
    masked, _ = mixed(rows, progress=0.25)
    assert (masked.attention_mask.sum(1) == text_inputs.attention_mask.sum(1)).all()
    with torch.no_grad():
        torch.testing.assert_close(target_hidden(model, masked), target_hidden(model, text_inputs), rtol=1e-4, atol=1e-5)
        hybrid_inputs, _ = mixed(rows, progress=1.0)
        assert (hybrid_inputs.attention_mask.sum(1) > text_inputs.attention_mask.sum(1)).all()
        assert not torch.allclose(target_hidden(model, hybrid_inputs), target_hidden(model, text_inputs), atol=1e-3)


def test_curriculum_mixing_ratio():
    # LLaRA's default: linear over all of training
    assert [mix_ratio(s / 8, 0.0, 1.0) for s in range(9)] == [s / 8 for s in range(9)]
    # start 0.25, end 0.75: 0 until a quarter of the steps, 1 from three quarters
    assert [mix_ratio(s / 8, 0.25, 0.75) for s in range(9)] == [0, 0, 0, 0.25, 0.5, 0.75, 1, 1, 1]
    assert [mix_ratio(s / 4, 0.5, 0.5) for s in range(5)] == [0, 0, 1, 1, 1]  # a step
    assert [mix_ratio(s / 4, 0.0, 0.0) for s in range(5)] == [1] * 5  # hybrid throughout
    cf = cf_model("sasrec")
    assert HybridPrompt(cf, "collm", (0.25, 0.75)).ratio(0.0) == 1.0  # CoLLM has no curriculum
    with pytest.raises(TcaError, match="curriculum"):
        replace(BASE, backbone="llara", curriculum_start=0.8, curriculum_end=0.2)


def test_curriculum_share_of_hybrid_samples(world, tokenizer, tiny_model_dir, tmp_path, monkeypatch):
    """The trainer hands the batcher each step's progress; the share of hybrid samples follows the ratio."""
    cf = cf_model("sasrec")
    hybrid = HybridPrompt(cf, "llara", (0.25, 0.75))
    builder = PromptBuilder(tokenizer, TITLES, slots=hybrid.slots)
    batcher = Batcher(builder, world["targets"], world["trie"], None, BASE.loss_config, 512, world["pad"], hybrid)
    rows = pl.concat([world["samples"]] * 50)  # 1,200 samples
    torch.manual_seed(0)
    for progress, ratio in ((0.1, 0.0), (0.375, 0.25), (0.5, 0.5), (0.6, 0.7), (0.9, 1.0)):
        inputs, _ = batcher(rows, progress)
        slots = (inputs.slot != 0).sum(1)
        shown = ((inputs.slot != 0) & (inputs.attention_mask > 0)).sum(1)
        assert ((shown == 0) | (shown == slots)).all()  # a sample is text-only or hybrid as a whole
        assert abs(float((shown > 0).double().mean()) - ratio) < 0.05, (progress, ratio)

    seen = []
    real_fill = Batcher.fill
    monkeypatch.setattr(Batcher, "fill", lambda self, inputs, rows, progress=1.0: seen.append(progress) or real_fill(self, inputs, rows, progress))
    cfg = replace(BASE, backbone="llara", epochs=2, micro_batch=4, grad_accum=2)  # 24 samples: 3 steps of 2 micro-batches per epoch
    torch.manual_seed(0)
    model = load_model(tiny_model_dir, lora=LORA, cf_dim=hybrid.cf_dim)
    Trainer(model, batcher, world["samples"], None, cfg, tmp_path / "w", log=lambda m: None).run()
    assert seen == [s / 6 for s in range(6) for _ in range(2)]


def projector_weights(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if PROJECTOR in n and p.requires_grad}


def hybrid_trainer(world, tokenizer, model_dir, cfg, work, cf):
    hybrid = HybridPrompt(cf, cfg.backbone, (cfg.curriculum_start, cfg.curriculum_end))
    builder = PromptBuilder(tokenizer, TITLES, slots=hybrid.slots)
    torch.manual_seed(cfg.seed)
    model = load_model(model_dir, lora=LORA, cf_dim=hybrid.cf_dim)
    batcher = Batcher(builder, world["targets"], world["trie"], world["dist"], cfg.loss_config, cfg.max_len, world["pad"], hybrid)
    return Trainer(model, batcher, world["samples"], world["valid"] if cfg.eval_every else None, cfg, work, log=lambda m: None)


@pytest.mark.parametrize("backbone,cf_name,loss,msl", [("llara", "sasrec", "ntp", False), ("collm", "bert4rec", "tca", False),
                                                       ("llara", "bert4rec", "kl", False), ("collm", "sasrec", "tca", True)])
def test_training_moves_the_projector_and_reduces_the_loss(world, tokenizer, peaky_model_dir, tmp_path, backbone, cf_name, loss, msl):
    cf = cf_model(cf_name)
    # one step, hybrid from the start: the projector is in the optimizer and moves
    cfg = replace(BASE, backbone=backbone, loss=loss, msl=msl, alpha=0.5, curriculum_end=0.0)
    t = hybrid_trainer(world, tokenizer, peaky_model_dir, cfg, tmp_path / "one", cf)
    before = projector_weights(t.model)
    assert len(before) == 4 and all(any(p is q for q in t.optimizer.param_groups[0]["params"]) for n, p in t.model.named_parameters() if n in before)
    t.train_step(np.arange(8))
    after = projector_weights(t.model)
    assert all(not torch.equal(before[n], after[n]) for n in before)
    assert all(not p.requires_grad for p in t.batcher.hybrid.cf.parameters())  # the CF model stays frozen

    # a few epochs (LLaRA: with its curriculum): the loss goes down
    cfg = replace(cfg, epochs=4, lr=2e-2, curriculum_end=0.5, log_every=3)
    t = hybrid_trainer(world, tokenizer, peaky_model_dir, cfg, tmp_path / "many", cf)
    t.run()
    log = [json.loads(line) for line in (tmp_path / "many" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.9 * log[0]["loss"], log


def test_text_only_step_leaves_the_projector(world, tokenizer, tiny_model_dir, tmp_path):
    """At step 0 of LLaRA's default curriculum every prompt is text-only: no gradient reaches the projector."""
    cfg = replace(BASE, backbone="llara")
    t = hybrid_trainer(world, tokenizer, tiny_model_dir, cfg, tmp_path / "w", cf_model("sasrec"))
    before = projector_weights(t.model)
    t.train_step(np.arange(8))
    assert all(torch.equal(before[n], w) for n, w in projector_weights(t.model).items())


def test_projector_saved_and_loaded_with_the_adapter(world, tokenizer, peaky_model_dir, tmp_path):
    cf = cf_model("bert4rec")
    cfg = replace(BASE, backbone="collm", lr=2e-2)
    t = hybrid_trainer(world, tokenizer, peaky_model_dir, cfg, tmp_path / "w", cf)
    t.run()
    adapter = tmp_path / "w" / "adapter"
    t.batcher.hybrid.save(adapter)
    trained = evaluate(t.model, t.batcher.builder, world["trie"], world["valid"], EvalConfig(num_beams=5), hybrid=t.batcher.hybrid)

    hybrid = HybridPrompt.load(adapter, cf_model("bert4rec"))
    assert (hybrid.backbone, hybrid.slots) == ("collm", ("user", "item"))
    model = load_model(peaky_model_dir, adapter, merge=True, cf_dim=hybrid.cf_dim)
    for name, w in projector_weights(t.model).items():
        loaded = model.get_parameter(name.replace("base_model.model.", "").replace("modules_to_save.default.", ""))
        assert torch.equal(loaded, w), name
    builder = PromptBuilder(tokenizer, TITLES, slots=hybrid.slots)
    again = evaluate(model, builder, world["trie"], world["valid"], EvalConfig(num_beams=5), hybrid=hybrid)
    assert again.predictions["items"].to_list() == trained.predictions["items"].to_list()
    np.testing.assert_allclose(np.array(again.predictions["scores"].to_list()), np.array(trained.predictions["scores"].to_list()), atol=1e-5)

    with pytest.raises(TcaError, match="rerun the train stage"):
        HybridPrompt.load(adapter, cf_model("sasrec"))
    assert HybridPrompt.load(tmp_path, cf) is None  # no hybrid.json: a text-only adapter


@pytest.mark.parametrize("backbone, packing, finetune", [("llara", "none", "lora"), ("llara", "items", "lora"), ("collm", "items", "full")])
def test_train_eval_stages_and_recommend(world, tokenizer, tiny_model_dir, tmp_path, backbone, packing, finetune):
    """llara with its curriculum, collm, with validation, per-sample or packed, LoRA or fully fine-tuned: the train
    stage writes the projector with the adapter (or the whole model), the eval stage and `tca recommend` build the
    same hybrid prompts (of that format) from it."""
    import yaml

    from pipeline.recommend import recommend
    from pipeline.runner import Project
    from pipeline.stages import cf_dist, train
    from pipeline.stages import eval as eval_stage
    from pipeline.stages import trie as trie_stage
    from tca.cf.registry import load_checkpoint

    root = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((root / "stages.yaml").read_text())["params"]
    params["tca"]["cf_source"] = "uniform"
    params["train"] |= {"backbone": backbone, "packing": packing, "finetune": finetune, "max_steps": 0, "epochs": 1, "micro_batch": 4, "grad_accum": 2, "eval_every": 1, "valid_beams": 5,
                        "valid_metric": "hr@5", "log_every": 1, "precision": "fp32"}
    params["eval"] |= {"num_beams": 5, "batch_size": 2, "precision": "fp32"}
    artifacts = tmp_path / "artifacts"
    for name in ("data", "subset", "cf"):
        (artifacts / name).mkdir(parents=True)
    pl.DataFrame({"item_id": np.arange(1, N_ITEMS + 1, dtype=np.int32), "title": TITLES[1:]}).write_parquet(artifacts / "data" / "items.parquet")
    with_users = lambda frame: frame.with_columns(user_id=pl.col("sample_id") // 3, timestamp=pl.col("sample_id"))  # noqa: E731 (packing reads them)
    with_users(world["samples"]).write_parquet(artifacts / "subset" / "train.parquet")
    world["samples"].write_parquet(artifacts / "data" / "train.parquet")
    with_users(world["valid"]).write_parquet(artifacts / "subset" / "valid.parquet")
    world["valid"].write_parquet(artifacts / "subset" / "test.parquet")
    shutil.copytree(tiny_model_dir, artifacts / "model")
    save_checkpoint(cf_model("sasrec"), artifacts / "cf" / "model.pt")
    for name, module in (("trie", trie_stage), ("cf_dist", cf_dist), ("train", train), ("eval", eval_stage)):
        (artifacts / name).mkdir()
        module.run(StageContext(name, params, artifacts / name, artifacts, device_request="cpu"))

    adapter = artifacts / "train" / "adapter"
    assert json.loads((adapter / "hybrid.json").read_text()) == {"backbone": backbone, "cf_model": "sasrec", "cf_dim": 16}
    assert json.loads((adapter / "format.json").read_text())["packing"] == packing
    shown = train.inspect(artifacts / "train", params)
    assert f"projector ({backbone})" in shown and ("fully fine-tuned" in shown) == (finetune == "full")
    log = [json.loads(line) for line in (artifacts / "train" / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in log if "loss" in r) and any("valid" in r for r in log)
    # the eval stage's lists are those of the trained adapter with the hybrid prompts of its format, built by hand
    cf = load_checkpoint(artifacts / "cf" / "model.pt")
    hybrid = HybridPrompt.load(adapter, cf)
    if finetune == "full":  # the trained projector was saved with the weights and is read back
        from safetensors.torch import load_file

        model = load_model(adapter, cf_dim=hybrid.cf_dim)
        assert not any(k.startswith(PROJECTOR) for k in load_file(adapter / "model.safetensors"))  # transformers loads it cleanly
        saved = load_file(adapter / "cf_projector.safetensors")["0.weight"]
        torch.manual_seed(params["train"]["seed"])
        fresh = load_model(artifacts / "model", cf_dim=hybrid.cf_dim, full=True)
        assert torch.equal(getattr(model, PROJECTOR)[0].weight, saved)
        assert not torch.equal(saved, getattr(fresh, PROJECTOR)[0].weight)
        with pytest.raises(TcaError, match="holds no cf_projector.safetensors"):  # a folder without one: the base model
            load_model(artifacts / "model", cf_dim=hybrid.cf_dim)
    else:
        model = load_model(artifacts / "model", adapter, cf_dim=hybrid.cf_dim)
    builder = train.load_builder(artifacts, params, packing, SLOTS[backbone])[0]
    assert builder.items_format == (packing == "items")
    direct = evaluate(model, builder, world["trie"], world["valid"], EvalConfig(num_beams=5), hybrid=hybrid)
    assert pl.read_parquet(artifacts / "eval" / "predictions.parquet")["items"].to_list() == direct.predictions["items"].to_list()
    assert json.loads((artifacts / "eval" / "metrics.json").read_text())["n_samples"] == world["valid"].height

    class Fake(Project):  # the project's paths and params without reading a stages.yaml
        def __init__(self):
            self.root, self.artifacts, self.params, self.device = tmp_path, artifacts, params, "cpu"

        def artifact(self, name):
            return self.artifacts / name

    text = recommend(Fake(), ["Fargo (1996)", "Heat (1995)"], None, 3)
    assert f"{backbone} prompts" in text
    first = text.splitlines()[4].split(maxsplit=2)[2]
    expected = evaluate_lists(model, builder, world, hybrid, [[3, 4]], 5)[0][0, 0]
    assert first == TITLES[expected]
