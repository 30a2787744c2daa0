"""text_emb and profiles compute only when cf.model reads them: otherwise the runner gets an
instant stand-in that loads no LLM and is the same for every llm.base, so the default CF model
is never retrained for a base-model change; a model that reads a stand-in is refused."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers
import yaml

import tca.profiles
import tca.text_embed
from pipeline.context import StageContext
from pipeline.runner import Project
from pipeline.side_inputs import cf_reads, write_stand_in
from pipeline.stages import cf as cf_stage
from pipeline.stages import profiles as profiles_stage
from pipeline.stages import text_emb
from tca.cf.sasrec import SASRec
from tca.errors import TcaError

REPO = Path(__file__).resolve().parents[1]
STAGES = ["data", "model", "text_emb", "profiles", "cf"]
SMALL = ["data.min_item_interactions=1", "data.min_user_interactions=1", "data.min_history=1", "data.history_len=3",
         "cf.max_epochs=1", "cf.hidden=8"]


class TitleReader(SASRec):
    """A `module:Class` plugin that asks for the title embeddings."""

    needs = ("text_emb",)


def params(model: str, backbone: str = "tallrec") -> dict:
    return {"cf": {"model": model}, "train": {"backbone": backbone}}


def test_needed_follows_the_cf_class_needs_including_plugins():
    assert not text_emb.needed(params("sasrec")) and not cf_reads(params("sasrec"), "profiles")
    assert text_emb.needed(params("alpharec")) and not cf_reads(params("alpharec"), "profiles")
    assert cf_reads(params("rlmrec"), "profiles") and not text_emb.needed(params("rlmrec"))
    assert text_emb.needed(params(f"{__name__}:TitleReader"))
    assert text_emb.needed(params("sasrec", "tiger")) and text_emb.needed(params("sasrec", "letter"))  # the sid stage reads them


def make_project(tmp_path: Path, monkeypatch) -> tuple[Path, list[str]]:
    """The real data -> model -> text_emb/profiles -> cf stages, and the overrides that point
    them at a tiny RecBole dataset and keep the CF training to a second."""
    root = tmp_path / "proj"
    root.mkdir()
    for code in ("pipeline", "tca"):
        (root / code).symlink_to(REPO / code)
    real = yaml.safe_load((REPO / "stages.yaml").read_text())
    doc = {"stages": {name: real["stages"][name] for name in STAGES}, "params": real["params"]}
    (root / "stages.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    data = tmp_path / "toy"
    data.mkdir()
    inter = [f"{u}\t{(u + k) % 12}\t5\t{100 * k + u}" for u in range(20) for k in range(8)]
    (data / "toy.inter").write_text("\n".join(["user_id:token\titem_id:token\trating:float\ttimestamp:float", *inter]) + "\n")
    (data / "toy.item").write_text("\n".join(["item_id:token\ttitle:token_seq", *(f"{i}\tThing {i}" for i in range(12))]) + "\n")
    monkeypatch.setattr(sys, "path", list(sys.path))  # Project puts its root first; undone after the test
    return root, [*SMALL, f"data.source=recbole:{data}"]


def forbid_llm(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a stand-in must not load or run an LLM")

    for owner, name in ((tca.text_embed, "embed_texts"), (tca.profiles, "load_generator"), (tca.profiles, "generate"),
                        (transformers.AutoTokenizer, "from_pretrained"), (transformers.AutoModel, "from_pretrained"),
                        (transformers.AutoModelForCausalLM, "from_pretrained")):
        monkeypatch.setattr(owner, name, refuse)


@pytest.fixture
def second_model_dir(tiny_llama, tokenizer, tmp_path) -> Path:
    out = tmp_path / "other-model"
    tiny_llama(seed=1).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_default_cf_model_gets_stand_ins_and_llm_base_changes_do_not_retrain_cf(tiny_model_dir, second_model_dir, tmp_path, monkeypatch):
    root, small = make_project(tmp_path, monkeypatch)
    forbid_llm(monkeypatch)
    assert Project(root, [*small, f"llm.base={tiny_model_dir}"]).run(["cf"], upstream=True, log=lambda _: None) == STAGES
    for stage, what, tables in (("text_emb", "title embeddings", ["items.npy"]), ("profiles", "profiles", ["users.npy", "items.npy"])):
        meta = json.loads((root / "artifacts" / stage / "meta.json").read_text())
        assert meta == {"needed": False, "reason": f"cf.model=sasrec reads no {what}"}
        for table in tables:
            got = np.load(root / "artifacts" / stage / table)
            assert got.dtype == np.float32 and got.shape == (0, 0)
    assert "stand-in" in profiles_stage.inspect(root / "artifacts" / "profiles", {})
    before = Project(root).lock()

    lines = []
    ran = Project(root, [*small, f"llm.base={second_model_dir}"]).run(["cf"], upstream=True, log=lines.append)
    assert ran == ["model", "text_emb", "profiles"] and "cf: up to date" in lines
    after = Project(root).lock()
    assert after["model"]["outs"] != before["model"]["outs"]
    assert after["cf"] == before["cf"]
    assert all(after[s]["outs"] == before[s]["outs"] for s in ("text_emb", "profiles"))


def test_cf_refuses_a_stand_in_it_reads(tmp_path):
    (tmp_path / "text_emb").mkdir()
    write_stand_in(tmp_path / "text_emb", "cf.model=sasrec reads no title embeddings", ("items.npy",))
    ctx = StageContext("cf", params("alpharec"), tmp_path / "out", tmp_path)
    with pytest.raises(TcaError, match=r"text_emb is a stand-in \(cf.model=sasrec reads no title embeddings\), but cf.model=alpharec "
                                       r"reads it; .*`tca run-stage text_emb --force --downstream`"):
        cf_stage.read_side_inputs(ctx, ("text_emb",))
