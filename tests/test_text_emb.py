"""Title embeddings: the pooled vector equals a hand-computed one, batching and padding change
nothing, and the `text_emb` stage writes an [N+1, d] table with a zero padding row."""
import json
import shutil

import numpy as np
import polars as pl
import pytest
import torch
from transformers import AutoModel

from pipeline.context import StageContext
from pipeline.stages import text_emb as stage
from tca.errors import TcaError
from tca.text_embed import embed_texts

TITLES = ["Toy Story (1995)", "Fargo (1996)", "Star Wars (1977)", "A", "Amélie (Fabuleux destin d'Amélie Poulain, Le) (2001)", "Toy Story (1995)"]


def test_vectors_are_unit_mean_pooled_states_and_batching_changes_nothing(tiny_model_dir, tokenizer):
    got = embed_texts(TITLES, tiny_model_dir, batch_size=4)
    assert got.dtype == np.float32 and got.shape == (len(TITLES), 32)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(embed_texts(TITLES, tiny_model_dir, batch_size=1), got, atol=1e-5)
    np.testing.assert_allclose(got[0], got[5], atol=1e-6)  # the same title, the same vector
    model = AutoModel.from_pretrained(tiny_model_dir).eval()
    ids = torch.tensor([tokenizer(TITLES[4], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state[0].mean(0)
    np.testing.assert_allclose(got[4], (ref / ref.norm()).numpy(), atol=1e-5)
    assert not np.allclose(got[1], got[2], atol=1e-3)  # different titles, different vectors


def test_empty_text_gets_a_zero_vector(tiny_model_dir):
    got = embed_texts(["", "Fargo (1996)"], tiny_model_dir)
    assert not got[0].any() and np.isclose(np.linalg.norm(got[1]), 1.0)


def write_artifacts(root, model_dir, titles, ids=None):
    (root / "data").mkdir(parents=True)
    ids = np.arange(1, len(titles) + 1, dtype=np.int32) if ids is None else ids
    pl.DataFrame({"item_id": ids, "title": titles}).write_parquet(root / "data" / "items.parquet")
    shutil.copytree(model_dir, root / "model")


def test_stage_writes_a_padded_table_and_inspects(tiny_model_dir, tmp_path):
    root = tmp_path / "artifacts"
    write_artifacts(root, tiny_model_dir, TITLES[:5])
    params = {"text_emb": {"batch_size": 2}, "cf": {"model": "alpharec"}}  # a reader: computed
    out = root / "text_emb"
    out.mkdir()
    stage.run(StageContext("text_emb", params, out, root, "cpu"))
    table = np.load(out / "items.npy")
    assert table.shape == (6, 32) and table.dtype == np.float32
    assert not table[0].any()
    np.testing.assert_allclose(table[1:], embed_texts(TITLES[:5], tiny_model_dir), atol=1e-5)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["n_items"] == 5 and meta["dim"] == 32
    again = root / "again"   # a rerun (e.g. for another reader) writes the same bytes: nothing below it reruns
    again.mkdir()
    stage.run(StageContext("text_emb", params, again, root, "cpu"))
    assert all((out / name).read_bytes() == (again / name).read_bytes() for name in ("items.npy", "meta.json"))
    text = stage.inspect(out, params)
    assert "6 x 32" in text and "Toy Story (1995)  ->  " in text


def test_stage_rejects_item_ids_that_are_not_1_to_n(tiny_model_dir, tmp_path):
    root = tmp_path / "artifacts"
    write_artifacts(root, tiny_model_dir, ["a", "b"], ids=np.array([2, 3], dtype=np.int32))
    with pytest.raises(TcaError, match="item_id must be exactly 1..N"):
        stage.run(StageContext("text_emb", {"text_emb": {"batch_size": 2}, "cf": {"model": "alpharec"}}, tmp_path / "out", root, "cpu"))
