"""Packed item-window training rows (`train.packing: items`).

A per-sample prompt spends ~150 tokens of history on ~10 target tokens, and a user's consecutive
samples repeat the same history items over and over. Packing writes one user's chronological items
once, as one row (the prompt head, then each item's target ids followed by the separator), and
supervises every item of the row that is a selected training sample. An item-window attention mask
keeps each target conditioned on its own sample's history: a token attends to the head and to the
items of the window of the item it *predicts* (the separator before an item predicts its first token,
so it takes that item's window, not the one of the item it follows), causally.

The window is exact for the attention of every layer's queries; through deeper layers a history
item's states carry the items of its own (older) window, so only the first target of a row sees
exactly what its evaluation prompt (`PromptBuilder` in the items format) shows. A row holding one
target equals the per-sample prompt of the items format token for token.

LLaRA and CoLLM pack the same way, with their CF slots in the items format (`PromptBuilder`): an item
slot after each item's target ids shows that item's CF vector, as in the per-sample prompts; CoLLM's
user slot ends the line break before each item and shows the user vector of that item's window
(`slot_histories`), so every target reads its own sample's user vector right before its first token.

Rows are chains of samples: sample b continues sample a when they have the same user and b's
history is a's history followed by a's target (its last `len(history_b)` items), so the pairs
(history, target) a packed epoch supervises are exactly the selected samples.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from tca.errors import TcaError
from tca.llm.model import Inputs
from tca.llm.packed_attention import key_blocks
from tca.llm.prompt import PromptBuilder
from tca.ragged import concat_ranges, list_series, pad, ragged_index

PACKINGS = ("none", "items")


@dataclass
class Windows:
    """Packed rows of a sample table, as ragged item arrays (row after row)."""

    n_items: np.ndarray  # int64 [W]: items per row (a leading history, then targets)
    item: np.ndarray  # int64 [sum n_items]: item ids
    sample: np.ndarray  # int64 [sum n_items]: the sample row whose target the item is, -1 for leading history items
    window: np.ndarray  # int64 [sum n_items]: how many items before it the item's tokens may see

    @property
    def n_targets(self) -> np.ndarray:
        """Targets (supervised samples) per row."""
        row, _ = ragged_index(self.n_items)
        return np.bincount(row, weights=self.sample >= 0, minlength=len(self.n_items)).astype(np.int64)


def pack_samples(samples: pl.DataFrame, max_targets: int) -> Windows:
    """Rows of at most `max_targets` targets from `samples` (`user_id`, `timestamp`, `sample_id`,
    `history`, `item_id`); every sample is the target of exactly one row."""
    if max_targets < 1:
        raise TcaError(f"train.pack_targets: {max_targets} must be >= 1")
    missing = {"user_id", "timestamp", "sample_id", "history", "item_id"} - set(samples.columns)
    if missing:
        raise TcaError(f"packing needs the sample columns {sorted(missing)}; rerun the subset stage")
    ordered = (samples.with_row_index("row")
               .sort(["user_id", "timestamp", "sample_id"])
               .with_columns(extended=pl.concat_list("history", "item_id")))
    follows = ordered.select(
        (pl.col("user_id") == pl.col("user_id").shift(1))
        & (pl.col("history") == pl.col("extended").shift(1).list.tail(pl.col("history").list.len()))
    ).to_series().fill_null(False).to_numpy()
    chain = np.cumsum(~follows) - 1
    _, chain_start = np.unique(chain, return_index=True)
    k = np.arange(len(chain)) - chain_start[chain]  # position in its chain
    opens = k % max_targets == 0  # the first target of a row: its history leads the row
    row = np.cumsum(opens) - 1
    hist_len = ordered["history"].list.len().to_numpy().astype(np.int64)
    if (hist_len == 0).any():
        raise TcaError("packing needs every sample to have a history (data.min_history >= 1)")
    # per row: the first sample's history, then every sample's target
    lead = np.where(opens, hist_len, 0)
    n_items = np.bincount(row, weights=lead + 1).astype(np.int64)
    per_sample = lead + 1  # items each sample contributes to its row, in order
    _, col = ragged_index(per_sample)
    owner = np.repeat(np.arange(len(row)), per_sample)
    is_target = col == lead[owner]
    hist_flat = ordered["history"].explode().to_numpy().astype(np.int64)
    hist_start = np.cumsum(hist_len) - hist_len
    item = np.where(is_target, ordered["item_id"].to_numpy().astype(np.int64)[owner],
                    hist_flat[np.minimum(hist_start[owner] + col, len(hist_flat) - 1)])
    sample = np.where(is_target, ordered["row"].to_numpy().astype(np.int64)[owner], -1)
    _, pos = ragged_index(n_items)
    window = np.where(is_target, hist_len[owner], pos)  # a leading history item sees every item before it
    return Windows(n_items=n_items, item=item, sample=sample, window=window)


@dataclass
class PackedRows:
    """Token rows of packed windows: ids, the item-window mask and where the targets are."""

    input_ids: torch.Tensor  # int64 [R, T], right-padded
    lengths: np.ndarray  # int64 [R]
    mask: torch.Tensor  # bool [R, 1, T, T]: query t may attend key s
    target_pos: torch.Tensor  # int64 [N]: flat index r * T + t of the hidden state that predicts each target id
    target: torch.Tensor  # int64 [N]: target ids, target after target (row order)
    target_len: np.ndarray  # int64 [S]: ids per supervised sample, in row order
    sample: np.ndarray  # int64 [S]: the sample row of each supervised target, in row order
    position_ids: torch.Tensor | None = None  # int64 [R, T] when the rows are not each at positions 0.. (`concatenate`)
    slot: torch.Tensor | None = None  # int64 [R, T], CF slots: the item id at an item's slot, -1 at a user slot, else 0


def encode_windows(builder: PromptBuilder, windows: Windows, pad_id: int) -> PackedRows:
    """Token rows of `windows` (built by a `PromptBuilder` in the items format, so each item's piece is
    its target ids and the text between items is the separator)."""
    if not builder.items_format:
        raise TcaError("packed rows need a PromptBuilder in the items format (train.packing: items)")
    prompts = builder.build(windows.item, windows.n_items)  # head, item, sep, ..., item, sep
    lengths = prompts.lengths
    n_rows, width = len(lengths), int(lengths.max(initial=0))
    item_row, _ = ragged_index(windows.n_items)
    piece_len = builder.piece_len[windows.item]
    start = prompts.item_end - piece_len  # position of each item's first token in its row
    # block of every token: -1 in the head, j from item j's first token up to item j+1's
    tok_row, tok_pos = ragged_index(lengths)
    row_first_item = np.cumsum(windows.n_items) - windows.n_items
    row_offset = np.cumsum(lengths) - lengths
    starts = row_offset[item_row] + start  # ascending: rows in order, items in order within a row
    block = np.searchsorted(starts, row_offset[tok_row] + tok_pos, side="right") - row_first_item[tok_row] - 1
    # the item each token predicts: the block of the next token (the last token: its own block)
    nxt = np.minimum(tok_pos + 1, lengths[tok_row] - 1)
    pred = block[row_offset[tok_row] + nxt]
    lo = np.full(len(tok_row), -1, dtype=np.int64)  # the oldest block a token may see (head: -1)
    has_pred = pred >= 0
    lo[has_pred] = pred[has_pred] - windows.window[row_first_item[tok_row[has_pred]] + pred[has_pred]]
    block_pad = torch.from_numpy(pad(block, lengths, fill=np.iinfo(np.int64).max, width=width))
    lo_pad = torch.from_numpy(pad(lo, lengths, fill=np.iinfo(np.int64).max, width=width))
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    seen = (block_pad[:, None, :] == -1) | (block_pad[:, None, :] >= lo_pad[:, :, None])
    real = torch.from_numpy(np.arange(width) < lengths[:, None])
    mask = (causal & seen & real[:, :, None]) | torch.eye(width, dtype=torch.bool)  # padding sees itself only (no empty softmax)

    is_target = windows.sample >= 0
    t_len = piece_len[is_target] - builder.item_slot  # an item's slot follows its target ids
    t_start = (item_row * width + start)[is_target]
    target_pos = concat_ranges(t_start - 1, t_len)  # the token before each target id predicts it
    target = prompts.ids[concat_ranges(row_offset[item_row[is_target]] + start[is_target], t_len)]
    slot = None if prompts.slot is None else torch.from_numpy(pad(prompts.slot, lengths, fill=0, width=width))
    return PackedRows(input_ids=torch.from_numpy(pad(prompts.ids, lengths, fill=pad_id, width=width)), lengths=lengths,
                      mask=mask[:, None], target_pos=torch.from_numpy(target_pos), target=torch.from_numpy(target),
                      target_len=t_len, sample=windows.sample[is_target], slot=slot)


def slot_histories(windows: Windows) -> pl.Series:
    """The history each user slot of these rows shows, in row-major slot order: the slot after item i
    precedes item i + 1, so it shows item i + 1's window (the last slot of a row, the tail: every item)."""
    row, pos = ragged_index(windows.n_items)
    last = pos + 1 == windows.n_items[row]
    window = np.where(last, pos + 1, windows.window[np.minimum(np.arange(len(pos)) + 1, len(pos) - 1)])
    start = np.arange(len(pos)) + 1 - window
    return list_series(windows.item[concat_ranges(start, window)], window)


def prefix_histories(histories: pl.Series) -> pl.Series:
    """The user-slot histories of items-format prompts (one per history item: each prefix of the
    history, the whole history last), as `slot_histories` gives them for a one-target row."""
    lengths = histories.list.len().to_numpy().astype(np.int64)
    _, pos = ragged_index(lengths)
    flat = histories.explode().drop_nulls().to_numpy().astype(np.int64)
    return slot_histories(Windows(n_items=lengths, item=flat, sample=np.full(len(flat), -1), window=pos))


def select_rows(windows: Windows, rows: np.ndarray) -> Windows:
    """The windows `rows` (indices into the rows of `windows`), in that order."""
    start = np.cumsum(windows.n_items) - windows.n_items
    at = concat_ranges(start[rows], windows.n_items[rows])
    return Windows(n_items=windows.n_items[rows], item=windows.item[at], sample=windows.sample[at], window=windows.window[at])


def concatenate(rows: PackedRows) -> PackedRows:
    """The rows end to end as one sequence without padding (rows of a batch differ in length: users
    have fewer samples than a row holds). Each row keeps its positions (they restart at 0) and its
    mask; no token sees another row's, so every target's logits are those of its own row."""
    R, width = rows.input_ids.shape
    row, pos = (torch.from_numpy(a) for a in ragged_index(rows.lengths))
    same_row = row[:, None] == row[None, :]
    mask = same_row & rows.mask[row[:, None], 0, pos[:, None], pos[None, :]]
    offset = torch.from_numpy(np.cumsum(rows.lengths) - rows.lengths)
    return PackedRows(input_ids=rows.input_ids[row, pos][None], lengths=np.array([len(row)]), mask=mask[None, None],
                      target_pos=offset[rows.target_pos // width] + rows.target_pos % width, target=rows.target,
                      target_len=rows.target_len, sample=rows.sample, position_ids=pos[None],
                      slot=None if rows.slot is None else rows.slot[row, pos][None])


def as_inputs(rows: PackedRows) -> Inputs:
    """Concatenated rows as model inputs, with their mask in both forms: chunked for the sdpa models
    (`tca.llm.packed_attention`), dense for the others."""
    return Inputs(rows.input_ids, torch.ones_like(rows.input_ids), rows.target_pos, rows.target, rows.target_len, slot=rows.slot,
                  window_mask=rows.mask, key_blocks=key_blocks(rows.mask), position_ids=rows.position_ids)


def unpad(inputs: Inputs) -> Inputs:
    """Right-padded per-sample prompts (`tca.llm.model.encode`) end to end as one sequence, each under its own
    causal mask: the model reads no padding, and block attention's backward is cheaper on a CPU than
    SDPA's over a padded [B, T, T] mask (bench/train_step.py). Same logits at every target."""
    B, T = inputs.input_ids.shape
    causal = torch.ones(T, T, dtype=torch.bool).tril() & inputs.attention_mask.bool()[:, None, :]
    rows = PackedRows(input_ids=inputs.input_ids, lengths=inputs.attention_mask.sum(1).numpy(),
                      mask=(causal | torch.eye(T, dtype=torch.bool))[:, None], target_pos=inputs.target_pos,
                      target=inputs.target, target_len=inputs.target_len, sample=np.arange(B))
    return as_inputs(concatenate(rows))
