"""Training a CF teacher on part of the train split (the paper's Table 6: 10%, 50%, 100%)."""
from __future__ import annotations

import numpy as np
import polars as pl


def user_fraction(frame: pl.DataFrame, fraction: float, seed: int) -> pl.DataFrame:
    """The rows of a seeded random set of whole users holding `fraction` of the rows (the last
    user taken may overshoot by its own rows).

    Whole users, not random rows: a kept user's samples stay consecutive, so an epoch's windows
    (`Samples.windows`) still make each of their interactions a label once. Users are taken in
    one seeded random order, so with the same seed a larger fraction keeps a superset.
    """
    if fraction >= 1:
        return frame
    users = frame.group_by("user_id").len().sort("user_id")
    users = users[np.random.default_rng(seed).permutation(users.height)]
    rows_before = users["len"].cum_sum() - users["len"]
    kept = users.filter(rows_before < fraction * frame.height)["user_id"]
    return frame.filter(pl.col("user_id").is_in(kept.implode()))
