"""The LLM's seeded random subsets of the splits (its own stage, so resizing never retrains the CF model)."""
from __future__ import annotations

import numpy as np
import polars as pl

from tca.data.config import SubsetConfig


def draw(split: pl.DataFrame, n: int, rng: np.random.Generator) -> pl.DataFrame:
    """`n` rows uniformly without replacement, in `sample_id` order; the whole split if n >= its size.
    A larger n keeps every row a smaller n chose (one permutation, cut), so growing a subset only adds."""
    keep = np.sort(rng.permutation(split.height)[:n])
    return split[keep].sort("sample_id")


def draw_all(splits: dict[str, pl.DataFrame], cfg: SubsetConfig) -> dict[str, pl.DataFrame]:
    """One subset per split, sized by `cfg.<split>`, each from its own stream of `cfg.seed`."""
    return {name: draw(frame, getattr(cfg, name), np.random.default_rng([cfg.seed, k]))
            for k, (name, frame) in enumerate(splits.items())}
