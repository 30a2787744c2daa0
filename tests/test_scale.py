"""Scaling out, on a real project (the repo's stages, tiny upstream artifacts): `tca run-stage train`
under torchrun or accelerate launch with 2 gloo ranks trains exactly as one process with twice the micro-batch; cf_dist
and eval run as shards that `tca merge` joins into the artifact (and lock key) of one run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
from polars.testing import assert_frame_equal
import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

import cli
from pipeline.context import StageContext
from pipeline.runner import Project
from pipeline.stages import cf_dist as cf_dist_stage
from pipeline.stages import trie as trie_stage
from tca.cf.base import CFConfig
from tca.cf.registry import build, save_checkpoint
from tca.errors import TcaError

REPO = Path(__file__).resolve().parents[1]
TITLES = ["Toy Story (1995)", "Toy Soldiers (1991)", "Fargo (1996)", "Heat (1995)", "Amélie (2001)", "Alien (1979)",
          "Aliens (1986)", "Casino (1995)", "Clueless (1995)", "Babe (1995)", "Braveheart (1995)", "Batman (1989)"]
PARAMS = {  # over stages.yaml's defaults: a tiny, exactly reproducible run
    "tca": {"top_k": 3},
    "train": {"packing": "none", "finetune": "lora", "max_steps": 0, "epochs": 1, "micro_batch": 8, "grad_accum": 2, "lr": 5e-3, "warmup_ratio": 0.2, "eval_every": 1,
              "valid_beams": 5, "valid_metric": "hr@5", "log_every": 1, "precision": "fp32"},
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
    "eval": {"num_beams": 4, "batch_size": 3},
}
UPSTREAM = ("data", "subset", "model", "cf", "trie")  # made by hand below (cf also reads the text_emb / profiles stand-ins, trie the sid one)


def samples(n: int, seed: int, start: int) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    return pl.DataFrame({
        "sample_id": np.arange(start, start + n, dtype=np.int64),
        "user_id": pl.Series(rng.integers(1, 5, n), dtype=pl.Int32),
        "history": pl.Series([rng.integers(1, len(TITLES) + 1, rng.integers(1, 6)).tolist() for _ in range(n)], dtype=pl.List(pl.Int32)),
        "item_id": pl.Series(rng.integers(1, len(TITLES) + 1, n), dtype=pl.Int32),
        "timestamp": np.arange(n, dtype=np.int64),
    })


def lock_as_run(proj: Project, names) -> None:
    """Record artifacts made by hand as the stages' outputs (what `dvc commit` does)."""
    for name in names:
        stage = proj.graph.stages[name]
        fp = proj.fingerprint(stage)
        proj._write_lock_entry(name, {"key": fp.key, "code": fp.code, "deps": fp.deps, "params": fp.params,
                                      "outs": proj.outputs(stage), "seconds": 0.0})


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model_dir) -> Path:
    """A project whose upstream stages are locked, with cf_dist and train (micro_batch 8) run by the runner."""
    root = tmp_path_factory.mktemp("scale") / "proj"
    art = root / "artifacts"
    for stage in ("data", "subset", "cf", "trie"):
        (art / stage).mkdir(parents=True)
    for code in ("tca", "pipeline"):
        (root / code).symlink_to(REPO / code)
    config = yaml.safe_load((REPO / "stages.yaml").read_text())
    for section, values in PARAMS.items():
        config["params"][section] |= values
    (root / "stages.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    pl.DataFrame({"item_id": pl.Series(range(1, len(TITLES) + 1), dtype=pl.Int32), "title": TITLES}).write_parquet(art / "data" / "items.parquet")
    splits = {"train": samples(20, 0, 0), "valid": samples(6, 1, 100), "test": samples(7, 2, 200)}
    for split, frame in splits.items():
        frame.write_parquet(art / "data" / f"{split}.parquet")
        frame.write_parquet(art / "subset" / f"{split}.parquet")
    (art / "data" / "stats.json").write_text("{}\n")
    shutil.copytree(tiny_model_dir, art / "model")
    torch.manual_seed(0)
    save_checkpoint(build(CFConfig(hidden=8, blocks=1, max_len=4), len(TITLES)).eval(), art / "cf" / "model.pt")
    (art / "cf" / "metrics.json").write_text("{}\n")
    trie_stage.run(StageContext("trie", config["params"], art / "trie", art))
    proj = Project(root, device="cpu")
    lock_as_run(proj, UPSTREAM[:3])
    proj.run(["text_emb", "profiles"], log=lambda msg: None)
    lock_as_run(proj, ["cf"])
    proj.run(["sid"], log=lambda msg: None)  # a stand-in: the backbone reads no semantic IDs
    lock_as_run(proj, ["trie"])
    proj.run(["cf_dist", "train"], log=lambda msg: None)
    assert not {"cf_dist", "train"} & proj.status().keys()
    return root


@pytest.fixture
def root(base, tmp_path) -> Path:
    """A private copy of the base project (tests run stages in it)."""
    copy = tmp_path / "proj"
    shutil.copytree(base, copy, symlinks=True)
    return copy


LAUNCHERS = {  # accelerate comes with peft; its --multi_gpu mode is torchrun's (gloo here: --device cpu)
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
}


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_launched_ranks_train_as_one_process_with_double_micro_batch(root, base, launcher):
    """2 gloo ranks x micro_batch 4 == 1 process x micro_batch 8: every step's loss, the validation and
    the LoRA weights; rank 0 alone writes the adapter, the log and stages.lock."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run([*LAUNCHERS[launcher], "-m", "cli", "run-stage", "train", "--set", "train.micro_batch=4", "--device", "cpu"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("train: running") == 1 and done.stdout.count("train: done") == 1  # rank 0 runs the runner

    one, two = base / "artifacts" / "train", root / "artifacts" / "train"
    ref, got = load_file(one / "adapter" / "adapter_model.safetensors"), load_file(two / "adapter" / "adapter_model.safetensors")
    assert ref.keys() == got.keys() and ref
    assert all(ref[name].abs().max() > 1e-4 for name in ref if "lora_B" in name)  # trained away from B = 0
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-5)
    logs = [[json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()] for d in (one, two)]
    assert [r["step"] for r in logs[1] if "loss" in r] == [1, 2]  # 20 samples, 16 per step: one line per step, once
    for a, b in zip(*logs, strict=True):
        assert a.keys() == b.keys() and a["step"] == b["step"]
        if "loss" in a:
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        else:  # the validation, split over the ranks, scores the same lists
            assert a["valid"] == pytest.approx(b["valid"]) and a["best"] == b["best"]
    proj = Project(root, ["train.micro_batch=4"])
    lock = proj.lock()
    assert lock["train"]["params"]["train.micro_batch"] == 4 and "train" not in proj.status()
    assert not any((root / "artifacts" / ".resume").iterdir()) and not list((root / "artifacts" / ".tmp").glob("train-*"))


def test_cf_dist_shards_merge_to_the_arrays_of_one_run(root, monkeypatch):
    monkeypatch.setattr(cf_dist_stage, "BATCH", 5)  # 20 samples: 4 batches, shards of 1, 1 and 2 of them
    monkeypatch.chdir(root)
    proj = Project(root, device="cpu")
    quiet = lambda msg: None  # noqa: E731
    proj.run(["cf_dist"], force=True, log=quiet)
    single = root / "single.zarr"
    shutil.copytree(root / "artifacts" / "cf_dist" / "dist.zarr", single)
    key = proj.lock()["cf_dist"]["key"]

    with pytest.raises(TcaError, match="no shards of `cf_dist`"):
        proj.merge("cf_dist")
    Project(root, ["tca.temperature=0.5"]).run_shard("cf_dist", 1, 3, log=quiet)  # other params: never merged
    proj.run_shard("cf_dist", 0, 3, log=quiet)
    proj.run_shard("cf_dist", 2, 3, log=quiet)
    with pytest.raises(TcaError, match=r"shard\(s\) 1/3 of `cf_dist` are missing"):
        proj.merge("cf_dist")
    result = CliRunner().invoke(cli.main, ["run-stage", "cf_dist", "--shard", "1/3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli.main, ["merge", "cf_dist", "--device", "cpu"])
    assert result.exit_code == 0, result.output

    merged = root / "artifacts" / "cf_dist" / "dist.zarr"
    files = sorted(p.relative_to(single) for p in single.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(merged) for p in merged.rglob("*") if p.is_file())
    for rel in files:  # every array's metadata and chunk files, byte for byte
        if rel != Path("zarr.json"):
            assert (single / rel).read_bytes() == (merged / rel).read_bytes(), rel
    attrs = [json.loads((p / "zarr.json").read_text())["attributes"] for p in (single, merged)]
    assert attrs[0].pop("dropped_mass_mean") == pytest.approx(attrs[1].pop("dropped_mass_mean"), rel=1e-12)
    assert attrs[0] == attrs[1] and attrs[0]["n_samples"] == 20
    assert proj.lock()["cf_dist"]["key"] == key and "cf_dist" not in Project(root).status()
    assert not (root / "artifacts" / ".shards" / "cf_dist" / key).exists()  # the merged shards are gone
    with pytest.raises(TcaError, match="no shards .* made with other ones"):  # the temperature=0.5 one is left
        proj.merge("cf_dist")
    with pytest.raises(TcaError, match="use at most 4 shards"):
        proj.run_shard("cf_dist", 0, 5, log=quiet)
    with pytest.raises(TcaError, match="cannot be sharded; stages that can: cf_dist, eval"):
        proj.run_shard("train", 0, 2, log=quiet)


def test_eval_shards_give_the_metrics_of_one_run(root):
    proj = Project(root, device="cpu")
    quiet = lambda msg: None  # noqa: E731
    proj.run(["eval"], log=quiet)
    out = root / "artifacts" / "eval"
    single = json.loads((out / "metrics.json").read_text())
    predictions = pl.read_parquet(out / "predictions.parquet")
    key = proj.lock()["eval"]["key"]
    for i in range(3):
        proj.run_shard("eval", i, 3, log=quiet)
    shards = sorted((root / "artifacts" / ".shards" / "eval" / key).iterdir())
    assert [pl.read_parquet(s / "predictions.parquet").height for s in shards] == [2, 2, 3]
    proj.merge("eval", log=quiet)
    merged = json.loads((out / "metrics.json").read_text())
    assert merged.pop("decode")["shards"] == 3
    single.pop("decode")
    assert merged == single and merged["n_samples"] == 7
    assert_frame_equal(pl.read_parquet(out / "predictions.parquet"), predictions)
    assert proj.lock()["eval"]["key"] == key and "eval" not in Project(root).status()


def test_a_new_test_subset_reruns_eval_alone(root):
    """Train and cf_dist read subset's train split (train its valid split too, as it validates here):
    another test subset leaves the trained model in place; another valid subset retrains it."""
    proj = Project(root, device="cpu")
    proj.run(["eval"], log=lambda msg: None)
    art = root / "artifacts"
    samples(9, 3, 300).write_parquet(art / "subset" / "test.parquet")
    lock_as_run(Project(root, ["subset.test=9"]), ["subset"])
    stale = Project(root, ["subset.test=9"]).status()
    assert stale == {"eval": ["dep changed: outputs of `subset/test.parquet`"]}
    samples(5, 4, 400).write_parquet(art / "subset" / "valid.parquet")
    lock_as_run(Project(root, ["subset.test=9", "subset.valid=5"]), ["subset"])
    stale = Project(root, ["subset.test=9", "subset.valid=5"]).status()
    assert list(stale) == ["train", "eval"] and stale["train"] == ["dep changed: outputs of `subset/valid.parquet`"]


def test_launched_runs_refuse_what_cannot_run_on_several_processes(root, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    proj = Project(root, device="cpu")
    with pytest.raises(TcaError, match="stage `eval` does not run on several processes.*stages that do: train"):
        proj.run(["eval"])
    with pytest.raises(TcaError, match="use `tca run-stage NAME` without --upstream"):
        proj.run(None)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(TcaError, match="RANK=2, WORLD_SIZE=2"):
        proj.run(["train"])


@pytest.mark.parametrize("n, unit, count", [(20, 5, 3), (7, 1, 3), (1000, 256, 4), (9, 1, 9)])
def test_shard_ranges_tile_the_rows_in_whole_blocks(n, unit, count):
    ranges = [StageContext("s", {}, Path(), Path(), shard=(i, count)).shard_range(n, unit) for i in range(count)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(hi == lo2 and lo < hi and lo % unit == 0 for (lo, hi), (lo2, _) in zip(ranges, ranges[1:] + [(n, 0)]))
    assert StageContext("s", {}, Path(), Path()).shard_range(n, unit) == (0, n)


def test_each_rank_draws_its_own_random_numbers():
    """Rank r seeds torch with tca.llm.ddp.rank_seed(train.seed, r): rank 0, as a single process, with the
    seed itself; dropout masks of different ranks differ."""
    from tca.llm.ddp import rank_seed

    assert rank_seed(42, 0) == 42 and len({rank_seed(s, r) for s in (0, 1, 42) for r in range(8)}) == 24
    masks = []
    for rank in range(3):
        torch.manual_seed(rank_seed(42, rank))
        masks.append(torch.nn.functional.dropout(torch.ones(256), 0.5))
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])


def test_a_killed_train_stage_resumes_from_its_resume_dir(root, base, monkeypatch, capsys):
    """Killed right after its step-1 checkpoint, the train stage leaves artifacts/.resume/train-<key>/
    and locks nothing; a run with other params does not touch it; a rerun with the same params and
    inputs resumes there at step 1, ends with the adapter and log of an uninterrupted run, and removes it."""
    from pipeline.stages import train as train_stage
    from tca.llm.train import Trainer

    quiet = lambda msg: None  # noqa: E731
    overrides = ["train.checkpoint_every=1"]  # when checkpoints happen, not what training computes
    lock_before = Project(root).lock()["train"]
    real_save = Trainer.save_checkpoint

    def killed_after_saving(self):
        real_save(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "save_checkpoint", killed_after_saving)
    with pytest.raises(KeyboardInterrupt):
        Project(root, overrides, device="cpu").run(["train"], force=True, log=quiet)
    monkeypatch.setattr(Trainer, "save_checkpoint", real_save)
    resume = root / "artifacts" / ".resume"
    (killed,) = resume.iterdir()
    ctx = StageContext("train", Project(root, overrides).params, root / "unused", root / "artifacts")
    assert killed == train_stage.resume_dir(ctx)
    assert torch.load(killed / "state.pt", weights_only=False)["state"]["step"] == 1
    assert Project(root).lock()["train"] == lock_before  # the killed run locked nothing

    other = StageContext("train", Project(root, [*overrides, "train.lr=0.001"]).params, root / "unused", root / "artifacts")
    assert train_stage.resume_dir(other) != killed  # other params: another dir
    subset = root / "artifacts" / "subset" / "train.parquet"
    os.utime(subset, ns=(subset.stat().st_atime_ns, subset.stat().st_mtime_ns + 10**9))
    assert train_stage.resume_dir(ctx) != killed  # a rewritten input: another dir
    os.utime(subset, ns=(subset.stat().st_atime_ns, subset.stat().st_mtime_ns - 10**9))
    assert train_stage.resume_dir(ctx) == killed

    capsys.readouterr()
    Project(root, [*overrides, "train.lr=0.001"], device="cpu").run(["train"], log=quiet)
    assert "resumed" not in capsys.readouterr().out and (killed / "state.pt").exists()
    Project(root, overrides, device="cpu").run(["train"], log=quiet)
    assert f"resumed from {killed / 'state.pt'} at step 1/2" in capsys.readouterr().out
    assert not any(resume.iterdir()) and not list((root / "artifacts" / ".tmp").glob("train-*"))

    one, two = base / "artifacts" / "train", root / "artifacts" / "train"
    ref, got = load_file(one / "adapter" / "adapter_model.safetensors"), load_file(two / "adapter" / "adapter_model.safetensors")
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-6)
    strip = lambda d: [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in (d / "log.jsonl").read_text().splitlines()]  # noqa: E731
    assert strip(two) == strip(one)
