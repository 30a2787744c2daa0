"""The `subset` stage: seeded, nested, sorted random subsets of each split."""
from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from pipeline.context import StageContext
from pipeline.stages import subset as subset_stage
from tca.data import SubsetConfig, draw, draw_all
from tca.errors import TcaError


def fake_split(n: int, start: int = 0) -> pl.DataFrame:
    ids = list(range(start, start + n))
    return pl.DataFrame({"sample_id": ids, "user_id": [i % 7 + 1 for i in ids],
                         "history": [[1, 2, i % 5 + 1] for i in ids], "item_id": [i % 5 + 1 for i in ids],
                         "timestamp": ids},
                        schema={"sample_id": pl.Int64, "user_id": pl.Int32, "history": pl.List(pl.Int32),
                                "item_id": pl.Int32, "timestamp": pl.Int64})


def test_draw_is_a_sorted_seeded_nested_sample():
    split = fake_split(1000)
    small = draw(split, 50, np.random.default_rng(3))
    big = draw(split, 200, np.random.default_rng(3))
    assert small.height == 50 and small["sample_id"].is_sorted() and small["sample_id"].n_unique() == 50
    assert set(small["sample_id"]) <= set(big["sample_id"])  # growing a subset only adds samples
    assert small.equals(draw(split, 50, np.random.default_rng(3)))
    assert not small.equals(draw(split, 50, np.random.default_rng(4)))
    assert small.equals(split.join(small.select("sample_id"), on="sample_id").sort("sample_id"))
    assert draw(split, 5000, np.random.default_rng(3)).equals(split)  # larger than the split: all of it


def test_draw_all_uses_a_stream_per_split():
    splits = {"train": fake_split(300), "valid": fake_split(300, 300), "test": fake_split(300, 600)}
    subsets = draw_all(splits, SubsetConfig(train=100, valid=30, test=30, seed=1))
    assert [s.height for s in subsets.values()] == [100, 30, 30]
    offsets = [(s["sample_id"] - k * 300).to_list() for k, s in enumerate(subsets.values())]
    assert offsets[1] != offsets[2]  # the same seed does not pick the same positions in each split


def test_bad_config():
    with pytest.raises(TcaError, match=r"subset\.valid must be a positive integer"):
        SubsetConfig(valid=0)


def test_subset_stage(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for k, name in enumerate(("train", "valid", "test")):
        fake_split(100 if name == "train" else 10, 1000 * k).write_parquet(data / f"{name}.parquet")
    pl.DataFrame({"item_id": pl.Series(range(1, 6), dtype=pl.Int32), "title": [f"Item {i}" for i in range(1, 6)]}
                 ).write_parquet(data / "items.parquet")
    out = tmp_path / "out"
    out.mkdir()
    params = {"subset": {"train": 40, "valid": 10, "test": 64, "seed": 0}}
    subset_stage.run(StageContext(name="subset", params=params, out=out, artifacts=tmp_path))
    assert [pl.read_parquet(out / f"{n}.parquet").height for n in ("train", "valid", "test")] == [40, 10, 10]
    logged = capsys.readouterr().out
    assert "test.parquet: 10 samples (the whole split: subset.test=64 >= its 10 samples)" in logged
    assert "40 samples of 100" in logged
    (tmp_path / "subset").symlink_to(out)
    text = subset_stage.inspect(tmp_path / "subset", params)
    assert "train.parquet: 40 rows" in text and "target: Item" in text
