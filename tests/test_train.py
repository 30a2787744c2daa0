"""The trainer on a tiny random Llama with the real tokenizer: step losses equal an independent dense
reference loop, learning happens, gradient accumulation is token-exact, resuming is exact, and the
`train` stage writes its artifacts."""
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F

from pipeline.context import StageContext
from tca.collab.tokenizer import CollabConfig, token_dist
from tca.collab.store import DistReader, DistWriter
from tca.errors import TcaError
from tca.llm.evaluate import EvalConfig, recommend
from tca.llm.model import ItemTargets, LoraSettings, encode, load_model, use_bf16
from tca.llm.prompt import PromptBuilder
from tca.llm.train import Batcher, TrainConfig, Trainer, linear_schedule
from tca.collab.trie import build_trie, target_ids

TITLES = ["", "Toy Story (1995)", "Toy Soldiers (1991)", "Fargo (1996)", "Heat (1995)", "Amélie (2001)", "Alien (1979)",
          "Aliens (1986)", "Casino (1995)", "Clueless (1995)", "Babe (1995)", "Braveheart (1995)", "Batman (1989)"]
N_ITEMS = len(TITLES) - 1
LORA = LoraSettings(r=4, alpha=8, dropout=0.0)
BASE = TrainConfig(epochs=1, micro_batch=4, grad_accum=2, lr=5e-3, warmup_ratio=0.2, eval_every=0, log_every=1,
                   valid_beams=5, valid_metric="hr@5", precision="fp32")


def make_samples(n: int, seed: int, start_id: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 6, n)
    return pl.DataFrame({
        "sample_id": np.arange(start_id, start_id + n, dtype=np.int64),
        "history": [rng.integers(1, N_ITEMS + 1, k).astype(np.int32).tolist() for k in lengths],
        "item_id": rng.integers(1, N_ITEMS + 1, n).astype(np.int32),
    }, schema_overrides={"history": pl.List(pl.Int32)})


@pytest.fixture(scope="module")
def world(tokenizer, tmp_path_factory):
    """Prompt builder, targets, trie, 20 train + 6 valid samples and a dist.zarr of q from random CF scores."""
    targets = target_ids(tokenizer, pl.Series(TITLES[1:]))
    trie = build_trie(np.arange(1, N_ITEMS + 1), targets)
    samples, valid = make_samples(20, 0), make_samples(6, 1, start_id=100)
    scores = torch.randn(samples.height, N_ITEMS + 1, generator=torch.Generator().manual_seed(0)) * 2
    path = tmp_path_factory.mktemp("dist") / "dist.zarr"
    writer = DistWriter(path, {"trie_hash": trie.digest()})
    writer.append(samples["sample_id"].to_numpy(), token_dist(trie, samples["item_id"].to_numpy(), scores, CollabConfig()))
    writer.close()
    return {"builder": PromptBuilder(tokenizer, TITLES), "targets": ItemTargets(np.arange(1, N_ITEMS + 1), targets),
            "trie": trie, "dist": DistReader(path, trie), "samples": samples, "valid": valid, "pad": tokenizer.pad_token_id}


@pytest.fixture(scope="module")
def peaky_model_dir(tiny_llama, tokenizer, tmp_path_factory) -> Path:
    """A tiny Llama with larger initial weights: its frozen (tied) LM head can express peaked next-token
    distributions, so a few LoRA steps visibly move them (the default init keeps every logit near 0)."""
    out = tmp_path_factory.mktemp("peaky") / "model"
    tiny_llama(seed=0, initializer_range=0.3).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def trainer(world, model_dir, cfg, work_dir, lora=LORA, samples=None):
    torch.manual_seed(cfg.seed)
    model = load_model(model_dir, lora=lora)
    batcher = Batcher(world["builder"], world["targets"], world["trie"], world["dist"], cfg.loss_config, cfg.max_len, world["pad"])
    valid = world["valid"] if cfg.eval_every else None
    samples = world["samples"] if samples is None else samples
    return Trainer(model, batcher, samples, valid, cfg, work_dir, log=lambda msg: None)


def lora_weights(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def read_log(work_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (work_dir / "log.jsonl").read_text().splitlines()]


def dense_reference_losses(world, model_dir, cfg, steps, order):
    """The same optimization written plainly: full-sequence logits from the HF forward, a dense soft
    label (1 - alpha) one-hot + alpha q over the whole vocabulary, -log <y~, P> per target token;
    the samples of the steps in `order`."""
    torch.manual_seed(cfg.seed)
    model = load_model(model_dir, lora=LORA).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_step = cfg.micro_batch * cfg.grad_accum
    total = cfg.epochs * -(-world["samples"].height // per_step)
    warmup = int(np.ceil(cfg.warmup_ratio * total))
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * (step / warmup if step < warmup else (total - step) / (total - warmup))
        rows = world["samples"][order[step * per_step : (step + 1) * per_step]]
        inputs = encode(world["builder"], world["targets"], rows["history"], rows["item_id"].to_numpy(), cfg.max_len, world["pad"])
        soft = world["dist"].read(rows["sample_id"].to_numpy())
        logits = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).logits.double()
        at, soft_label = [], []
        for b in range(len(rows)):  # sample by sample, position by position
            start = int(inputs.attention_mask[b].sum()) - int(inputs.target_len[b])
            for t in range(int(inputs.target_len[b])):
                y = torch.zeros(logits.shape[2], dtype=torch.float64).index_add_(0, soft.token[b, t], soft.prob[b, t].double())
                y = cfg.alpha * y + (1 - cfg.alpha) * F.one_hot(inputs.input_ids[b, start + t], logits.shape[2])
                at.append((b, start + t - 1))
                soft_label.append(y)
        b, t = torch.tensor(at).T
        loss_sum = -(torch.stack(soft_label) * logits[b, t].softmax(1)).sum(1).log().sum()
        (loss_sum / len(at)).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad()
        losses.append(loss_sum.item() / len(at))
    return losses, lora_weights(model)


def test_steps_match_dense_reference(world, tiny_model_dir, tmp_path):
    """grad_accum=1 here: the reference takes each step's samples in one forward."""
    cfg = replace(BASE, loss="tca", alpha=0.5, micro_batch=8, grad_accum=1)
    t = trainer(world, tiny_model_dir, cfg, tmp_path / "work")
    t.run()
    ours = [r["loss"] for r in read_log(tmp_path / "work")]
    ref, ref_weights = dense_reference_losses(world, tiny_model_dir, cfg, len(ours), t.order(0))
    assert len(ours) == 3
    np.testing.assert_allclose(ours, ref, rtol=1e-5)
    for name, w in lora_weights(t.model).items():
        torch.testing.assert_close(w, ref_weights[name], rtol=1e-4, atol=1e-6)


def test_schedule_counts_optimizer_steps():
    f = linear_schedule(warmup=2, total=10)
    assert [f(s) for s in range(11)] == [0, 0.5, 1, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0]


def target_kl(world, model, q_dense_fn):
    """Mean KL(q || P) at the target positions of every train sample."""
    rows = world["samples"]
    inputs = encode(world["builder"], world["targets"], rows["history"], rows["item_id"].to_numpy(), 512, world["pad"])
    with torch.no_grad():
        log_p = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).logits.flatten(0, 1)[inputs.target_pos].log_softmax(1)
    q = q_dense_fn(rows, log_p.shape[1])
    return float(torch.where(q > 0, q * (q.log() - log_p), 0.0).sum(1).mean())


def test_learning_moves_toward_targets_and_q(world, peaky_model_dir, tmp_path):
    def q_dense(rows, vocab):
        soft = world["dist"].read(rows["sample_id"].to_numpy())
        real = soft.count > 0
        return torch.zeros(int(real.sum()), vocab).scatter_add_(1, soft.token[real], soft.prob[real])

    cfg = replace(BASE, loss="tca", alpha=1.0, epochs=6, lr=5e-2, warmup_ratio=0.0)
    t = trainer(world, peaky_model_dir, cfg, tmp_path / "q")
    before = target_kl(world, t.model, q_dense)
    t.run()
    after = target_kl(world, t.model, q_dense)
    assert after < 0.8 * before, (before, after)

    for loss, msl in (("ntp", False), ("ntp", True), ("tca", True), ("kl", False)):
        cfg = replace(BASE, loss=loss, msl=msl, alpha=0.3, epochs=3, lr=5e-2, log_every=3)
        t = trainer(world, peaky_model_dir, cfg, tmp_path / f"{loss}-{msl}")
        t.run()
        log = read_log(tmp_path / f"{loss}-{msl}")
        assert log[-1]["loss"] < 0.9 * log[0]["loss"], (loss, msl, log)
        assert all(r["tokens_per_s"] > 0 for r in log)


def test_gradient_accumulation_is_token_weighted(world, tiny_model_dir, tmp_path):
    """One step over 8 samples, split 1 x 8, 2 x 4 or 4 x 2: the same update (targets differ in length,
    so averaging per micro-batch would not be)."""
    samples = world["samples"].head(8)
    weights = []
    for micro, accum in ((8, 1), (4, 2), (2, 4)):
        cfg = replace(BASE, loss="tca", alpha=0.3, micro_batch=micro, grad_accum=accum, warmup_ratio=0.0)
        t = trainer(world, tiny_model_dir, cfg, tmp_path / f"{micro}", samples=samples)
        t.run()
        weights.append(lora_weights(t.model))
        assert t.state["step"] == 1
    for other in weights[1:]:
        for name, w in weights[0].items():
            torch.testing.assert_close(other[name], w, rtol=1e-5, atol=1e-6)


def test_resume_continues_exactly(world, tiny_model_dir, tmp_path, monkeypatch):
    """Interrupted at step 5 (checkpoints every 2 steps and at epoch ends, validation every epoch, LoRA
    dropout on): resuming gives the weights, the adapter and the log of the uninterrupted run."""
    cfg = replace(BASE, epochs=3, micro_batch=4, grad_accum=1, checkpoint_every=2, eval_every=1, log_every=2)
    lora = replace(LORA, dropout=0.1)
    full = trainer(world, tiny_model_dir, cfg, tmp_path / "full", lora)
    full_result = full.run()

    interrupted = trainer(world, tiny_model_dir, cfg, tmp_path / "resumed", lora)
    real_step = Trainer.train_step

    def crash_at_step_8(self, *args):
        if self.state["step"] == 7:
            raise KeyboardInterrupt
        return real_step(self, *args)

    monkeypatch.setattr(Trainer, "train_step", crash_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        interrupted.run()
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert torch.load(tmp_path / "resumed" / "state.pt", weights_only=False)["state"]["step"] == 6
    resumed = trainer(world, tiny_model_dir, cfg, tmp_path / "resumed", lora)
    result = resumed.run()

    assert result == full_result
    for name, w in lora_weights(full.model).items():
        assert torch.equal(lora_weights(resumed.model)[name], w), name
    strip = lambda log: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in log]
    assert strip(read_log(tmp_path / "resumed")) == strip(read_log(tmp_path / "full"))
    for f in (tmp_path / "full" / "adapter").iterdir():
        assert f.read_bytes() == (tmp_path / "resumed" / "adapter" / f.name).read_bytes(), f.name


def test_resume_refuses_another_config_data_or_world_size(world, tiny_model_dir, tmp_path):
    """A checkpoint is continued only by the run that wrote it: other params, other samples or another
    number of processes are refused with an error naming the work dir to delete, and it stays as it was."""
    cfg = replace(BASE, checkpoint_every=1)
    work = tmp_path / "work"
    trainer(world, tiny_model_dir, cfg, work).run()
    saved = (work / "state.pt").read_bytes()
    refused = f"checkpoint of another configuration, data or number of processes; delete {re.escape(str(work))}"
    same_count = world["samples"].with_columns(item_id=world["samples"]["item_id"].reverse())  # other targets, as many samples
    for other, samples in ((replace(cfg, lr=1e-3), None), (replace(cfg, loss="ntp"), None), (cfg, world["samples"].head(16)),
                           (cfg, same_count)):
        with pytest.raises(TcaError, match=refused):
            trainer(world, tiny_model_dir, other, work, samples=samples).run()
        assert (work / "state.pt").read_bytes() == saved

    checkpoint = torch.load(work / "state.pt", weights_only=False)
    checkpoint["world_size"] = 2  # as if 2 data-parallel processes had written it (the real case: test_ddp_resume)
    torch.save(checkpoint, work / "state.pt")
    with pytest.raises(TcaError, match=refused):
        trainer(world, tiny_model_dir, cfg, work).run()


def ddp_resume_worker(rank: int, port: int, model_dir: Path, samples: pl.DataFrame, valid: pl.DataFrame, cfg: TrainConfig,
                      lora: LoraSettings, root: Path) -> None:
    """One of 2 gloo ranks: an uninterrupted run in root/full; a run in root/resumed killed on every rank
    right after its second checkpoint, then resumed; then a run with another lr on root/resumed, whose
    refusal each rank writes to root/refused<rank>.txt."""
    import datetime
    import os

    from transformers import AutoTokenizer

    from tca.llm import ddp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        targets = target_ids(tokenizer, pl.Series(TITLES[1:]))
        trie = build_trie(np.arange(1, N_ITEMS + 1), targets)

        def make(work: Path, c: TrainConfig = cfg) -> Trainer:
            torch.manual_seed(c.seed)
            model = load_model(model_dir, lora=lora)
            batcher = Batcher(PromptBuilder(tokenizer, TITLES), ItemTargets(np.arange(1, N_ITEMS + 1), targets), trie, None,
                              c.loss_config, c.max_len, tokenizer.pad_token_id)
            return Trainer(model, batcher, samples, valid, c, work, log=lambda msg: None, world=ddp.World(rank, 2))

        make(root / "full").run()
        real_save, saves = Trainer.save_checkpoint, []

        def killed_after_two(self):
            real_save(self)
            saves.append(self.state["step"])
            if len(saves) == 2:
                raise KeyboardInterrupt

        Trainer.save_checkpoint = killed_after_two
        try:
            make(root / "resumed").run()
        except KeyboardInterrupt:
            pass
        finally:
            Trainer.save_checkpoint = real_save
        make(root / "resumed").run()
        try:
            make(root / "resumed", replace(cfg, lr=2 * cfg.lr)).run()
        except TcaError as err:
            (root / f"refused{rank}.txt").write_text(str(err))
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_resume_continues_exactly_and_refuses_another_world_size(world, tiny_model_dir, tmp_path):
    """2 gloo ranks (LoRA dropout on, validation split across ranks), killed after the step-4 checkpoint
    and resumed: the adapter and the log of the uninterrupted 2-rank run. Every rank refuses a
    checkpoint of another config (none hangs), and one process refuses the 2-rank checkpoint."""
    import socket
    import time

    cfg = replace(BASE, loss="ntp", epochs=2, micro_batch=2, grad_accum=1, checkpoint_every=2, eval_every=1, log_every=1)
    lora = replace(LORA, dropout=0.1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = torch.multiprocessing.start_processes(
        ddp_resume_worker, args=(port, tiny_model_dir, world["samples"], world["valid"], cfg, lora, tmp_path),
        nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 240
    while not procs.join(timeout=5):
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.kill()
            pytest.fail("the 2 ranks did not finish in 240 s (a rank waiting on a collective the other never reached)")

    checkpoint = torch.load(tmp_path / "resumed" / "state.pt", weights_only=False)
    assert checkpoint["world_size"] == 2 and checkpoint["state"]["step"] == 10  # 20 samples, 2 x 2 per step, 2 epochs
    assert not torch.equal(checkpoint["rng"][0]["cpu"], checkpoint["rng"][1]["cpu"])  # each rank drew its own dropout
    for f in (tmp_path / "full" / "adapter").iterdir():
        assert f.read_bytes() == (tmp_path / "resumed" / "adapter" / f.name).read_bytes(), f.name
    strip = lambda log: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in log]  # noqa: E731
    log = strip(read_log(tmp_path / "resumed"))
    assert log == strip(read_log(tmp_path / "full")) and sum("valid" in r for r in log) == 2
    refused = "checkpoint of another configuration, data or number of processes"
    assert all(refused in (tmp_path / f"refused{rank}.txt").read_text() for rank in (0, 1))
    with pytest.raises(TcaError, match=refused):
        trainer(world, tiny_model_dir, cfg, tmp_path / "resumed", lora).run()


def test_early_stopping_keeps_the_best_adapter(world, tiny_model_dir, tmp_path, monkeypatch):
    from tca.llm.evaluate import Evaluation

    values, snapshots = iter([0.2, 0.5, 0.4, 0.3, 0.9]), []

    def fake_score_lists(items, scores, samples, cf=None):
        assert items.shape == (samples.height, cfg.valid_beams)
        snapshots.append(lora_weights(t.model))
        return Evaluation({"llm": {"hr@5": next(values)}}, None)

    monkeypatch.setattr("tca.llm.train.score_lists", fake_score_lists)
    cfg = replace(BASE, epochs=5, micro_batch=10, grad_accum=1, eval_every=1, patience=2)
    t = trainer(world, tiny_model_dir, cfg, tmp_path / "es")
    result = t.run()
    assert (result.best_metric, result.best_epoch, result.stopped_early, result.steps) == (0.5, 2, True, 8)
    assert len(snapshots) == 4
    best = load_model(tiny_model_dir, adapter_dir=tmp_path / "es" / "adapter")
    loaded = lora_weights(best)
    assert loaded.keys() == snapshots[1].keys()
    for name, w in loaded.items():
        assert torch.equal(w, snapshots[1][name]), name


def bf16_path(world, model_dir, cfg, bf16: bool):
    """The loss and LoRA gradients of one batch as the trainer computes them: weights in bf16 (the stage
    loads them so when `precision` picks bf16) under bf16 autocast, or all fp32."""
    from tca.llm.train import batch_loss

    torch.manual_seed(cfg.seed)
    model = load_model(model_dir, lora=LORA, bf16=bf16).train()
    batcher = Batcher(world["builder"], world["targets"], world["trie"], world["dist"], cfg.loss_config, cfg.max_len, world["pad"])
    inputs, labels = batcher(world["samples"])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = batch_loss(model, inputs, labels, cfg.loss_config)
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten().float() for p in model.parameters() if p.requires_grad])


@pytest.mark.skipif(not use_bf16("cpu"), reason="this CPU has no native bf16 (AVX512-BF16 / AMX): precision auto runs fp32 here")
@pytest.mark.parametrize("loss, msl", [("tca", False), ("ntp", True)])
def test_bf16_train_step_and_decode_match_fp32(world, tiny_model_dir, tmp_path, loss, msl):
    """What `precision: auto` runs on this CPU (and on GPUs) against fp32, within stated tolerances:
    one batch's loss within 5e-4 relative and its LoRA gradients at cosine > 0.999 and 2% relative
    norm error (measured: 8e-5, 0.99998, 0.6%); a trainer step logs the same loss within 5e-4; beam
    search (every title) scores each title within 2e-3 (measured: 4e-4). The tiny model's logits are
    small, so its bf16 error is too: with 15x larger initial weights (peaky_model_dir) the measured
    errors are 2e-3 (loss), 8% (gradient norm) and 4e-2 (title scores), too close to these bugs' to tell them apart."""
    cfg = replace(BASE, loss=loss, msl=msl, alpha=0.5, micro_batch=20, grad_accum=1)
    loss32, grad32 = bf16_path(world, tiny_model_dir, cfg, bf16=False)
    loss16, grad16 = bf16_path(world, tiny_model_dir, cfg, bf16=True)
    assert loss16 == pytest.approx(loss32, rel=5e-4)
    assert F.cosine_similarity(grad16, grad32, dim=0) > 0.999 and (grad16 - grad32).norm() < 0.02 * grad32.norm()

    steps = {}
    for precision, bf16_weights in (("fp32", False), ("bf16", True), ("bf16", False)):
        torch.manual_seed(cfg.seed)
        model = load_model(tiny_model_dir, lora=LORA, bf16=bf16_weights)
        batcher = Batcher(world["builder"], world["targets"], world["trie"], world["dist"], cfg.loss_config, cfg.max_len, world["pad"])
        work = tmp_path / f"{precision}-{bf16_weights}"
        Trainer(model, batcher, world["samples"], None, replace(cfg, precision=precision), work, log=lambda msg: None).run()
        (record,) = read_log(work)
        steps[precision, bf16_weights] = record["loss"]
    assert steps["bf16", True] == pytest.approx(steps["fp32", False], rel=5e-4)
    # the trainer itself computes in bf16 (autocast) when asked to, whatever the weights
    assert steps["bf16", False] == pytest.approx(steps["fp32", False], rel=5e-4) and steps["bf16", False] != steps["fp32", False]

    decoded = {}
    for bf16 in (False, True):
        model = load_model(tiny_model_dir, bf16=bf16)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # as the trainer's validation runs
            items, scores = recommend(model, world["builder"], world["trie"], world["valid"]["history"], EvalConfig(num_beams=N_ITEMS))
        decoded[bf16] = [dict(zip(i.tolist(), s.tolist())) for i, s in zip(items, scores)]
    for by_item32, by_item16 in zip(decoded[False], decoded[True]):
        assert by_item16.keys() == by_item32.keys() == set(range(1, N_ITEMS + 1))
        np.testing.assert_allclose([by_item16[i] for i in by_item32], list(by_item32.values()), atol=2e-3, rtol=0)


def test_train_stage(world, tiny_model_dir, tokenizer, tmp_path):
    """The stage glue on upstream artifacts built by the real trie and cf_dist stages (q uniform)."""
    import yaml

    from pipeline.stages import cf_dist, train
    from pipeline.stages import trie as trie_stage

    root = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((root / "stages.yaml").read_text())["params"]
    params["tca"]["cf_source"] = "uniform"
    params["train"] |= {"packing": "none", "finetune": "lora", "max_steps": 0, "epochs": 1, "micro_batch": 4, "grad_accum": 2, "eval_every": 1, "valid_beams": 10, "log_every": 1}
    artifacts = tmp_path / "artifacts"
    (artifacts / "data").mkdir(parents=True)
    pl.DataFrame({"item_id": np.arange(1, N_ITEMS + 1, dtype=np.int32), "title": TITLES[1:]}).write_parquet(artifacts / "data" / "items.parquet")
    (artifacts / "subset").mkdir()
    world["samples"].write_parquet(artifacts / "subset" / "train.parquet")
    world["samples"].write_parquet(artifacts / "data" / "train.parquet")
    world["valid"].write_parquet(artifacts / "subset" / "valid.parquet")
    shutil.copytree(tiny_model_dir, artifacts / "model")
    for name, module in (("trie", trie_stage), ("cf_dist", cf_dist), ("train", train)):
        (artifacts / name).mkdir()
        module.run(StageContext(name, params, artifacts / name, artifacts, device_request="cpu"))
    out = artifacts / "train"
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    log = read_log(out)
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3] and "valid" in log[-1]
    assert not any((artifacts / ".resume").iterdir())
    text = train.inspect(out, params)
    assert "LoRA r=8" in text and "valid epoch 1" in text and "3 optimizer steps" in text


@pytest.mark.parametrize("msl, tau", [(True, 4.5), (False, 1.0)])
def test_validation_decodes_at_the_trained_msl_temperature(world, tiny_model_dir, tmp_path, monkeypatch, msl, tau):
    """MSL's validation renormalizes at train.msl_tau, the distribution it trains; without MSL, the full softmax."""
    seen = []

    def fake_recommend(model, builder, trie, histories, cfg, hybrid=None):
        seen.append(cfg)
        return np.zeros((len(histories), cfg.num_beams), np.int64), np.full((len(histories), cfg.num_beams), -np.inf, np.float32)

    monkeypatch.setattr("tca.llm.train.recommend", fake_recommend)
    (tmp_path / "v").mkdir()
    trainer(world, tiny_model_dir, replace(BASE, msl=msl, msl_tau=4.5, eval_every=1), tmp_path / "v").validate(1)
    assert (seen[0].renormalize, seen[0].tau) == (msl, tau)


def test_reference_quirks_reproduce_the_authors_training(world, tiny_model_dir, tmp_path):
    """train.reference_quirks: the last title token and EOS carry no loss (and do not count as target
    tokens), the LLaRA/CoLLM projector stays frozen, and the schedule decays over 16x the steps."""
    from tca.llm.model import encode
    from tca.llm.losses import make_labels, position_losses
    from tca.ragged import ragged_index
    from tca.llm.train import QUIRK_SCHEDULE, QUIRK_UNSUPERVISED, batch_loss

    cfg = replace(BASE, loss="ntp", reference_quirks=True, warmup_ratio=0.1)
    torch.manual_seed(0)
    model = load_model(tiny_model_dir, lora=LORA, cf_dim=4)
    batcher = Batcher(world["builder"], world["targets"], world["trie"], None, cfg.loss_config, cfg.max_len, world["pad"])
    t = Trainer(model, batcher, world["samples"], None, cfg, tmp_path / "work", log=lambda m: None)
    full_len = world["targets"].get(world["samples"]["item_id"].to_numpy())[1]
    np.testing.assert_array_equal(t.target_len, full_len - QUIRK_UNSUPERVISED)
    assert not any("cf_projector" in n for n, p in model.named_parameters() if p.requires_grad)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)

    rows = world["samples"][:5]
    inputs, labels = batcher(rows)
    with torch.no_grad():
        every = position_losses(head_of(model, inputs, labels), labels, cfg.loss_config)
        row, col = ragged_index(inputs.target_len)
        want = every[torch.from_numpy(col < inputs.target_len[row] - QUIRK_UNSUPERVISED)].sum()
        torch.testing.assert_close(batch_loss(model, inputs, labels, cfg.loss_config, QUIRK_UNSUPERVISED), want)
        assert batch_loss(model, inputs, labels, cfg.loss_config) > want

    span = t.total_steps * QUIRK_SCHEDULE
    warmup = int(np.ceil(cfg.warmup_ratio * span))
    lrs = []
    for _ in range(t.total_steps):
        lrs.append(t.scheduler.get_last_lr()[0])
        t.optimizer.step()
        t.scheduler.step()
    np.testing.assert_allclose(lrs, [cfg.lr * linear_schedule(warmup, span)(k) for k in range(t.total_steps)])
    plain = linear_schedule(int(np.ceil(cfg.warmup_ratio * t.total_steps)), t.total_steps)
    assert lrs != [cfg.lr * plain(k) for k in range(t.total_steps)]  # without the quirk: another schedule


def head_of(model, inputs, labels):
    from tca.llm.model import head_logits, target_hidden

    return head_logits(model, target_hidden(model, inputs), labels.columns)


def test_a_crash_while_writing_state_pt_keeps_the_previous_checkpoint(world, tiny_model_dir, tmp_path, monkeypatch):
    """state.pt is written to a temporary file and renamed: a crash mid-write leaves the previous
    checkpoint whole, and a new trainer resumes from it (planted bug: torch.save straight to state.pt)."""
    cfg = replace(BASE, checkpoint_every=1)
    t = trainer(world, tiny_model_dir, cfg, tmp_path / "work")
    t.run()
    saved = (tmp_path / "work" / "state.pt").read_bytes()

    def crash(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        t.save_checkpoint()
    monkeypatch.undo()
    assert (tmp_path / "work" / "state.pt").read_bytes() == saved
    resumed = trainer(world, tiny_model_dir, cfg, tmp_path / "work")
    resumed.resume()
    assert resumed.state["step"] == t.total_steps


def padded_tokens(trainer, order) -> int:
    """Tokens the micro-batches of an epoch in this order hold, each padded to its longest sequence (`trainer.unit_len`)."""
    return sum(len(units) * int(trainer.unit_len[units].max()) for step in range(trainer.steps_per_epoch)
               for units in trainer.micro_batches(order[step * trainer.step_size : (step + 1) * trainer.step_size]))


def test_bucketing_keeps_each_epoch_s_samples_and_pads_less(world, tiny_model_dir, tmp_path):
    """Bucketed or not, an epoch takes every sample once, in an order that is a function of (seed, epoch);
    bucketed micro-batches hold prompts of similar length. The lengths it sorts by are the encoded ones."""
    samples = pl.concat([make_samples(150, 7, start_id=1000), world["samples"]])
    cfg = replace(BASE, micro_batch=4, grad_accum=2)
    on, off, again = (trainer(world, tiny_model_dir, replace(cfg, bucketing=b), tmp_path / str(b), samples=samples) for b in (True, False, True))
    rows = samples[:50]
    lengths = encode(world["builder"], world["targets"], rows["history"], rows["item_id"].to_numpy(), cfg.max_len, world["pad"]).attention_mask.sum(1)
    assert on.unit_len[:50].tolist() == lengths.tolist() and off.unit_len is None
    for epoch in (0, 1):
        order = on.order(epoch)
        assert sorted(order.tolist()) == list(range(samples.height)) == sorted(off.order(epoch).tolist())
        assert np.array_equal(order, again.order(epoch)) and not np.array_equal(order, again.order(1 - epoch))
        assert padded_tokens(on, order) < 0.9 * padded_tokens(on, off.order(epoch)), epoch
    mb = [on.unit_len[units] for units in on.micro_batches(on.order(0)[: on.step_size])]
    assert max(int(m.max() - m.min()) for m in mb) <= 2  # 170 samples of ~10 lengths: micro-batches of one length or two


@pytest.mark.parametrize("loss, msl", [("tca", False), ("ntp", True)])
def test_a_training_micro_batch_never_reads_back_from_the_device(world, tiny_model_dir, tmp_path, host_syncs, loss, msl):
    """Forward, backward and loss accumulation of a prepared micro-batch make no host sync (on CUDA the
    host then runs ahead and prepares the next one); the loss is read once per log line. Packed rows:
    tests/test_packing.py."""
    t = trainer(world, tiny_model_dir, replace(BASE, loss=loss, msl=msl, alpha=0.5), tmp_path / "w")
    rows = t.order(0)[: t.step_size]
    units = t.micro_batches(rows)[0]
    inputs, labels = t.prepare(units)
    total = torch.zeros(())
    with host_syncs() as syncs:
        total += t.micro_step(inputs, labels, int(t.target_len[rows].sum()))
    assert syncs.calls == []
    assert float(total) > 0 and all(p.grad is not None for p in t.params)


def test_prefetch_returns_results_in_order_raises_errors_and_stops_early():
    from tca.llm.prefetch import Prefetch

    with Prefetch(lambda x: x * x, range(50), depth=2) as squares:
        assert list(squares) == [x * x for x in range(50)] and list(squares) == []

    def fail_at_3(x):
        if x == 3:
            raise ValueError("bad batch 3")
        return x

    with Prefetch(fail_at_3, range(10)) as items:
        assert [next(items) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(ValueError, match="bad batch 3"):
            next(items)
    endless = Prefetch(lambda x: x, iter(int, 1))  # never ends: leaving must still stop the thread
    assert next(endless) == 0
    endless.close()
    assert not endless._thread.is_alive()
