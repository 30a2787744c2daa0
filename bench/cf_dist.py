"""cf_dist throughput: the batched CF scoring + Numba kernel + sharded Zarr writer of tca/collab*.py
against a reference-style implementation (per sample and position: dict trie lookup, torch softmax
over the candidates, scatter into a dense vocabulary-sized row, nonzero), in one run.

    python bench/cf_dist.py            # MovieLens-100k (real titles, real tokenizer) + synthetic Amazon-Toys-sized catalog
    python bench/cf_dist.py --quick    # fewer samples

Both sides use the same CF score rows (a randomly initialized SASRec: its weights do not change the
cost); ours get them in the trie's item order from one matmul, as the cf_dist stage does, the
reference by item id. The reference's numbers are checked against ours. "q_t alone" compares the distribution
computation; "end to end" charges both sides the same CF scoring, ours also the Zarr write. Rates
are given per wall-clock second and per CPU-second (all threads): on a shared, loaded machine the
second is the steadier measure of the work done.
"""
from __future__ import annotations

import os

from tca.openmp import configure_openmp  # noqa: E402

configure_openmp()  # before torch loads, as `tca` does

import argparse
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numba
import numpy as np
import polars as pl
import torch

from tca.cf import CFConfig, build, pad_histories
from tca.collab.tokenizer import CollabConfig, token_dist, trie_scorer
from tca.collab.store import DistReader, DistWriter
from tca.collab.trie import Trie, build_trie

BATCH = 256
READS, READ_BATCH = 50, 16  # random training batches read back
VOCAB = 49152
EOS = 2


def movielens(n_samples: int) -> tuple[pl.Series, pl.DataFrame]:
    from tca.llm import base_model, gguf_convert
    from tca.data import DataConfig, prepare
    from tca.collab.trie import target_ids

    data = prepare(DataConfig())
    tokenizer = gguf_convert.gguf_tokenizer(base_model.embedded_gguf())
    return target_ids(tokenizer, data.items["title"]), data.splits["train"].head(n_samples)


def toys(n_samples: int, n_items: int = 20_669, n_brands: int = 1_500, seed: int = 0) -> tuple[pl.Series, pl.DataFrame]:
    """Titles of 5-25 tokens (+ EOS) starting with one of n_brands 1-3 token brand names (Zipf-popular)."""
    rng = np.random.default_rng(seed)
    brands = [rng.integers(100, VOCAB, rng.integers(1, 4)).tolist() for _ in range(n_brands)]
    unique: set[tuple] = set()
    while len(unique) < n_items:
        brand = brands[min(int(rng.zipf(1.3)), n_brands) - 1]
        rest = rng.integers(100, VOCAB, max(int(rng.integers(5, 26)) - len(brand), 1)).tolist()
        unique.add(tuple(brand + rest + [EOS]))
    titles = sorted(unique)
    targets = pl.Series([titles[i] for i in rng.permutation(n_items)], dtype=pl.List(pl.Int32))  # item ids in random order
    popularity = 1 / np.arange(1, n_items + 1) ** 0.8
    draw = lambda size: rng.choice(n_items, size, p=popularity / popularity.sum()) + 1  # noqa: E731
    samples = pl.DataFrame({
        "sample_id": np.arange(n_samples),
        "history": pl.Series(draw((n_samples, 10)).tolist(), dtype=pl.List(pl.Int32)),
        "item_id": draw(n_samples).astype(np.int32),
    })  # fmt: skip
    return targets, samples


class Reference:
    """The straightforward implementation: a dict trie, one softmax and one dense scatter per position."""

    def __init__(self, targets: list[list[int]]):
        self.targets = targets
        self.root = {"children": {}, "items": [], "depth": 0}
        for item, seq in enumerate(targets, start=1):
            node = self.root
            node["items"].append(item)
            for depth, token in enumerate(seq, start=1):
                node = node["children"].setdefault(token, {"children": {}, "items": [], "depth": depth})
                node["items"].append(item)
        stack = [self.root]
        while stack:
            node = stack.pop()
            node["next"] = torch.tensor([targets[i - 1][node["depth"]] for i in node["items"]]) if node["children"] else None
            node["items"] = torch.tensor(node["items"])
            stack.extend(node["children"].values())

    def sample(self, scores: torch.Tensor, gold: int, cfg: CollabConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out, node = [], self.root
        for token in self.targets[gold - 1]:
            p = torch.softmax(scores[node["items"]].double() / cfg.temperature, dim=0)
            dense = torch.zeros(VOCAB, dtype=torch.float64).index_add_(0, node["next"], p)
            support = dense.nonzero().squeeze(1)
            probs = dense[support]
            if 0 < cfg.top_k < len(support):
                keep = probs.topk(cfg.top_k).indices
                if not (support[keep] == token).any():
                    keep[-1] = (support == token).nonzero()[0, 0]
                keep = keep.sort().values
                support, probs = support[keep], probs[keep] / probs[keep].sum()
            out.append((support, probs))
            node = node["children"][token]
        return out


class Clock:
    """Wall and CPU (all threads) seconds per phase: CPU time is what a loaded shared machine distorts least."""

    def __init__(self):
        self.wall, self.cpu = defaultdict(float), defaultdict(float)

    @contextmanager
    def __call__(self, phase: str):
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.wall[phase] += time.perf_counter() - wall
        self.cpu[phase] += time.process_time() - cpu


def run(name: str, samples: pl.DataFrame, n_ref: int, top_k: int, reference: Reference, trie: Trie, model) -> tuple[float, float]:
    """Ours on every sample, the reference on the first n_ref; prints the numbers; returns the q_t speedups (wall, CPU)."""
    cfg, n, clock = CollabConfig(top_k=top_k), samples.height, Clock()
    with tempfile.TemporaryDirectory() as tmp:
        writer = DistWriter(Path(tmp) / "dist.zarr", {"top_k": top_k})
        score = trie_scorer(model, trie)  # as the cf_dist stage: scores in trie order from one matmul
        for lo in range(0, n, BATCH):
            batch = samples.slice(lo, BATCH)
            history = pad_histories(batch["history"], model.cfg.max_len)
            with clock("cf"):
                scores = score(history)
            with clock("q"):
                dist = token_dist(trie, batch["item_id"].to_numpy(), scores, cfg, trie_order=True)
            with clock("write"):
                writer.append(batch["sample_id"].to_numpy(), dist)
            if lo == 0:  # the first batch is checked against the reference (which takes scores by item id) below
                with torch.no_grad():
                    first_scores, first_dist = model.score(history), dist
        with clock("write"):
            attrs = writer.close()
        disk = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
        reader, rng = DistReader(Path(tmp) / "dist.zarr"), np.random.default_rng(0)
        with clock("read"):
            for _ in range(READS):
                reader.read(rng.choice(reader.sample_id, READ_BATCH, replace=False))

    golds = samples["item_id"].to_list()[:n_ref]
    with clock("reference"):
        ref = [reference.sample(first_scores[b], golds[b], cfg) for b in range(n_ref)]
    err = 0.0
    for b in range(n_ref):  # the same support and probabilities, position by position
        for p, (support, probs) in zip(range(first_dist.sample_ptr[b], first_dist.sample_ptr[b + 1]), ref[b]):
            lo, hi = first_dist.pos_ptr[p], first_dist.pos_ptr[p + 1]
            assert first_dist.token[lo:hi].tolist() == support.tolist()
            err = max(err, float(np.abs(first_dist.prob[lo:hi] - probs.numpy()).max()))

    sec = {kind: {phase: t / (n_ref if phase == "reference" else n) for phase, t in getattr(clock, kind).items() if phase != "read"}
           for kind in ("wall", "cpu")}
    q = {kind: (1 / t["q"], 1 / t["reference"]) for kind, t in sec.items()}  # samples/s: ours, reference
    e2e = {kind: (1 / (t["cf"] + t["q"] + t["write"]), 1 / (t["cf"] + t["reference"])) for kind, t in sec.items()}
    share = {phase: sec["wall"][phase] / sum(sec["wall"][p] for p in ("cf", "q", "write")) for phase in ("cf", "q", "write")}
    print(f"{name}, top_k={top_k}: {n:,} samples, {attrs['nnz'] / n:,.0f} entries/sample, {disk / n:,.0f} B/sample on disk "
          f"({disk / 1e6:.1f} MB), mean mass dropped by top_k {attrs['dropped_mass_mean']:.3f}")
    print(f"  ours end to end: {e2e['wall'][0]:,.0f} samples/s ({e2e['cpu'][0]:,.0f} per CPU-second); time in CF scoring "
          f"{share['cf']:.0%}, q_t (Numba) {share['q']:.0%}, Zarr write {share['write']:.0%}")
    print(f"  q_t alone: ours {q['wall'][0]:,.0f} samples/s ({q['cpu'][0]:,.0f} per CPU-s), reference {q['wall'][1]:,.1f} "
          f"samples/s ({q['cpu'][1]:,.1f} per CPU-s) on {n_ref} samples, max |diff| {err:.1e}")
    speedup = (q["wall"][0] / q["wall"][1], q["cpu"][0] / q["cpu"][1])
    print(f"  reader: {clock.wall['read'] / READS * 1e3:.1f} ms per batch of {READ_BATCH} random samples (padded tensors)")
    print(f"  speedup: q_t {speedup[0]:,.0f}x wall, {speedup[1]:,.0f}x CPU; end to end (the reference charged the same CF "
          f"scoring, no write) {e2e['wall'][0] / e2e['wall'][1]:,.0f}x wall, {e2e['cpu'][0] / e2e['cpu'][1]:,.0f}x CPU")
    return speedup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n, n_ref = (1024, 20) if args.quick else (8192, 100)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; threads: torch {torch.get_num_threads()}, numba {numba.get_num_threads()} ({numba.threading_layer()} after the first kernel), "
          f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    ratios = {}
    for name, (targets, samples) in (("MovieLens-100k", movielens(n)), ("synthetic Toys (20,669 items)", toys(n))):
        trie = build_trie(np.arange(1, len(targets) + 1), targets)
        stats = trie.stats()
        print(f"\n{name}: {stats['items']:,} items, {stats['nodes']:,} trie nodes, root branching {stats['root_branching']:,}, "
              f"max depth {stats['max_depth']}")
        torch.manual_seed(0)
        model = build(CFConfig(), len(targets)).eval()
        token_dist(trie, samples["item_id"].to_numpy()[:2], torch.zeros(2, len(targets) + 1), CollabConfig())  # compile/load kernels
        reference = Reference(targets.to_list())
        for top_k in (0, 64):
            ratios[f"{name}, top_k={top_k}"] = run(name, samples, n_ref, top_k, reference, trie, model)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("q_t speedup over the reference (wall, CPU): " + "; ".join(f"{k}: {w:,.0f}x, {c:,.0f}x" for k, (w, c) in ratios.items()))


if __name__ == "__main__":
    main()
