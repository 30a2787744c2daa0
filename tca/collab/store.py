"""The on-disk form of q_t (`dist.zarr`, a Zarr v3 group) and its streaming writer and batch reader.

Arrays (1-D, sharded, rows in the order they were appended):
  sample_id [S], sample_ptr [S+1] into positions, pos_ptr [P+1] into entries,
  token [nnz] int32, prob [nnz] float32.
The writer buffers each array and writes whole shards only, so memory stays bounded by one
shard plus one batch however many samples there are; the reader fetches the entries of a batch
of samples by coordinate selection (only the chunks they touch) and pads them for the loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import zarr

from tca.errors import TcaError
from tca.ragged import concat_ranges, pad, ragged_index
from tca.collab.trie import Trie

if TYPE_CHECKING:  # the reader (imported by the trainer) needs neither the kernels nor numba
    from tca.collab.tokenizer import TokenDist

CHUNK = 1 << 15  # elements per chunk: the unit a random batch read decompresses
SHARD = 1 << 21  # elements per shard (file): the unit the writer writes at once
ARRAYS = {"sample_id": np.int64, "sample_ptr": np.int64, "pos_ptr": np.int64, "token": np.int32, "prob": np.float32}


class _Column:
    """One growing array: values are buffered until a whole shard can be written."""

    def __init__(self, array: zarr.Array):
        self.array, self.pending, self.n_pending, self.size = array, [], 0, 0

    def push(self, values: np.ndarray) -> None:
        self.pending.append(values)
        self.n_pending += len(values)
        if self.n_pending >= SHARD:
            self.flush(self.n_pending // SHARD * SHARD)

    def flush(self, n: int | None = None) -> None:
        """Write the first n pending values (all by default) at the end of the array."""
        buf = np.concatenate(self.pending) if self.pending else np.empty(0, self.array.dtype)
        n = len(buf) if n is None else n
        if n:
            self.array.resize((self.size + n,))
            self.array[self.size : self.size + n] = buf[:n]
            self.size += n
        self.pending, self.n_pending = [buf[n:]], len(buf) - n


class DistWriter:
    """Append TokenDist batches to a new `dist.zarr`; `close()` writes the tails and the attrs."""

    def __init__(self, path: Path, attrs: dict):
        self.group = zarr.open_group(path, mode="w-", zarr_format=3)
        self.attrs = attrs
        self.cols = {
            name: _Column(self.group.create_array(name, shape=(0,), dtype=dtype, chunks=(CHUNK,), shards=(SHARD,)))
            for name, dtype in ARRAYS.items()
        }
        self.cols["sample_ptr"].push(np.zeros(1, np.int64))
        self.cols["pos_ptr"].push(np.zeros(1, np.int64))
        self.n_samples = self.n_positions = self.nnz = 0
        self.dropped_sum, self.dropped_max = 0.0, 0.0

    def append(self, sample_id: np.ndarray, dist: TokenDist) -> None:
        self.cols["sample_id"].push(np.asarray(sample_id, dtype=np.int64))
        self.cols["sample_ptr"].push(dist.sample_ptr[1:] + self.n_positions)
        self.cols["pos_ptr"].push(dist.pos_ptr[1:] + self.nnz)
        self.cols["token"].push(dist.token)
        self.cols["prob"].push(dist.prob)
        self.n_samples += len(sample_id)
        self.n_positions += len(dist.dropped)
        self.nnz += len(dist.token)
        self.dropped_sum += float(dist.dropped.sum())
        self.dropped_max = max(self.dropped_max, float(dist.dropped.max(initial=0.0)))

    def extend(self, path: Path) -> None:
        """Append a whole store written by another DistWriter (a shard of the same computation), its
        pointers shifted, reading it a shard at a time: the arrays become what appending its batches
        here would have written."""
        group = _open(path)
        for name in ARRAYS:
            array, offset = group[name], {"sample_ptr": self.n_positions, "pos_ptr": self.nnz}.get(name)
            first = 0 if offset is None else 1  # a pointer array's leading 0 is already here
            for lo in range(first, array.shape[0], SHARD):
                values = array[lo : lo + SHARD]
                self.cols[name].push(values if offset is None else values + offset)
        attrs = group.attrs
        self.n_samples += attrs["n_samples"]
        self.n_positions += attrs["n_positions"]
        self.nnz += attrs["nnz"]
        self.dropped_sum += attrs["dropped_mass_mean"] * attrs["n_positions"]
        self.dropped_max = max(self.dropped_max, attrs["dropped_mass_max"])

    def close(self) -> dict:
        """Write what is buffered and the attrs; returns the attrs (config + sizes + mass dropped)."""
        for col in self.cols.values():
            col.flush()
        self.attrs |= {
            "n_samples": self.n_samples,
            "n_positions": self.n_positions,
            "nnz": self.nnz,
            "dropped_mass_mean": self.dropped_sum / max(self.n_positions, 1),
            "dropped_mass_max": self.dropped_max,
        }
        self.group.attrs.update(self.attrs)
        return self.attrs


@dataclass
class SoftLabels:
    """q_t of a batch, padded: position t of sample b has count[b, t] entries token/prob[b, t, :count]."""

    token: torch.Tensor  # int64 [B, T, K], 0 where padded
    prob: torch.Tensor  # float32 [B, T, K], 0 where padded
    count: torch.Tensor  # int64 [B, T], 0 past a sample's last position


SIZES = ("n_samples", "n_positions", "nnz", "dropped_mass_mean", "dropped_mass_max")  # attrs `close` adds


def _open(path: Path) -> zarr.Group:
    try:
        return zarr.open_group(path, mode="r", zarr_format=3)
    except FileNotFoundError as e:
        raise TcaError(f"{path}: no dist.zarr here; run the cf_dist stage") from e


def merge_stores(paths: list[Path], dest: Path) -> dict:
    """One store at `dest` holding the stores at `paths` in order (shards of one cf_dist run: their
    settings must agree); returns its attrs."""
    settings = [{k: v for k, v in _open(p).attrs.items() if k not in SIZES} for p in paths]
    for path, other in zip(paths[1:], settings[1:]):
        if other != settings[0]:
            raise TcaError(f"{path} was computed with other settings than {paths[0]} ({other} vs {settings[0]}); recompute that shard")
    writer = DistWriter(dest, settings[0])
    for path in paths:
        writer.extend(path)
    return writer.close()


class DistReader:
    """Random access to `dist.zarr` by sample id; pass the trie to check it is the one q_t was built on."""

    def __init__(self, path: Path, trie: Trie | None = None):
        self.path = Path(path)
        self.group = _open(self.path)
        self.attrs = dict(self.group.attrs)
        if trie is not None and self.attrs.get("trie_hash") != trie.digest():
            raise TcaError(f"{self.path} was computed on another trie than the current one; rerun the cf_dist stage")
        self.sample_id = self.group["sample_id"][:]
        self.sample_ptr = self.group["sample_ptr"][:]
        self._sorter = np.argsort(self.sample_id, kind="stable")
        # read whole once (the default's 71,863 samples: 150 MB), then every batch slices memory: a
        # training step then costs no Zarr decoding (three coordinate selections per micro-batch before)
        self.pos_ptr, self.token, self.prob = (self.group[name][:] for name in ("pos_ptr", "token", "prob"))

    def __len__(self) -> int:
        return len(self.sample_id)

    def rows(self, sample_ids: np.ndarray) -> np.ndarray:
        """Row of each sample id in the store."""
        sample_ids = np.asarray(sample_ids, dtype=np.int64)
        at = np.minimum(np.searchsorted(self.sample_id, sample_ids, sorter=self._sorter), len(self) - 1)
        rows = self._sorter[at]
        missing = self.sample_id[rows] != sample_ids
        if missing.any():
            raise TcaError(f"{self.path} has no sample {sample_ids[missing][0]}; rerun cf_dist on the current subset")
        return rows

    def read(self, sample_ids: np.ndarray) -> SoftLabels:
        rows = self.rows(sample_ids)
        first, n_pos = self.sample_ptr[rows], self.sample_ptr[rows + 1] - self.sample_ptr[rows]
        bounds = self.pos_ptr[concat_ranges(first, n_pos + 1)]
        _, col = ragged_index(n_pos + 1)
        opening = np.flatnonzero(col < np.repeat(n_pos, n_pos + 1))  # every bound but each sample's last
        starts, count = bounds[opening], bounds[opening + 1] - bounds[opening]
        entries = concat_ranges(starts, count)
        token, prob = self.token[entries], self.prob[entries]
        pos_b, pos_t = ragged_index(n_pos)
        ent_p, ent_k = ragged_index(count)
        shape = (len(rows), int(n_pos.max(initial=0)), int(count.max(initial=0)))
        out_token, out_prob = np.zeros(shape, np.int64), np.zeros(shape, np.float32)
        out_token[pos_b[ent_p], pos_t[ent_p], ent_k] = token
        out_prob[pos_b[ent_p], pos_t[ent_p], ent_k] = prob
        return SoftLabels(
            token=torch.from_numpy(out_token),
            prob=torch.from_numpy(out_prob),
            count=torch.from_numpy(pad(count, n_pos, fill=0, width=shape[1])),
        )
