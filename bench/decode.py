"""Decode throughput: our trie-constrained beam search (tca/llm/decode.py) against Hugging Face `generate`
with a Python prefix-allowed-tokens function walking a dict trie (the paper's code's approach), in
one run: same model, samples, batches and beams; the top-k lists are checked to be identical.

    python bench/decode.py                          # artifacts/ of this project (model, data, subset, trie)
    python bench/decode.py --artifacts DIR --samples 32 --batch 8

Prints samples/s of both, the ratio, and the share of each one's time spent outside the model's
forward (search bookkeeping, masks, cache reordering).
"""
from __future__ import annotations

from tca.openmp import configure_openmp

configure_openmp()  # before torch loads, as `tca` does

import argparse
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
import yaml

from pipeline.stages.eval import load_recommender
from tca.llm.decode import DeviceTrie, beam_search, ranked_items
from tca.llm.hf_decode import hf_beam_search


class ForwardClock:
    """Wall time spent inside the model's forward, via hooks on the top module."""

    def __init__(self, model):
        self.seconds, self._start = 0.0, 0.0
        model.register_forward_pre_hook(lambda *_: setattr(self, "_start", time.perf_counter()))
        model.register_forward_hook(lambda *_: setattr(self, "seconds", self.seconds + time.perf_counter() - self._start))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    ap.add_argument("--split", default="test")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--beams", type=int, default=10)
    ap.add_argument("--length-penalty", type=float, default=1.0)
    ap.add_argument("--precision", default="fp32", help="eval.precision of the model both decoders run (auto | bf16 | fp32)")
    args = ap.parse_args()

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "stages.yaml").read_text())["params"]
    params["eval"]["precision"] = args.precision
    model, builder, trie, _, _ = load_recommender(args.artifacts, params, "cpu")  # the default prompt, as stages.yaml has it
    targets = pl.read_parquet(args.artifacts / "trie" / "items.parquet")
    eos = int(targets["token_ids"][0][-1])
    samples = pl.read_parquet(args.artifacts / "subset" / f"{args.split}.parquet").head(args.samples)
    hist_len = samples["history"].list.len().to_numpy()
    lengths = builder.build(samples["history"].explode().to_numpy(), hist_len).lengths
    order = np.argsort(lengths, kind="stable")  # both decoders get the same length-sorted batches
    batches = [builder.build(samples["history"].gather(rows).explode().to_numpy(), hist_len[rows])
               for rows in np.array_split(order, -(-len(order) // args.batch))]
    dtrie = DeviceTrie(trie, "cpu")
    clock = ForwardClock(model)
    print(f"{len(samples)} {args.split} samples in {len(batches)} batches, {args.beams} beams, prompts of "
          f"{lengths.min()}-{lengths.max()} tokens, {trie.stats()['items']:,} items, {torch.get_num_threads()} threads")

    def ours(prompts):
        leaves, scores = beam_search(model, prompts, dtrie, args.beams, args.length_penalty)
        items, item_scores = ranked_items(trie, leaves.numpy(), scores.numpy(), args.beams)
        return [row[row > 0].tolist() for row in items], [s[np.isfinite(s)].tolist() for s in item_scores]

    def hf(prompts):
        return hf_beam_search(model, prompts, targets["token_ids"].to_list(), targets["item_id"].to_list(), eos,
                              args.beams, args.length_penalty)

    results = {}
    for name, decode in (("ours", ours), ("hf generate", hf)):
        decode(batches[0])  # warm-up
        clock.seconds, start, lists = 0.0, time.perf_counter(), ([], [])
        for prompts in batches:
            items, scores = decode(prompts)
            lists[0].extend(items), lists[1].extend(scores)
        seconds = time.perf_counter() - start
        results[name] = (seconds, clock.seconds, lists)
        print(f"{name:>12}: {len(samples) / seconds:7.3f} samples/s ({seconds:6.1f} s; "
              f"{1 - clock.seconds / seconds:5.1%} of it outside the model's forward)")

    (ours_s, _, (ours_items, ours_scores)), (hf_s, _, (hf_items, hf_scores)) = results["ours"], results["hf generate"]
    same = sum(a == b for a, b in zip(ours_items, hf_items))
    diff = max((float(np.max(np.abs(np.subtract(a, b)))) for a, b, x, y in zip(ours_scores, hf_scores, ours_items, hf_items) if x == y and a), default=0.0)
    print(f"identical top-{args.beams} lists: {same}/{len(samples)} (max score difference {diff:.2e})")
    print(f"speed-up: {hf_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
