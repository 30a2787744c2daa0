"""Prompts assembled from pieces equal the reference built sample by sample."""
import numpy as np
import pytest

from tca.errors import TcaError
from tca.prompt import PromptBuilder, PromptConfig

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
