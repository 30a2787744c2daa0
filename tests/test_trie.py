"""The CSR item trie against brute-force prefix sets, target ids with the real tokenizer, the trie stage."""
from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.context import StageContext
from pipeline.stages import trie as trie_stage
from tca.errors import TcaError
from tca.ragged import pad
from tca.collab.trie import Trie, build_trie, target_ids

EOS = 2

# random catalogs over a tiny alphabet: many shared prefixes, titles that are prefixes of others, duplicates
catalogs = st.lists(st.lists(st.integers(3, 6), max_size=5), min_size=1, max_size=30)


def make_trie(titles: list[list[int]], seed: int = 0) -> tuple[Trie, np.ndarray, list[tuple]]:
    seqs = [tuple(t) + (EOS,) for t in titles]
    item_ids = np.random.default_rng(seed).permutation(len(seqs)) * 3 + 1  # not 1..N, not in order
    return build_trie(item_ids, pl.Series(seqs, dtype=pl.List(pl.Int32))), item_ids, seqs


def padded(seqs: list[tuple]) -> np.ndarray:
    return pad(np.concatenate([np.array(s) for s in seqs]), np.array([len(s) for s in seqs]), fill=-1)


@settings(max_examples=150, deadline=None)
@given(catalogs, st.integers(0, 10))
def test_trie_matches_brute_force_prefixes(titles, seed):
    trie, item_ids, seqs = make_trie(titles, seed)
    prefixes = {s[:t] for s in seqs for t in range(len(s) + 1)}
    assert trie.n_nodes == len(prefixes)
    assert len(trie.child_token) == trie.n_nodes - 1
    assert sorted(seqs) == [seqs[list(item_ids).index(i)] for i in trie.item_order]

    paths = trie.paths(padded(seqs))
    node_of = {}
    for i, s in enumerate(seqs):
        for t in range(len(s) + 1):
            node = int(paths[i, t])
            assert node_of.setdefault(s[:t], node) == node  # one node per prefix
            under = {int(x) for x in trie.item_order[trie.node_lo[node] : trie.node_hi[node]]}
            assert under == {int(item_ids[j]) for j, o in enumerate(seqs) if o[:t] == s[:t]}
        leaf = int(paths[i, len(s)])
        assert trie.is_leaf(leaf)
        assert set(trie.leaf_items(leaf).tolist()) == {int(item_ids[j]) for j, o in enumerate(seqs) if o == s}
        assert (paths[i, len(s) + 1 :] == -1).all()
    assert len(set(node_of.values())) == len(node_of)

    for node in range(trie.n_nodes):  # children: tokens ascending, ranges partition the parent's
        c0, c1 = trie.child_ptr[node], trie.child_ptr[node + 1]
        if c1 == c0:
            continue
        kids = trie.child_node[c0:c1]
        assert (np.diff(trie.child_token[c0:c1]) > 0).all()
        assert trie.node_lo[kids[0]] == trie.node_lo[node] and trie.node_hi[kids[-1]] == trie.node_hi[node]
        assert (trie.node_hi[kids[:-1]] == trie.node_lo[kids[1:]]).all()


def test_known_trie_arrays_stats_and_lookups(tmp_path):
    trie, _, _ = make_trie([[5, 6], [5], [5, 6, 7], [3]])
    # sorted: [3,2] [5,2] [5,6,2] [5,6,7,2]; nodes breadth-first: root, 3, 5, 32, 52, 56, 562, 567, 5672
    assert trie.child_ptr.tolist() == [0, 2, 3, 5, 5, 5, 7, 7, 8, 8]
    assert trie.child_token.tolist() == [3, 5, 2, 2, 6, 2, 7, 2]
    assert trie.node_lo.tolist() == [0, 0, 1, 0, 1, 2, 2, 3, 3]
    assert trie.node_hi.tolist() == [4, 1, 4, 1, 2, 4, 3, 4, 4]
    assert trie.depths().tolist() == [0, 1, 1, 2, 2, 2, 3, 3, 4]
    assert trie.stats() == {"items": 4, "nodes": 9, "leaves": 4, "max_depth": 4, "root_branching": 2,
                            "items_per_leaf_mean": 1.0, "items_per_leaf_max": 1}  # fmt: skip
    assert trie.step(np.array([0, 0, 2, 5, -1]), np.array([5, 4, 6, 7, 5])).tolist() == [2, -1, 5, 7, -1]
    trie.save(tmp_path / "trie.npz")
    loaded = Trie.load(tmp_path / "trie.npz")
    assert loaded.digest() == trie.digest() != make_trie([[5, 6], [5], [5, 6, 8], [3]])[0].digest()


def test_ragged_helpers():
    from tca.ragged import concat_ranges, ragged_index

    row, col = ragged_index(np.array([2, 0, 3]))
    assert row.tolist() == [0, 0, 2, 2, 2] and col.tolist() == [0, 1, 0, 1, 2]
    assert concat_ranges(np.array([5, 9, 0]), np.array([2, 0, 3])).tolist() == [5, 6, 0, 1, 2]
    assert pad(np.array([1, 2, 3, 4, 5]), np.array([2, 0, 3]), fill=-1).tolist() == [[1, 2, -1], [-1, -1, -1], [3, 4, 5]]
    assert pad(np.array([7]), np.array([1]), fill=0, width=3).tolist() == [[7, 0, 0]]


def test_bad_catalogs_raise():
    with pytest.raises(TcaError, match="prefix"):  # a target that does not end with a unique EOS
        build_trie(np.array([1, 2]), pl.Series([[5, 6], [5, 6, 7]], dtype=pl.List(pl.Int32)))
    with pytest.raises(TcaError, match="unique item ids"):
        build_trie(np.array([1, 1]), pl.Series([[5, 2], [6, 2]], dtype=pl.List(pl.Int32)))


TITLES = ["Star Wars (1977)", "Star Wars", "Star Trek: The Motion Picture (1979)", "Toy Story (1995)", "Star Wars",
          "Amélie (Fabuleux destin d'Amélie Poulain, Le) (2001)", "Heat (1995)", "Heat"]  # fmt: skip


def test_target_ids_with_the_real_tokenizer(tokenizer):
    ids = target_ids(tokenizer, pl.Series(TITLES), "{title}")
    assert all(x[-1] == tokenizer.eos_token_id for x in ids.to_list())
    assert [tokenizer.decode(x[:-1]) for x in ids.to_list()] == TITLES
    assert ids.to_list()[0][:-1] == tokenizer("Star Wars (1977)", add_special_tokens=False)["input_ids"]
    templated = target_ids(tokenizer, pl.Series(["Heat"]), "Movie: {{{title}}}")
    assert tokenizer.decode(templated[0].to_list()[:-1]) == "Movie: {Heat}"

    item_ids = np.arange(1, len(TITLES) + 1)
    trie = build_trie(item_ids, ids)
    leaves = trie.paths(pad(ids.explode().to_numpy(), ids.list.len().to_numpy(), fill=-1))
    leaf = leaves[np.arange(len(TITLES)), ids.list.len().to_numpy()]
    for i, title in enumerate(TITLES):  # prefix titles ("Star Wars", "Heat") reachable; duplicates share a leaf
        assert trie.is_leaf(leaf[i])
        assert set(trie.leaf_items(leaf[i]).tolist()) == {int(j) for j, t in zip(item_ids, TITLES) if t == title}


@pytest.mark.parametrize("template", ["{name}", "no field", "{title}{title}", "{0}"])
def test_bad_template_names_the_param(tokenizer, template):
    with pytest.raises(TcaError, match="prompt.target_template"):
        target_ids(tokenizer, pl.Series(["Heat"]), template)


def test_title_containing_eos_is_refused(tokenizer):
    with pytest.raises(TcaError, match="EOS"):
        target_ids(tokenizer, pl.Series(["Heat", f"Heat{tokenizer.eos_token}"]))


def test_trie_stage_run_and_inspect(tmp_path, tiny_model_dir, tokenizer):
    artifacts = tmp_path / "artifacts"
    (artifacts / "data").mkdir(parents=True)
    (artifacts / "model").symlink_to(tiny_model_dir)
    items = pl.DataFrame({"item_id": pl.Series(range(1, len(TITLES) + 1), dtype=pl.Int32), "title": TITLES})
    items.write_parquet(artifacts / "data" / "items.parquet")
    params = {"prompt": {"domain": "movies", "target_template": "{title}"}, "train": {"backbone": "tallrec"}}
    ctx = StageContext(name="trie", params=params, out=tmp_path / "out", artifacts=artifacts)
    ctx.out.mkdir()
    trie_stage.run(ctx)

    written = pl.read_parquet(ctx.out / "items.parquet")
    assert written["item_id"].to_list() == items["item_id"].to_list()
    assert written["token_ids"].to_list() == target_ids(tokenizer, items["title"]).to_list()
    trie = Trie.load(ctx.out / "trie.npz")
    assert trie.digest() == build_trie(items["item_id"].to_numpy(), written["token_ids"]).digest()

    (artifacts / "trie").symlink_to(ctx.out)
    text = trie_stage.inspect(artifacts / "trie", params)
    assert f"nodes: {trie.n_nodes:,}" in text and "'Star' 4, 'Heat' 2" in text
    assert "item 8 (2 ids): 'Heat' | '<|im_end|>'" in text  # the shortest target, decoded
