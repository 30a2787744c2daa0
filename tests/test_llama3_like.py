"""A base as the paper's Llama-3.2-3B ships (tiny): weights in shards, a tokenizer without a pad
token that puts its BOS before every text. The `model`, `train`, `eval` stages and `tca recommend`
run on it through the runner, every prompt they build starts with BOS, and `params/paper.yaml`
pointed at it passes `tca run --dry` and one training step."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from click.testing import CliRunner
from test_scale import TITLES, lock_as_run, samples

import cli
import tca.llm.train
from pipeline.context import StageContext
from pipeline.runner import Project
from pipeline.stages import model as model_stage
from tca.llm import base_model
from tca.cf.base import CFConfig
from tca.cf.registry import build, save_checkpoint
from tca.errors import TcaError
from tca.llm.prompt import PromptBuilder

REPO = Path(__file__).resolve().parents[1]
BOS = 1  # the fixture tokenizer's BOS (<|im_start|>); its EOS, 2, is also its filler id
PARAMS = {
    "train": {"packing": "none", "finetune": "lora", "max_steps": 0, "epochs": 1, "micro_batch": 4, "grad_accum": 2, "eval_every": 1, "valid_beams": 5, "valid_metric": "hr@5",
              "log_every": 1, "precision": "fp32"},
    "lora": {"r": 4, "alpha": 8},
    "eval": {"num_beams": 4, "batch_size": 3, "precision": "fp32"},
    "tca": {"top_k": 3},
}


def test_sharded_base_is_linked_and_counted(llama3_like_dir, tiny_llama, tmp_path):
    files = {p.name for p in llama3_like_dir.iterdir()}
    assert base_model.INDEX in files and base_model.SINGLE not in files
    ctx = StageContext(name="model", params={"llm": {"base": str(llama3_like_dir)}}, out=tmp_path / "out", artifacts=tmp_path)
    ctx.out.mkdir()
    model_stage.run(ctx)
    shards = base_model.weight_files(ctx.out)
    assert len(shards) > 1 and all(os.path.samefile(p, llama3_like_dir / p.name) for p in shards)
    assert base_model.count_params(ctx.out) == sum(p.numel() for p in tiny_llama(seed=0).parameters())  # tied: once
    assert "tied embeddings: True" in model_stage.inspect(ctx.out, ctx.params)

    broken = tmp_path / "broken"
    shutil.copytree(llama3_like_dir, broken)
    (broken / shards[-1].name).unlink()
    with pytest.raises(TcaError, match=rf"model.safetensors.index.json names {len(shards)} shards, 1 of them missing"):
        base_model.materialize(str(broken), tmp_path / "out2")
    (broken / base_model.INDEX).write_text("{}")
    with pytest.raises(TcaError, match="not a safetensors index with a weight_map"):
        base_model.materialize(str(broken), tmp_path / "out3")


@pytest.fixture(scope="module")
def project(tmp_path_factory, llama3_like_dir):
    """A project on the sharded base whose stages ran through the runner (data, subset and cf made by
    hand and locked), and every batch of prompts the stages built."""
    root = tmp_path_factory.mktemp("llama3") / "proj"
    art = root / "artifacts"
    for stage in ("data", "subset", "cf"):
        (art / stage).mkdir(parents=True)
    for code in ("tca", "pipeline", "params"):
        (root / code).symlink_to(REPO / code)
    config = yaml.safe_load((REPO / "stages.yaml").read_text())
    for section, values in PARAMS.items():
        config["params"][section] |= values
    config["params"]["llm"]["base"] = str(llama3_like_dir)
    (root / "stages.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    pl.DataFrame({"item_id": pl.Series(range(1, len(TITLES) + 1), dtype=pl.Int32), "title": TITLES}).write_parquet(art / "data" / "items.parquet")
    for split, frame in {"train": samples(20, 0, 0), "valid": samples(6, 1, 100), "test": samples(7, 2, 200)}.items():
        frame.write_parquet(art / "data" / f"{split}.parquet")
        frame.write_parquet(art / "subset" / f"{split}.parquet")
    (art / "data" / "stats.json").write_text("{}\n")
    torch.manual_seed(0)
    save_checkpoint(build(CFConfig(hidden=8, blocks=1, max_len=4), len(TITLES)).eval(), art / "cf" / "model.pt")
    (art / "cf" / "metrics.json").write_text("{}\n")

    built, validations = [], []
    build_prompts, validate = PromptBuilder.build, tca.llm.train.recommend
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PromptBuilder, "build", lambda self, *a: built.append(build_prompts(self, *a)) or built[-1])
        patch.setattr(tca.llm.train, "recommend", lambda *a, **k: validations.append(a[4]) or validate(*a, **k))
        proj = Project(root, device="cpu")
        lock_as_run(proj, ["data", "subset"])
        proj.run(["model", "text_emb", "profiles"], log=lambda msg: None)
        lock_as_run(proj, ["cf"])
        proj.run(["sid", "trie", "cf_dist", "train", "eval"], log=lambda msg: None)
        from pipeline.recommend import recommend

        text = recommend(proj, [TITLES[2], TITLES[5]], None, 3)
    assert not proj.status()
    assert [cfg.batch_size for cfg in validations] == [PARAMS["eval"]["batch_size"]]  # validation decodes eval.batch_size samples at once
    return root, built, text


def test_stages_and_recommend_run_with_bos_first(project):
    root, built, text = project
    art = root / "artifacts"
    assert (art / "model" / base_model.INDEX).exists() and not (art / "model" / base_model.SINGLE).exists()
    log = [json.loads(line) for line in (art / "train" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in log if "loss" in r)
    assert "valid" in log[-1]  # validation's beam search ran
    metrics = json.loads((art / "eval" / "metrics.json").read_text())
    assert metrics["n_samples"] == 7 and metrics["decode"]["dtype"] == "float32"
    assert text.count("\n") == 6 and f"    {TITLES[2]}\n    {TITLES[5]}\ntop 3" in text
    # train batches, validation, eval and recommend: every prompt starts with BOS, and only there
    assert len(built) > 5
    for prompts in built:
        starts = np.cumsum(prompts.lengths) - prompts.lengths
        assert (prompts.ids[starts] == BOS).all() and (prompts.ids == BOS).sum() == len(starts)


def test_paper_params_dry_run_and_one_training_step(project, llama3_like_dir, monkeypatch):
    from pipeline.stages.train import load_batcher
    from tca.llm.model import LoraSettings, load_model, use_bf16
    from tca.llm.train import TrainConfig, Trainer

    root, _, _ = project
    monkeypatch.chdir(root)
    paper = ["--params", str(REPO / "params" / "paper.yaml"), "--set", f"llm.base={llama3_like_dir}"]
    result = CliRunner().invoke(cli.main, ["run", "--dry", *paper])
    assert result.exit_code == 0, result.output
    assert "model: up to date" in result.output and "train: would run" in result.output

    params = Project(root, [f"llm.base={llama3_like_dir}"], params_file=REPO / "params" / "paper.yaml").params
    cfg = TrainConfig.from_params(params["train"], params["tca"]["alpha"])
    assert cfg.max_len == 2048 and cfg.precision == "bf16"
    torch.manual_seed(cfg.seed)
    model = load_model(root / "artifacts" / "model", device="cpu", lora=LoraSettings.from_params(params["lora"]),
                       bf16=use_bf16("cpu", cfg.precision), attention=params["llm"]["attn_implementation"])
    assert next(model.base_model.model.model.parameters()).dtype == torch.bfloat16
    rows = pl.read_parquet(root / "artifacts" / "subset" / "train.parquet", columns=["sample_id", "history", "item_id"])
    trainer = Trainer(model, load_batcher(root / "artifacts", params, cfg), rows, None, cfg, root / "paper-step", log=lambda m: None)
    loss, n_target, n_tokens = trainer.train_step(trainer.order(0)[: trainer.step_size])
    assert np.isfinite(loss) and n_target > 0 and n_tokens > n_target
    moments = [trainer.optimizer.state[p]["exp_avg"] for p in trainer.params]  # the step's lr is 0 (warmup): its gradients
    assert all(m.isfinite().all() for m in moments) and sum(int(m.count_nonzero()) for m in moments) > 0
