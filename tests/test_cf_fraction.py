"""`cf.train_fraction`: the CF teacher trains on a seeded random set of whole users holding that
share of the train split (the paper's Table 6)."""
import numpy as np
import polars as pl
import pytest

from pipeline.stages.cf import read_splits
from tca.cf.base import CFConfig
from tca.cf.subsample import user_fraction
from tca.errors import TcaError

HIST = 3


def frame(n_users=60, seed=0) -> pl.DataFrame:
    """Users with 1..20 samples each, rows interleaved in time as a split is."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 21, n_users)
    user = np.repeat(np.arange(1, n_users + 1), lengths)
    order = rng.permutation(len(user))
    user = user[order]
    return pl.DataFrame({
        "sample_id": np.arange(len(user)),
        "user_id": user.astype(np.int32),
        "history": [rng.integers(1, 30, HIST).tolist() for _ in user],
        "item_id": rng.integers(1, 30, len(user)).astype(np.int32),
        "timestamp": np.arange(len(user)) * 10,
    }, schema_overrides={"history": pl.List(pl.Int32)})


def test_whole_users_about_the_fraction_nested_and_seeded():
    df = frame()
    per_user = df.group_by("user_id").len()
    longest = per_user["len"].max()
    kept = {}
    for fraction in (0.1, 0.5, 0.9):
        sub = user_fraction(df, fraction, seed=7)
        assert fraction * df.height <= sub.height < fraction * df.height + longest
        users = set(sub["user_id"].to_list())
        full = per_user.filter(pl.col("user_id").is_in(list(users)))["len"].sum()
        assert full == sub.height  # every kept user keeps all its rows
        assert sub["sample_id"].to_list() == sorted(sub["sample_id"].to_list())  # row order kept
        kept[fraction] = users
    assert kept[0.1] <= kept[0.5] <= kept[0.9]  # a larger fraction keeps a superset
    assert user_fraction(df, 0.5, seed=7).equals(user_fraction(df, 0.5, seed=7))
    assert set(user_fraction(df, 0.5, seed=8)["user_id"].to_list()) != kept[0.5]
    assert user_fraction(df, 1.0, seed=7) is df


def test_cf_stage_reads_only_the_fraction_of_train(tmp_path):
    df = frame()
    data = tmp_path / "data"
    data.mkdir()
    pl.DataFrame({"item_id": np.arange(1, 30, dtype=np.int32), "title": [f"t{i}" for i in range(1, 30)]}).write_parquet(data / "items.parquet")
    for split in ("train", "valid", "test"):
        df.write_parquet(data / f"{split}.parquet")
    _, full = read_splits(data, HIST)
    _, half = read_splits(data, HIST, 0.5, seed=3)
    assert len(full["train"]) == df.height
    assert len(half["train"]) == user_fraction(df, 0.5, 3).height < df.height
    assert len(half["valid"]) == len(half["test"]) == df.height  # only train is cut


@pytest.mark.parametrize("fraction", [0.0, 1.5, -0.1])
def test_train_fraction_must_be_a_share(fraction):
    with pytest.raises(TcaError, match="cf.train_fraction"):
        CFConfig.from_params({"train_fraction": fraction})
    assert CFConfig.from_params({"train_fraction": 0.1}).train_fraction == 0.1
