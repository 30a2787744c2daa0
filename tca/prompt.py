"""Prompts as id-level concatenations of pre-tokenized pieces.

Every prompt is `head, item(h_1), sep, item(h_2), ..., sep, item(h_k), tail`: the fixed pieces
and each item's quoted title are tokenized once, and a batch of prompts is assembled by
gathering piece ranges (no tokenizer call and no Python loop per sample). Training, validation,
evaluation and `tca recommend` all build prompts here, so the ids the LLM sees never differ
between them; targets (`tca.trie.target_ids`) are appended as ids, never as text.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tca.errors import TcaError
from tca.ragged import concat_ranges, ragged_index

DEFAULT_INSTRUCTION = (
    "Given the user's interaction history, recommend the {domain} the user is most likely to interact with next."
)


@dataclass(frozen=True)
class PromptConfig:
    domain: str = "movies"  # the paper's word per dataset: movies, toys, sports products, office products
    target_template: str = "{title}"
    instruction: str = DEFAULT_INSTRUCTION


@dataclass
class Prompts:
    """A batch of prompts as a ragged id array."""

    ids: np.ndarray  # int64 [total tokens], prompts back to back
    lengths: np.ndarray  # int64 [B]
    item_end: np.ndarray  # int64 [sum k]: per history item, its prompt position just after its title

    def rows(self) -> list[np.ndarray]:
        return np.split(self.ids, np.cumsum(self.lengths)[:-1])


class PromptBuilder:
    def __init__(self, tokenizer, titles: list[str], cfg: PromptConfig = PromptConfig()):
        """`titles[i]` is the title of item id i (index 0, the padding item, is never used)."""
        try:
            head = cfg.instruction.format(domain=cfg.domain) + "\nUser interaction history: "
        except (KeyError, IndexError) as err:
            raise TcaError(f"prompt.instruction: {cfg.instruction!r} may only use the field {{domain}} ({err})") from err
        tail = f"\nThe {cfg.domain} the user is most likely to interact with next:\n"
        texts = [f'"{t}"' for t in titles] + [head, ", ", tail]
        pieces = tokenizer(texts, add_special_tokens=False)["input_ids"]
        self.n_items = len(titles)
        self.piece_len = np.array([len(p) for p in pieces], dtype=np.int64)
        self.piece_start = np.cumsum(self.piece_len) - self.piece_len
        self.piece_ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in pieces])
        self.HEAD, self.SEP, self.TAIL = self.n_items, self.n_items + 1, self.n_items + 2

    def _check(self, history: np.ndarray) -> None:
        if len(history) and (history.min() < 1 or history.max() >= self.n_items):
            raise TcaError(f"history item ids must be in 1..{self.n_items - 1}")

    def build(self, history: np.ndarray, hist_len: np.ndarray) -> Prompts:
        """Prompts for ragged histories: `history` is the flat item ids, `hist_len` the count per sample."""
        history = np.asarray(history, dtype=np.int64)
        hist_len = np.asarray(hist_len, dtype=np.int64)
        self._check(history)
        n_pieces = 2 * hist_len + 1 + (hist_len == 0)  # head, k items, k-1 seps, tail
        sample, col = ragged_index(n_pieces)
        last = (n_pieces - 1)[sample]
        is_item = (col % 2 == 1) & (col != last)
        piece = np.full(len(col), self.SEP, dtype=np.int64)
        piece[is_item] = history
        piece[col == 0] = self.HEAD
        piece[col == last] = self.TAIL
        lens = self.piece_len[piece]
        ids = self.piece_ids[concat_ranges(self.piece_start[piece], lens)]
        lengths = np.bincount(sample, weights=lens, minlength=len(hist_len)).astype(np.int64)
        ends = np.cumsum(lens) - np.repeat(np.cumsum(lengths) - lengths, n_pieces)  # position after each piece
        return Prompts(ids=ids, lengths=lengths, item_end=ends[is_item])

    def fit(self, history: np.ndarray, hist_len: np.ndarray, budget: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The newest items of each ragged history whose prompt has at most `budget` tokens (per sample)."""
        history = np.asarray(history, dtype=np.int64)
        hist_len = np.asarray(hist_len, dtype=np.int64)
        budget = np.broadcast_to(np.asarray(budget, dtype=np.int64), hist_len.shape)
        empty = self.piece_len[self.HEAD] + self.piece_len[self.TAIL]
        if (budget < empty).any():
            raise TcaError(f"a prompt without any history already needs {empty} tokens plus its target's: raise train.max_len")
        self._check(history)
        sample, _ = ragged_index(hist_len)
        cost = self.piece_len[history] + self.piece_len[self.SEP]  # an item and the separator before it
        end = np.cumsum(cost)
        newer = end[np.cumsum(hist_len)[sample] - 1] - end + cost  # this item and every newer one
        keep = empty - self.piece_len[self.SEP] + newer <= budget[sample]
        return history[keep], np.bincount(sample[keep], minlength=len(hist_len)).astype(np.int64)
