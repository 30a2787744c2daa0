"""Prompts as id-level concatenations of pre-tokenized pieces.

Every prompt is `head, item(h_1), sep, item(h_2), ..., sep, item(h_k), tail`: the fixed pieces
and each item's quoted title are tokenized once, and a batch of prompts is assembled by
gathering piece ranges (no tokenizer call and no Python loop per sample). Training, validation,
evaluation and `tca recommend` all build prompts here, so the ids the LLM sees never differ
between them; targets (`tca.collab.trie.target_ids`) are appended as ids, never as text.

Every prompt starts with the tokenizer's BOS where the tokenizer itself puts one before a text
(Llama-3's `<|begin_of_text|>`: the models saw it first in pretraining); a tokenizer that declares a
BOS but never adds it (SmolLM2's `<|im_start|>`, a chat-role marker) or has none (Qwen2.5) gets none.

Hybrid prompts (LLaRA, CoLLM: `tca.llm.hybrid_prompt`) add CF embedding slots to the same template: a
slot is a placeholder token that ends an item's piece (after its title) or sits in the tail (the
user), so `build` and `fit` count and place slots like any other token. In the items format (packed
training) a user slot ends every separator and the tail: it shows the user vector of the items
before the item that follows it (`tca.llm.packing.slot_histories`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tca.errors import TcaError
from tca.ragged import concat_ranges, ragged_index
from tca.collab.trie import template_parts

SLOTS = ("item", "user")
USER_SLOT_TEXT = "\nUser preference feature: "  # CoLLM's wording: the user's preferences "encoded in the feature"

DEFAULT_INSTRUCTION = (
    "Given the user's interaction history, recommend the {domain} the user is most likely to interact with next."
)


@dataclass(frozen=True)
class PromptConfig:
    """The prompt is instruction, before_history, the quoted history titles joined by ", ", after_history."""

    domain: str = "movies"  # the paper's word per dataset: movies, toys, sports products, office products
    target_template: str = "{title}"
    instruction: str = DEFAULT_INSTRUCTION
    before_history: str = "\nUser interaction history: "
    after_history: str = "\nThe {domain} the user is most likely to interact with next:\n"

    def text(self, name: str) -> str:
        """The template `name` with the domain filled in."""
        try:
            return getattr(self, name).format(domain=self.domain)
        except (KeyError, IndexError, ValueError) as err:
            raise TcaError(f"prompt.{name}: {getattr(self, name)!r} may only use the field {{domain}} ({err})") from err

    def __post_init__(self):
        for name in ("instruction", "before_history", "after_history"):
            self.text(name)
        template_parts(self.target_template)


@dataclass
class Prompts:
    """A batch of prompts as a ragged id array."""

    ids: np.ndarray  # int64 [total tokens], prompts back to back
    lengths: np.ndarray  # int64 [B]
    item_end: np.ndarray  # int64 [sum k]: per history item, its prompt position just after its title (and slot)
    slot: np.ndarray | None = None  # int64 [total tokens], with slots: item id at an item slot, -1 at the user slot, else 0

    def rows(self) -> list[np.ndarray]:
        return np.split(self.ids, np.cumsum(self.lengths)[:-1])


def pad_id(tokenizer) -> int:
    """The id of filler positions (right padding of training batches, hybrid prompts' slots): the
    tokenizer's pad token, else its EOS (Llama-3 has no pad token). Such positions are never
    attended (padding) or show another embedding (slots), and losses are taken at explicit target
    positions, never by matching this id, so any id works; it only has to be a valid one."""
    for pad in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if pad is not None:
            return int(pad)
    raise TcaError(f"{type(tokenizer).__name__} has neither a pad nor an EOS token: the model stage's tokenizer needs an EOS "
                   "(targets end with it)")


def bos_ids(tokenizer) -> list[int]:
    """[BOS] if the tokenizer puts its BOS before a text itself (add_special_tokens=True), else []."""
    bos = tokenizer.bos_token_id
    lead = tokenizer("a")["input_ids"][:1]
    return [int(bos)] if bos is not None and lead == [bos] else []


class PromptBuilder:
    def __init__(self, tokenizer, titles: list[str], cfg: PromptConfig = PromptConfig(), slots: tuple[str, ...] = (),
                 targets: list | None = None):
        """`titles[i]` is the title of item id i (index 0, the padding item, is never used). `slots`:
        "item" puts a CF slot after each history title, "user" one after the history (their ids are
        `pad_id`'s; `tca.llm.hybrid_prompt` replaces their input embeddings).

        `targets` (the items format of packed training, `tca.llm.packing`): `targets[i]` is item i's
        target ids (title + EOS, as the trie has them); every history item is then written as its target
        ids, one per line, and the prompt ends with the line break a generated item follows, so a
        prompt reads exactly like the start of a packed row. An item slot then follows each item's
        target ids (`title EOS [slot]`), a user slot each line break (`\n[slot]`); `item_slot` counts
        the former."""
        head, tail = cfg.text("instruction") + cfg.text("before_history"), cfg.text("after_history")
        if set(slots) - set(SLOTS):
            raise ValueError(f"slots {slots}: only {SLOTS}")
        self.titles = list(titles)
        self.items_format = targets is not None
        if self.items_format:
            if len(targets) != len(titles):
                raise ValueError(f"{len(targets)} target id lists for {len(titles)} titles")
            head = cfg.text("instruction") + "\nUser interaction history, one per line:\n"
            texts = [head, "\n", "\n", USER_SLOT_TEXT]
        else:
            texts = [f'"{t}"' for t in titles] + [head, ", ", tail, USER_SLOT_TEXT]
        pieces = tokenizer(texts, add_special_tokens=False)["input_ids"]
        if self.items_format:
            pieces = [[int(t) for t in ids] for ids in targets] + pieces
        user_lead = pieces.pop()
        self.n_items = len(titles)
        self.HEAD, self.SEP, self.TAIL = self.n_items, self.n_items + 1, self.n_items + 2
        self.bos = bos_ids(tokenizer)
        pieces[self.HEAD] = [*self.bos, *pieces[self.HEAD]]
        self.pad_id = slot_id = pad_id(tokenizer)
        if "user" in slots and self.items_format:  # every line break before an item ends with a user slot
            pieces[self.SEP], pieces[self.TAIL] = [*pieces[self.SEP], slot_id], [*pieces[self.TAIL], slot_id]
        elif "user" in slots:  # the tail opens with the user's feature: text, then its slot
            pieces[self.TAIL] = [*user_lead, slot_id, *pieces[self.TAIL]]
        self.slots = tuple(slots)
        self.piece_len = np.array([len(p) for p in pieces], dtype=np.int64)
        self.piece_ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in pieces])
        slot = np.zeros_like(self.piece_ids)  # per token: what a slot there shows (0: not a slot)
        if "user" in slots and self.items_format:
            slot[np.cumsum(self.piece_len)[[self.SEP, self.TAIL]] - 1] = -1
        elif "user" in slots:
            slot[self.piece_len[: self.TAIL].sum() + len(user_lead)] = -1
        if "item" in slots:  # a slot token ends each item's piece, after its title
            items = np.arange(1, self.n_items)
            at = np.cumsum(self.piece_len)[items]
            self.piece_ids, slot = np.insert(self.piece_ids, at, slot_id), np.insert(slot, at, items)
            self.piece_len[items] += 1
        self.piece_start = np.cumsum(self.piece_len) - self.piece_len
        self.piece_slot = slot if slots else None
        self.item_slot = int("item" in slots)  # tokens after an item's title (or target ids) in its piece

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
        at = concat_ranges(self.piece_start[piece], lens)
        lengths = np.bincount(sample, weights=lens, minlength=len(hist_len)).astype(np.int64)
        ends = np.cumsum(lens) - np.repeat(np.cumsum(lengths) - lengths, n_pieces)  # position after each piece
        return Prompts(ids=self.piece_ids[at], lengths=lengths, item_end=ends[is_item],
                       slot=None if self.piece_slot is None else self.piece_slot[at])

    def lengths(self, history: np.ndarray, hist_len: np.ndarray) -> np.ndarray:
        """The token count of each prompt `build` returns for these ragged histories, without building them."""
        history = np.asarray(history, dtype=np.int64)
        hist_len = np.asarray(hist_len, dtype=np.int64)
        self._check(history)
        items = np.bincount(np.repeat(np.arange(len(hist_len)), hist_len), weights=self.piece_len[history], minlength=len(hist_len))
        seps = np.maximum(hist_len - 1, 0) * self.piece_len[self.SEP]
        return self.piece_len[self.HEAD] + self.piece_len[self.TAIL] + items.astype(np.int64) + seps

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
