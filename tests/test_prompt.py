"""Prompts assembled from pieces equal the reference built sample by sample."""
import numpy as np
import pytest

from tca.errors import TcaError
from tca.llm.prompt import PromptBuilder, PromptConfig, bos_ids, pad_id

TITLES = ["<pad>", "Toy Story (1995)", "Fargo (1996)", "Amélie (2001)", 'Léon: "The Professional" (1994)']


def reference(tokenizer, history, cfg=PromptConfig()):
    """Token ids of each piece, concatenated one sample at a time."""
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
    ids = enc(cfg.instruction.format(domain=cfg.domain) + cfg.before_history.format(domain=cfg.domain))
    ends = []
    for j, item in enumerate(history):
        if j:
            ids += enc(", ")
        ids += enc(f'"{TITLES[item]}"')
        ends.append(len(ids))
    return ids + enc(cfg.after_history.format(domain=cfg.domain)), ends


AUTHORS = PromptConfig(  # the wording of params/paper.yaml (the authors' code)
    domain="games", instruction="###Instruction:\nGiven the user interaction history, please recommendate the {domain} that user is most likely to view.",
    before_history="\n\n###Input:\nUser Interaction Histories: ", after_history=".\n\nThen the movie that user is most likely to watch is:\n###Response:")


@pytest.mark.parametrize("cfg", [PromptConfig(), PromptConfig(domain="toys", instruction="Pick {domain}."), AUTHORS])
def test_build_matches_reference(tokenizer, cfg):
    histories = [[1, 2, 3], [4], [], [2, 2, 1, 4, 3]]
    builder = PromptBuilder(tokenizer, TITLES, cfg)
    lengths = np.array([len(h) for h in histories])
    prompts = builder.build(np.concatenate([np.array(h, dtype=np.int64) for h in histories]), lengths)
    expected = [reference(tokenizer, h, cfg) for h in histories]
    assert [r.tolist() for r in prompts.rows()] == [ids for ids, _ in expected]
    assert prompts.item_end.tolist() == [e for _, ends in expected for e in ends]
    text = tokenizer.decode(prompts.rows()[0])
    history = '"Toy Story (1995)", "Fargo (1996)", "Amélie (2001)"'
    assert text == (cfg.instruction + cfg.before_history).format(domain=cfg.domain) + history + cfg.after_history.format(domain=cfg.domain)


def test_bad_ids_and_templates(tokenizer):
    with pytest.raises(TcaError, match="1..4"):
        PromptBuilder(tokenizer, TITLES).build(np.array([5]), np.array([1]))
    with pytest.raises(TcaError, match="prompt.instruction"):
        PromptBuilder(tokenizer, TITLES, PromptConfig(instruction="{user}"))
    with pytest.raises(TcaError, match="prompt.after_history"):
        PromptBuilder(tokenizer, TITLES, PromptConfig(after_history="{domain"))


def test_bos_where_the_tokenizer_adds_it_and_pad_falls_back_to_eos(tokenizer, llama3_like_dir):
    """A Llama-3-like tokenizer (no pad token, BOS before every text) gets BOS first in every prompt and
    EOS as its filler id; SmolLM2's declares <|im_start|> as BOS but never adds it, so its prompts have none."""
    from transformers import AutoTokenizer

    llama3 = AutoTokenizer.from_pretrained(llama3_like_dir)
    assert llama3.pad_token_id is None and bos_ids(llama3) == [1] and pad_id(llama3) == llama3.eos_token_id == 2
    assert tokenizer.bos_token_id == 1 and bos_ids(tokenizer) == [] and pad_id(tokenizer) == tokenizer.pad_token_id == 2
    histories = [[1, 2, 3], [4], [], [2, 2, 1, 4, 3]]
    flat, lengths = np.array([i for h in histories for i in h]), np.array([len(h) for h in histories])
    for slots in ((), ("user", "item")):
        plain, first = (PromptBuilder(t, TITLES, slots=slots).build(flat, lengths) for t in (tokenizer, llama3))
        assert [r.tolist() for r in first.rows()] == [[1, *r.tolist()] for r in plain.rows()]
        np.testing.assert_array_equal(first.item_end, plain.item_end + 1)
        if slots:
            assert (first.ids[first.slot != 0] == 2).all() and (first.slot != 0).sum() == (plain.slot != 0).sum()
    builder = PromptBuilder(llama3, TITLES)
    full = builder.build(flat, lengths).lengths  # the BOS counts toward the budget: one token less drops the oldest item
    assert builder.fit(flat, lengths, full)[1].tolist() == lengths.tolist()
    assert builder.fit(flat, lengths, full - (lengths > 0))[1].tolist() == [2, 0, 0, 4]
