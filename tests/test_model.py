"""The `model` stage: GGUF conversion and its checks, local/hub bases linked as is."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from pipeline.context import StageContext
from pipeline.stages import model as model_stage
from tca.llm import base_model, gguf_convert
from tca.errors import TcaError


@pytest.fixture(scope="module")
def gguf_vocab() -> gguf_convert.GgufVocab:
    return gguf_convert.read_gguf_vocab(base_model.embedded_gguf())


def test_tokenizer_matches_gguf_vocab(tokenizer, gguf_vocab):
    assert gguf_vocab.pre == "smollm" and len(gguf_vocab.tokens) == 49152
    assert gguf_vocab.special == {"bos": 1, "eos": 2, "unk": 0, "pad": 2}
    gguf_convert.check_tokenizer(tokenizer, gguf_vocab)
    assert tokenizer.eos_token == "<|im_end|>"


def _rename_story(vocab: gguf_convert.GgufVocab) -> gguf_convert.GgufVocab:
    tokens = list(vocab.tokens)
    tokens[tokens.index("ĠStory")] = "ĠStorey"
    return replace(vocab, tokens=tokens)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (_rename_story, "disagrees with the file's vocabulary at 1 ids"),
        (lambda v: replace(v, tokens=v.tokens[:-1]), "has 49152 tokens, the file 49151"),
        (lambda v: replace(v, special={**v.special, "eos": 0}), "eos_token_id is 2, the file declares 0"),
    ],
)
def test_tokenizer_check_rejects_corrupted_vocab(tokenizer, gguf_vocab, corrupt, message):
    with pytest.raises(TcaError, match=message):
        gguf_convert.check_tokenizer(tokenizer, corrupt(gguf_vocab))


def test_gguf_tokenizer_runs_the_check(monkeypatch, gguf_vocab):
    monkeypatch.setattr(gguf_convert, "read_gguf_vocab", lambda gguf: _rename_story(gguf_vocab))
    with pytest.raises(TcaError, match="disagrees with the file's vocabulary"):
        gguf_convert.gguf_tokenizer(base_model.embedded_gguf())


@pytest.mark.parametrize(
    "text, pieces",
    [
        # real BPE pieces, digits one by one (SmolLM2 never merges digits)
        ("Toy Story (1995)", ["T", "oy", "ĠStory", "Ġ(", "1", "9", "9", "5", ")"]),
        ("Star Wars (1977)", ["Star", "ĠWars", "Ġ(", "1", "9", "7", "7", ")"]),
        # llama.cpp's `smollm` split isolates digits first, so the spaces before one stay a run;
        # transformers' GGUF reader alone would give x, Ġ, Ġ, 1
        ("x  1", ["x", "ĠĠ", "1"]),
        ("a\n\n2", ["a", "ĊĊ", "2"]),
    ],
)
def test_tokenization_follows_smollm_pre_tokenizer(tokenizer, text, pieces):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == pieces
    assert tokenizer.decode(ids) == text


def test_reload_check(tiny_llama, tiny_model_dir):
    with safe_open(tiny_model_dir / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied: stored once
    reloaded = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    gguf_convert.check_reload(tiny_llama(seed=0), tiny_model_dir)
    with pytest.raises(TcaError, match="reloads with logits different"):
        gguf_convert.check_reload(tiny_llama(seed=1), tiny_model_dir)


def test_probe_answer_rejects_a_random_model(tiny_llama, tokenizer):
    with pytest.raises(TcaError, match="Paris"):
        gguf_convert.check_probe_answer(tiny_llama(), tokenizer)


def _no_conversion(*args, **kwargs):
    raise AssertionError("a local base must not be converted")


def _local_base(tiny_model_dir: Path, tmp_path: Path) -> Path:
    src = tmp_path / "base"
    shutil.copytree(tiny_model_dir, src)
    (src / "pytorch_model.bin").write_bytes(b"redundant weights")
    (src / ".gitattributes").write_text("*.safetensors filter=lfs")
    (src / "onnx").mkdir()
    return src


def test_local_dir_is_linked_not_converted(monkeypatch, tiny_model_dir, tmp_path):
    monkeypatch.setattr(gguf_convert, "convert_gguf", _no_conversion)
    src = _local_base(tiny_model_dir, tmp_path)
    out = tmp_path / "out"
    base_model.materialize(str(src), out)
    expected = sorted(p.name for p in tiny_model_dir.iterdir())
    assert sorted(p.name for p in out.iterdir()) == expected
    assert all(os.path.samefile(out / name, src / name) for name in expected)
    assert model_stage.external_deps({"llm": {"base": str(src)}}) == [src / name for name in expected]


def test_local_dir_without_single_safetensors(tiny_model_dir, tmp_path):
    src = _local_base(tiny_model_dir, tmp_path)
    (src / "model.safetensors").rename(src / "model-00001-of-00002.safetensors")
    with pytest.raises(TcaError, match=r"lacks model.safetensors.*save_pretrained"):
        base_model.materialize(str(src), tmp_path / "out")


def _fake_hub_cache(root: Path, repo: str, files: list[Path]) -> Path:
    """The layout huggingface_hub leaves after a download: blobs, a snapshot of symlinks, refs/main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = root / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    (folder / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    for i, f in enumerate(files):
        shutil.copy(f, folder / "blobs" / f"blob{i}")
        (snapshot / f.name).symlink_to(Path("../../blobs") / f"blob{i}")
    return snapshot


def test_hub_id_is_linked_from_the_local_cache(monkeypatch, tiny_model_dir, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(gguf_convert, "convert_gguf", _no_conversion)
    snapshot = _fake_hub_cache(tmp_path / "hub", "org/tiny", sorted(tiny_model_dir.iterdir()))
    out = tmp_path / "out"
    base_model.materialize("org/tiny", out)
    for f in tiny_model_dir.iterdir():
        assert not (out / f.name).is_symlink()
        assert os.path.samefile(out / f.name, (snapshot / f.name).resolve())
    with pytest.raises(TcaError, match="hf download org/other"):
        base_model.materialize("org/other", tmp_path / "out2")
    assert model_stage.external_deps({"llm": {"base": "org/other"}}) == []


def test_embedded_conversion_end_to_end(tokenizer, tmp_path):
    """The default: the real GGUF converted by the stage (about 40 s), checked inside `run`."""
    params = {"llm": {"base": "embedded"}}
    ctx = StageContext(name="model", params=params, out=tmp_path / "out", artifacts=tmp_path)
    ctx.out.mkdir()
    model_stage.run(ctx)
    assert set(base_model.REQUIRED_FILES) <= {p.name for p in ctx.out.iterdir()}
    config = json.loads((ctx.out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == 49152
    assert config["tie_word_embeddings"]
    assert "quantization_config" not in config
    assert base_model.count_params(ctx.out) == 134_515_008
    with safe_open(ctx.out / "model.safetensors", framework="pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
    summary = model_stage.inspect(ctx.out, ctx.params)
    assert "134,515,008" in summary and "eos_token='<|im_end|>' (2)" in summary and "'é'" in summary
    written = json.loads((ctx.out / "tokenizer.json").read_text())
    assert written == json.loads(tokenizer.backend_tokenizer.to_str())
    assert model_stage.external_deps(ctx.params) == [base_model.embedded_gguf()]


def test_tiny_llama_is_seeded(tiny_llama, tokenizer):
    state = torch.get_rng_state()
    a, b, c = tiny_llama(seed=3), tiny_llama(seed=3), tiny_llama(seed=4)
    assert a.config.vocab_size == len(tokenizer) == 49152
    assert torch.equal(a.lm_head.weight, b.lm_head.weight) and not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert torch.equal(state, torch.get_rng_state())
    assert tiny_llama(num_hidden_layers=1).config.num_hidden_layers == 1
