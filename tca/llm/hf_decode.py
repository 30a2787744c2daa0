"""The paper's code's decoding: Hugging Face `generate` with a Python prefix-allowed-tokens function
that walks a dict trie of the items' target ids. Kept as the reference `tca.llm.decode` is checked
against (same lists) and measured against (bench/decode.py); the pipeline never uses it.
"""
from __future__ import annotations

import numpy as np
import torch

from tca.llm.prompt import Prompts
from tca.ragged import pad


def dict_trie(targets: list[list[int]]) -> dict:
    """Nested dicts token -> subtree over the target ids (each ends with EOS, whose subtree is {})."""
    root: dict = {}
    for ids in targets:
        node = root
        for token in ids:
            node = node.setdefault(int(token), {})
    return root


@torch.inference_mode()
def hf_beam_search(model, prompts: Prompts, targets: list[list[int]], item_ids: list[int], eos: int,
                   num_beams: int = 10, length_penalty: float = 1.0) -> tuple[list[list[int]], list[list[float]]]:
    """Per prompt the items of the titles `generate` returns, best first, and their scores.

    `targets[i]` are the target ids of item `item_ids[i]`. Beams HF seeds with -1e9 (all but the
    first at the start) can surface as junk (score about -1e9 / length) when fewer than K titles
    finish; they are dropped.
    """
    root = dict_trie(targets)
    items_of: dict[tuple, list[int]] = {}
    for ids, item in zip(targets, item_ids):
        items_of.setdefault(tuple(int(t) for t in ids), []).append(int(item))
    width = int(prompts.lengths.max())

    def allowed(batch_id: int, sent: torch.Tensor) -> list[int]:
        node = root
        for token in sent[width:].tolist():
            node = node.get(token)
            if node is None:  # past a title's end (a junk beam, see above): any token will do
                return [eos]
        return list(node) or [eos]

    ids = torch.from_numpy(pad(prompts.ids, prompts.lengths, fill=eos, left=True))
    mask = torch.from_numpy(pad(np.ones_like(prompts.ids), prompts.lengths, fill=0, left=True))
    out = model.generate(
        input_ids=ids.to(model.device), attention_mask=mask.to(model.device), num_beams=num_beams,
        num_return_sequences=num_beams, max_new_tokens=max(len(t) for t in targets), do_sample=False,
        length_penalty=length_penalty, early_stopping=False, prefix_allowed_tokens_fn=allowed,
        eos_token_id=eos, pad_token_id=eos, return_dict_in_generate=True, output_scores=True,
    )
    items, scores = [[] for _ in prompts.lengths], [[] for _ in prompts.lengths]
    for row, (seq, s) in enumerate(zip(out.sequences[:, width:].tolist(), out.sequences_scores.tolist())):
        target = tuple(seq[: seq.index(eos) + 1]) if eos in seq else tuple(seq)
        if s > -1e6 and target in items_of:
            items[row // num_beams] += items_of[target]
            scores[row // num_beams] += [s] * len(items_of[target])
    return items, scores
