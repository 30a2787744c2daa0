"""Ragged (CSR) array helpers: the vectorized index arithmetic behind padding and range reads.

A ragged array is a flat buffer plus per-row lengths; these turn it into padded matrices and
gather row ranges from a flat store without a Python loop per element.
"""
from __future__ import annotations

import numpy as np


def ragged_index(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of every element of a ragged array with these row lengths, in flat order."""
    lengths = np.asarray(lengths, dtype=np.int64)
    row = np.repeat(np.arange(len(lengths)), lengths)
    col = np.arange(len(row)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return row, col


def concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths)]), vectorized."""
    row, col = ragged_index(lengths)
    return np.asarray(starts, dtype=np.int64)[row] + col


def pad(flat: np.ndarray, lengths: np.ndarray, fill, width: int | None = None, left: bool = False) -> np.ndarray:
    """Ragged rows -> [n_rows, width] matrix padded with `fill` (width defaults to the longest row);
    `left=True` right-aligns the rows, as batched generation wants its prompts."""
    row, col = ragged_index(lengths)
    width = int(np.max(lengths, initial=0)) if width is None else width
    out = np.full((len(lengths), width), fill, dtype=np.asarray(flat).dtype)
    out[row, col + (width - np.asarray(lengths, dtype=np.int64)[row] if left else 0)] = flat
    return out


def list_series(flat: np.ndarray, lengths: np.ndarray):
    """Ragged rows as a polars list column (through Arrow offsets, no Python loop per row)."""
    import polars as pl
    import pyarrow as pa

    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pl.Series(pl.from_arrow(pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.asarray(flat, dtype=np.int64)))))
