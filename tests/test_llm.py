"""Model inputs (prompt + target ids), history truncation, the target-only LM head, and model loading."""
import numpy as np
import polars as pl
import pytest
import torch

from tca.errors import TcaError
from tca.llm.model import ItemTargets, LoraSettings, encode, head_logits, load_model, target_hidden
from tca.llm.prompt import PromptBuilder
from tca.collab.trie import target_ids

TITLES = ["", "Toy Story (1995)", "Fargo (1996)", "Amélie (2001)", 'Léon: "The Professional" (1994)', "Heat (1995)"]
HISTORIES = [[1, 2, 3], [4], [5, 5, 1, 4, 3, 2], [2, 3]]
ITEMS = np.array([4, 1, 2, 5])
PAD = 2  # SmolLM2's pad id is its EOS: targets end with it, so nothing may be masked by pad id


@pytest.fixture(scope="module")
def world(tokenizer):
    builder = PromptBuilder(tokenizer, TITLES)
    targets = target_ids(tokenizer, pl.Series(TITLES[1:]))
    return builder, ItemTargets(np.arange(1, len(TITLES)), targets), targets


def prompt_reference(builder, history):
    return builder.build(np.array(history, dtype=np.int64), np.array([len(history)])).ids.tolist()


def test_encode_joins_prompt_and_target_ids(world):
    builder, table, targets = world
    inputs = encode(builder, table, pl.Series(HISTORIES), ITEMS, max_len=512, pad_id=PAD)
    width = inputs.input_ids.shape[1]
    expected = [prompt_reference(builder, h) + targets[int(i) - 1].to_list() for h, i in zip(HISTORIES, ITEMS)]
    assert width == max(len(e) for e in expected)
    for b, seq in enumerate(expected):
        assert inputs.input_ids[b, : len(seq)].tolist() == seq
        assert (inputs.input_ids[b, len(seq) :] == PAD).all()
        assert inputs.attention_mask[b].tolist() == [1] * len(seq) + [0] * (width - len(seq))
    assert inputs.target.tolist() == [t for i in ITEMS for t in targets[int(i) - 1].to_list()]
    assert inputs.target_len.tolist() == [len(targets[int(i) - 1]) for i in ITEMS]
    # the hidden state at target_pos predicts the next id, which is the target, within its own row
    assert torch.equal(inputs.input_ids.flatten()[inputs.target_pos + 1], inputs.target)
    rows = inputs.target_pos // width
    assert rows.tolist() == np.repeat(np.arange(len(ITEMS)), inputs.target_len).tolist()
    assert inputs.n_tokens == sum(len(e) for e in expected)


def test_long_prompts_keep_their_newest_history(world):
    builder, table, targets = world
    full = encode(builder, table, pl.Series(HISTORIES), ITEMS, max_len=512, pad_id=PAD)
    lengths = full.attention_mask.sum(1).numpy()
    for max_len in (int(lengths.min()) - 3, int(np.median(lengths)), int(lengths.max()) - 1):
        inputs = encode(builder, table, pl.Series(HISTORIES), ITEMS, max_len=max_len, pad_id=PAD)
        for b, (h, item) in enumerate(zip(HISTORIES, ITEMS)):
            target = targets[int(item) - 1].to_list()
            keep = list(h)  # brute force: drop the oldest item until the sequence fits
            while len(prompt_reference(builder, keep)) + len(target) > max_len:
                keep = keep[1:]
            seq = prompt_reference(builder, keep) + target
            assert inputs.input_ids[b, : len(seq)].tolist() == seq
            assert int(inputs.attention_mask[b].sum()) == len(seq) <= max_len
    with pytest.raises(TcaError, match="train.max_len"):
        encode(builder, table, pl.Series(HISTORIES), ITEMS, max_len=20, pad_id=PAD)


def test_unknown_target_item(world):
    _, table, _ = world
    with pytest.raises(TcaError, match="item 9"):
        table.get(np.array([1, 9]))


def test_target_only_head_equals_full_logits(world, tiny_llama):
    builder, table, _ = world
    model = tiny_llama(seed=1)
    inputs = encode(builder, table, pl.Series(HISTORIES), ITEMS, max_len=512, pad_id=PAD)
    with torch.no_grad():
        full = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).logits.flatten(0, 1)[inputs.target_pos]
        hidden = target_hidden(model, inputs)
        torch.testing.assert_close(head_logits(model, hidden), full, rtol=1e-5, atol=1e-5)
        columns = torch.tensor([2, 17, 4000, 49151])
        torch.testing.assert_close(head_logits(model, hidden, columns), full[:, columns], rtol=1e-5, atol=1e-5)


def test_load_model_with_fresh_and_saved_lora(tiny_model_dir, tmp_path, world):
    builder, table, _ = world
    inputs = encode(builder, table, pl.Series(HISTORIES), ITEMS, max_len=512, pad_id=PAD)
    torch.manual_seed(0)
    model = load_model(tiny_model_dir, lora=LoraSettings(r=4, target_modules=("q_proj", "v_proj")))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ("q_proj" in n or "v_proj" in n) for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # a fresh LoRA is a no-op (B = 0): make it change the outputs
        want = head_logits(model, target_hidden(model, inputs))
    model.save_pretrained(tmp_path / "adapter")
    for merge in (False, True):
        loaded = load_model(tiny_model_dir, adapter_dir=tmp_path / "adapter", merge=merge)
        assert not any(p.requires_grad for p in loaded.parameters())
        with torch.no_grad():
            torch.testing.assert_close(head_logits(loaded, target_hidden(loaded, inputs)), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(TcaError, match="lora.target_modules"):
        load_model(tiny_model_dir, lora=LoraSettings(target_modules=("no_such_proj",)))
    with pytest.raises(TcaError, match="lora.rank"):
        LoraSettings.from_params({"rank": 8})


def test_attention_implementation_and_dtype(tiny_model_dir, monkeypatch):
    """`llm.attn_implementation` reaches the model, which loads in the asked dtype; flash-attention is
    refused with what to do where it cannot run."""
    import importlib.util

    model = load_model(tiny_model_dir, bf16=True, attention="eager")
    assert model.config._attn_implementation == "eager" and {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(TcaError, match="llm.attn_implementation: 'flash' is not one of sdpa, eager, flash_attention_2"):
        load_model(tiny_model_dir, attention="flash")
    real_find_spec = importlib.util.find_spec
    for installed, message in ((False, "needs the flash-attn package"), (True, "runs on a GPU in bf16 only")):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name: installed or None if name == "flash_attn" else real_find_spec(name))
        with pytest.raises(TcaError, match=message):
            load_model(tiny_model_dir, bf16=True, attention="flash_attention_2")
