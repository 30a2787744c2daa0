"""Stage `cf`: train the CF teacher on the whole train split; write model.pt and metrics.json."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from pipeline.context import StageContext
from pipeline.side_inputs import SIDE_INPUTS, check_computed
from tca.errors import TcaError

if TYPE_CHECKING:  # torch-backed: imported inside the functions so `tca status` stays fast
    from tca.cf.train import Samples


def read_splits(data: Path, max_len: int, train_fraction: float = 1.0, seed: int = 0) -> tuple[int, dict[str, Samples]]:
    """Number of items and the train/valid/test samples of the data artifact (train cut to
    `train_fraction` of its rows, whole users at a time)."""
    from tca.cf.subsample import user_fraction
    from tca.cf.train import Samples

    item_ids = pl.read_parquet(data / "items.parquet", columns=["item_id"])["item_id"]
    n_items = len(item_ids)
    if n_items == 0 or item_ids.min() != 1 or item_ids.max() != n_items:
        raise TcaError(f"{data / 'items.parquet'}: item_id must be exactly 1..N; rerun the data stage")
    splits = {}
    for split in ("train", "valid", "test"):
        path = data / f"{split}.parquet"
        try:
            frame = pl.read_parquet(path, columns=["history", "item_id", "user_id", "timestamp"])
            if split == "train":
                frame = user_fraction(frame, train_fraction, seed)
            splits[split] = Samples.from_frame(frame, max_len)
        except pl.exceptions.ColumnNotFoundError as e:
            raise TcaError(f"{path}: needs columns history and item_id ({e}); rerun the data stage") from e
    return n_items, splits


def read_side_inputs(ctx: StageContext, needs: tuple[str, ...]) -> dict:
    """The arrays a text-aware model asks for (AlphaRec: title embeddings; RLMRec: profile embeddings)."""
    import numpy as np

    out = {}
    for name in needs:
        if name not in SIDE_INPUTS:
            raise TcaError(f"cf.model={ctx.param('cf.model')} needs input {name!r}; the cf stage provides {', '.join(SIDE_INPUTS)}")
        stage, file = SIDE_INPUTS[name]
        path = ctx.input(stage) / file
        if not path.exists():
            raise TcaError(f"{path} is missing: run the `{stage}` stage first (tca run-stage {stage})")
        check_computed(ctx.input(stage), f"cf.model={ctx.param('cf.model')}")
        out[name] = np.load(path)
    return out


def check_params(params: dict) -> None:
    """The `cf:` section as CFConfig, and cf.model as a class that implements the CF interface
    (a module:Class plugin is imported here: see the README on trusting plugins)."""
    from tca.cf.base import CFConfig
    from tca.cf.registry import resolve

    resolve(CFConfig.from_params(params["cf"]).model)


def run(ctx: StageContext) -> None:
    from tca.cf.base import CFConfig
    from tca.cf.graph import GraphCF
    from tca.cf.registry import resolve, save_checkpoint
    from tca.cf.train import evaluate, evaluate_popularity, train_cf

    cfg = CFConfig.from_params(ctx.section("cf"))
    n_items, splits = read_splits(ctx.input("data"), cfg.max_len, cfg.train_fraction, cfg.seed)
    splits["test"].check(n_items, "test")
    inputs = read_side_inputs(ctx, resolve(cfg.model).needs)
    ctx.log(f"{cfg.model} ({cfg.loss}) on {len(splits['train'])} train samples, {n_items} items, device {ctx.device}")
    model, result = train_cf(cfg, n_items, splits["train"], splits["valid"], ctx.device, inputs)
    ctx.log(f"best valid ndcg@10 {result.best_valid['ndcg@10']:.4f} at epoch {result.best_epoch}/{result.epochs} ({result.seconds:.0f} s)")
    test = splits["test"].to(ctx.device)
    if isinstance(model, GraphCF):  # how many test samples take the history fallback
        ctx.log(f"test samples whose user is unseen in train (history fallback): {(~model.known(test.user)).float().mean().item():.1%}")
    metrics = {
        "test": evaluate(model, test),
        "valid": result.best_valid,
        "popularity": {"test": evaluate_popularity(splits["train"], test, n_items)},
    }
    save_checkpoint(model, ctx.out / "model.pt")
    (ctx.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    ctx.log(f"wrote model.pt, metrics.json (test ndcg@10 {metrics['test']['ndcg@10']:.4f}, popularity {metrics['popularity']['test']['ndcg@10']:.4f})")


def inspect(artifact_dir: Path, params: dict) -> str:
    """Metrics table (plus the LLM's test subset, scored here, when the subset stage has run), then
    one test sample: its history titles and the model's top-10 titles."""
    import torch

    from tca.cf.registry import load_checkpoint
    from tca.cf.train import Samples, evaluate, evaluate_popularity

    metrics = json.loads((artifact_dir / "metrics.json").read_text())
    rows = {"test": metrics["test"], "valid": metrics["valid"], "popularity (test)": metrics["popularity"]["test"]}
    model = load_checkpoint(artifact_dir / "model.pt", plugin=params["cf"]["model"])
    data = artifact_dir.parent / "data"
    subset = artifact_dir.parent / "subset" / "test.parquet"
    if subset.exists():  # (not in metrics.json: cf does not depend on subset, so resizing the subset never retrains it)
        samples = Samples.from_frame(pl.read_parquet(subset, columns=["history", "item_id", "user_id", "timestamp"]), model.cfg.max_len)
        _, splits = read_splits(data, model.cfg.max_len, model.cfg.train_fraction, model.cfg.seed)
        rows[f"LLM test ({len(samples)})"] = evaluate(model, samples)
        rows["popularity (LLM)"] = evaluate_popularity(splits["train"], samples, model.n_items)
    keys = list(metrics["test"])
    lines = [f"{'':<18}" + "".join(f"{k:>9}" for k in keys)]
    lines += [f"{name:<18}" + "".join(f"{m[k]:>9.4f}" for k in keys) for name, m in rows.items()]

    titles = pl.read_parquet(data / "items.parquet", columns=["item_id", "title"]).sort("item_id")["title"].to_list()
    sample = pl.read_parquet(data / "test.parquet").row(0, named=True)
    row = pl.DataFrame({"history": [sample["history"]], "item_id": [sample["item_id"]], "user_id": [sample["user_id"]]})
    history = Samples.from_frame(row, model.cfg.max_len)
    with torch.no_grad():
        top = model.score(history.history, history.user).topk(10).indices[0].tolist()
    lines += [
        "",
        f"model: {model.cfg.model} (loss {model.cfg.loss}, {model.n_items} items)",
        f"test sample {sample['sample_id']} (user {sample['user_id']}), history oldest first:",
        *(f"  {titles[i - 1]}" for i in sample["history"]),
        f"target: {titles[sample['item_id'] - 1]}",
        "CF top-10:",
        *(f"  {r + 1:>2}. {titles[i - 1]}{'  <- target' if i == sample['item_id'] else ''}" for r, i in enumerate(top)),
    ]
    return "\n".join(lines)
