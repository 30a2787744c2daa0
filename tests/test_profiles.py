"""RLMRec's profiles stage on a tiny random Llama: prompts from train items only, tables sized by id."""
import json
import shutil

import numpy as np
import polars as pl

from pipeline.context import StageContext
from pipeline.stages import profiles as stage
from tca.profiles import item_prompts, user_prompts


def train_frame():
    return pl.DataFrame({"user_id": [1, 1, 3], "history": [[1, 2, 3], [2, 3, 4], [5]], "item_id": [4, 5, 1], "timestamp": [1, 2, 3]},
                        schema_overrides={"history": pl.List(pl.Int32), "item_id": pl.Int32})


def test_user_histories_are_the_last_train_items():
    got = stage.user_histories(train_frame(), 3)
    assert got["user_id"].to_list() == [1, 3] and got["items"].to_list() == [[3, 4, 5], [5, 1]]


def test_prompts_name_the_titles():
    assert '"Fargo (1996)"' in item_prompts(["Fargo (1996)"], "movies")[0]
    assert '"A", "B"' in user_prompts([["A", "B"]], "movies")[0]


def test_stage_writes_profiles_and_tables(tiny_model_dir, tmp_path, capsys):
    root = tmp_path / "artifacts"
    (root / "data").mkdir(parents=True)
    pl.DataFrame({"item_id": np.arange(1, 6, dtype=np.int32), "title": [f"Movie {i}" for i in range(1, 6)]}).write_parquet(root / "data" / "items.parquet")
    train_frame().write_parquet(root / "data" / "train.parquet")
    shutil.copytree(tiny_model_dir, root / "model")
    params = {"profiles": {"max_new_tokens": 3, "batch_size": 4, "history": 2}, "prompt": {"domain": "movies"}, "cf": {"model": "rlmrec"}}
    out = tmp_path / "out"
    out.mkdir()
    stage.run(StageContext("profiles", params, out, root, "cpu"))
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert any(line.startswith("[profiles] generate: 100%") and "7/7" in line for line in bar)  # 5 items + 2 users
    items, users = np.load(out / "items.npy"), np.load(out / "users.npy")
    assert items.shape == (6, 32) and users.shape == (4, 32)
    assert not items[0].any() and not users[0].any() and not users[2].any()  # padding; user 2 has no train sample
    frame = pl.read_parquet(out / "profiles.parquet")
    from tca.profiles import load_generator
    from tca.text_embed import embed_texts
    model, tokenizer = load_generator(root / "model")
    expected = embed_texts(frame["text"].to_list(), model=model, tokenizer=tokenizer)
    np.testing.assert_allclose(np.concatenate([items[1:], users[[1, 3]]]), expected, atol=1e-5)
    assert frame["kind"].to_list() == ["item"] * 5 + ["user"] * 2 and frame["id"].to_list() == [1, 2, 3, 4, 5, 1, 3]
    assert json.loads((out / "meta.json").read_text())["users"] == 2
    assert "item profiles" in stage.inspect(out, params)
