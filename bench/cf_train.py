"""CF stage benchmark on MovieLens-100k (the data stage's default split), measured in one run.

- SASRec (cf defaults) trains to early stopping, once per `--seeds` value: test NDCG@10, epochs
  and wall time per seed vs the 3-minute goal (ratio); the last line is the spread over seeds.
- Time per epoch vs a straightforward reference loop (last position only, Python-loop
  negative sampler, as in SASRec's original code): ratio.
- Quality: valid/test HR@5/10, NDCG@5/10 of SASRec (ce, bce) and BERT4Rec; SASRec's test
  NDCG@10 vs the popularity baseline (goal >= 1.5x).

    python bench/cf_train.py [--data artifacts/data] [--runs sasrec:ce,sasrec:bce,bert4rec:ce] [--seeds 42,43] [--threads N]

Model selection uses valid only; test is reported, never used to choose.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tca.openmp import configure_openmp  # noqa: E402

configure_openmp()  # before torch loads, as `tca` does: the cf stage's epochs, timed as it runs them

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402

from pipeline.context import StageContext  # noqa: E402
from pipeline.stages.cf import read_splits  # noqa: E402
from tca.cf.base import CFConfig  # noqa: E402
from tca.cf.registry import build  # noqa: E402
from tca.cf.train import evaluate, evaluate_popularity, train_cf, train_epoch  # noqa: E402

GOAL_SECONDS = 180.0


def default_params() -> dict:
    return yaml.safe_load((ROOT / "stages.yaml").read_text())["params"]


def data_dir(arg: str | None, tmp: Path) -> Path:
    """--data, else artifacts/data, else run the data stage on its defaults into a temp dir."""
    if arg:
        return Path(arg)
    if (ROOT / "artifacts/data/train.parquet").exists():
        return ROOT / "artifacts/data"
    from pipeline.stages import data as data_stage

    out = tmp / "data"
    out.mkdir()
    data_stage.run(StageContext("data", default_params(), out, tmp))
    return out


def reference_epoch(model, opt, train, batch_size: int) -> float:
    """The straightforward loop: last position only, one negative per sample drawn by a Python
    loop that rejects items of the user's history (SASRec's original `random_neq`)."""
    model.train()
    order = torch.randperm(len(train)).tolist()
    start = time.perf_counter()
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        history, target = train.history[idx], train.target[idx]
        negatives = []
        for row in history.tolist():
            seen = set(row)
            neg = random.randint(1, model.n_items)
            while neg in seen:
                neg = random.randint(1, model.n_items)
            negatives.append(neg)
        users = model.encode_users(history)
        items = model.item_embeddings()
        pos = (users * items[target]).sum(-1)
        neg = (users * items[torch.tensor(negatives)]).sum(-1)
        loss = F.softplus(-pos).mean() + F.softplus(neg).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def epoch_ratio(cfg: CFConfig, n_items: int, train, epochs: int = 3) -> tuple[float, float]:
    """Seconds per epoch of the reference loop and of ours (SASRec, bce for both), best of `epochs`."""
    torch.manual_seed(cfg.seed)
    model = build(cfg, n_items)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    ref = min(reference_epoch(model, opt, train, cfg.batch_size) for _ in range(epochs))
    gen = torch.Generator().manual_seed(cfg.seed)
    ours = []
    for _ in range(epochs):
        start = time.perf_counter()
        train_epoch(model, opt, train, cfg.batch_size, gen)
        ours.append(time.perf_counter() - start)
    return ref, min(ours)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="a data artifact dir (items/train/valid/test.parquet)")
    ap.add_argument("--runs", default="sasrec:ce,sasrec:bce,bert4rec:ce", help="model:loss pairs; the first is timed against the goal")
    ap.add_argument("--seeds", default="42", help="cf.seed values; the first run is repeated for each")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = default_params()["cf"]

    with tempfile.TemporaryDirectory() as tmp:
        data = data_dir(args.data, Path(tmp))
        n_items, splits = read_splits(data, base["max_len"])
    train, valid, test = splits["train"], splits["valid"], splits["test"]
    print(f"data: {data}  items {n_items}  train/valid/test {len(train)}/{len(valid)}/{len(test)}  torch threads {torch.get_num_threads()}")

    pop = evaluate_popularity(train, test, n_items)
    rows = {"popularity": ({}, pop)}
    timed = []  # (run, seconds, test metrics) of the first run, per seed
    runs = args.runs.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    for run, seed in [(runs[0], s) for s in seeds] + [(r, seeds[0]) for r in runs[1:]]:
        model_name, loss = run.split(":")
        cfg = CFConfig.from_params({**base, "model": model_name, "loss": loss, "seed": seed})
        run = f"{run} s{seed}" if len(seeds) > 1 else run
        cpu0 = time.process_time()
        model, result = train_cf(cfg, n_items, train, valid)
        cpu = time.process_time() - cpu0
        rows[run] = (result.best_valid, evaluate(model, test))
        print(
            f"{run}: test ndcg@10 {rows[run][1]['ndcg@10']:.4f} (valid {result.best_valid['ndcg@10']:.4f}), "
            f"{result.epochs} epochs (best {result.best_epoch}), wall {result.seconds:.1f} s, "
            f"cpu {cpu:.1f} s, {result.seconds / result.epochs:.2f} s/epoch, load {os.getloadavg()[0]:.1f}", flush=True
        )
        if len(timed) < len(seeds):
            timed.append((run, result.seconds, rows[run][1]))

    keys = ["hr@5", "hr@10", "ndcg@5", "ndcg@10"]
    print("\n" + f"{'':<14}" + "".join(f"{'valid ' + k:>14}" for k in keys) + "".join(f"{'test ' + k:>13}" for k in keys))
    for name, (v, t) in rows.items():
        print(f"{name:<14}" + "".join(f"{v[k]:>14.4f}" if v else f"{'':>14}" for k in keys) + "".join(f"{t[k]:>13.4f}" for k in keys))

    print()
    for run, seconds, test_metrics in timed:
        print(f"{run} to early stopping: {seconds:.1f} s = {seconds / GOAL_SECONDS:.2f} x the 3-minute goal; "
              f"test ndcg@10 / popularity: {test_metrics['ndcg@10'] / pop['ndcg@10']:.2f} x (goal >= 1.5)")
    slowest = max(seconds for _, seconds, _ in timed)
    print(f"slowest of {len(timed)} seed(s): {slowest:.1f} s = {slowest / GOAL_SECONDS:.2f} x the 3-minute goal (<= 1 passes)")

    ref, ours = epoch_ratio(CFConfig.from_params({**base, "loss": "bce"}), n_items, train)
    print(f"epoch time (sasrec, bce, cf.objective {base['objective']}): reference loop {ref:.2f} s, ours {ours:.2f} s -> {ref / ours:.1f}x faster")
    ndcg = torch.tensor([m["ndcg@10"] for _, _, m in timed], dtype=torch.float64)
    print(f"{runs[0].split(':')[0]} test ndcg@10 over {len(timed)} seeds: min {ndcg.min():.4f}, mean {ndcg.mean():.4f}, max {ndcg.max():.4f}")


if __name__ == "__main__":
    main()
