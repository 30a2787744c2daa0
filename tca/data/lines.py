"""Line-oriented raw files (JSON lines, RecBole atomic TSV), read by Polars' streaming engine.

Every row keeps its 1-based line number so that a bad line can be named in the error.
Fields come out as strings (null where a line lacks them); callers convert types, then
`drop_bad_lines` applies `data.on_bad_line`. A file that cannot be read (a truncated gzip, bytes
that are not UTF-8) is an error naming the file and where; undecodable lines are bad lines
(null fields), so `data.on_bad_line=skip` skips them.
"""
from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import polars as pl

from tca.errors import TcaError

LINE_NO = "line_no"


def scan(path: Path) -> pl.LazyFrame:
    """The non-blank lines of a plain or compressed text file, with their line numbers."""
    if not path.is_file():
        raise TcaError(f"{path}: no such file (check data.source)")
    return (pl.scan_lines(path, name="line", row_index_name=LINE_NO, row_index_offset=1)
            .filter(pl.col("line").str.len_bytes() > 0))


def _decoded(path: Path) -> tuple[pl.LazyFrame, int, int]:
    """The file's non-blank lines with those that are not UTF-8 as null, read in memory (the
    fallback when Polars refuses the file); also the first bad line's number and byte offset."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = _gunzip(path, raw)
    text = pl.Series("line", raw.decode("utf-8", "replace").split("\n"))
    suspects = text.str.contains("\ufffd", literal=True).arg_true().to_list()  # or a real U+FFFD
    rows = raw.split(b"\n")
    bad = [i for i in suspects if _bad_byte(rows[i]) is not None]
    if not bad:
        raise TcaError(f"{path}: cannot be read as text lines; check that it is a plain or gzip-compressed text file")
    offset = sum(len(row) + 1 for row in rows[:bad[0]]) + _bad_byte(rows[bad[0]])
    text = text.scatter(bad, None)
    frame = (pl.DataFrame({LINE_NO: pl.int_range(1, len(text) + 1, eager=True, dtype=pl.UInt32), "line": text})
             .filter(pl.col("line").is_null() | (pl.col("line").str.len_bytes() > 0)))
    return frame.lazy(), bad[0] + 1, offset


def _gunzip(path: Path, raw: bytes) -> bytes:
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError) as err:
        raise TcaError(f"{path}: the gzip file is damaged or truncated ({err}); download or copy it again") from err


def _bad_byte(row: bytes) -> int | None:
    """Where in `row` its UTF-8 breaks (None: it is UTF-8)."""
    try:
        row.decode("utf-8")
    except UnicodeDecodeError as err:
        return err.start
    return None


def read(path: Path, query: Callable[[pl.LazyFrame], pl.LazyFrame], on_bad_line: str = "error") -> pl.DataFrame:
    """`query` over the file's lines, collected; a file Polars cannot read becomes a TcaError naming
    it, or (lines that are not UTF-8, with on_bad_line=skip) rows of null fields that
    `drop_bad_lines` counts and skips."""
    try:
        return query(scan(path)).collect(engine="streaming")
    except OSError as err:  # a truncated or damaged compressed file
        raise TcaError(f"{path}: cannot be read ({err}); if it is compressed, it is damaged or truncated: "
                       f"download or copy it again") from err
    except pl.exceptions.ComputeError as err:
        if "utf8" not in str(err).lower() and "utf-8" not in str(err).lower():
            raise  # not the file's bytes but the query's parse (json_fields then takes its slow path)
    lines, line_no, offset = _decoded(path)
    if on_bad_line == "error":
        raise TcaError(f"{path}, line {line_no} (byte {offset:,}): not UTF-8 text. Convert the file to UTF-8 "
                       f"(e.g. iconv -f latin1 -t utf-8), or set data.on_bad_line=skip to skip such lines")
    return query(lines).collect()


def json_fields(path: Path, names: list[str], on_bad_line: str = "error") -> pl.DataFrame:
    """Top-level `names` of each JSON line as strings; only the fields are kept in memory."""
    try:  # fast path: one strict parse per line
        struct = pl.Struct({name: pl.String for name in names})
        return read(path, lambda lines: lines.select(LINE_NO, pl.col("line").str.json_decode(struct).struct.unnest()), on_bad_line)
    except pl.exceptions.ComputeError:
        pass  # some line is not a JSON object of scalars; the path matcher yields null there instead
    return read(path, lambda lines: lines.select(LINE_NO, *[pl.col("line").str.json_path_match(f"$.{name}").alias(name)
                                                            for name in names]), on_bad_line)


def tsv_header(path: Path) -> list[str]:
    """Column names of a RecBole atomic file, without their `:type` suffix."""
    first = read(path, lambda lines: lines.head(1), "skip")
    if first.is_empty():
        raise TcaError(f"{path}: the file is empty")
    if first["line"][0] is None or first[LINE_NO][0] != 1:
        raise TcaError(f"{path}, line 1: the header line is missing or not UTF-8 text; fix the file")
    return [col.split(":")[0] for col in first["line"][0].rstrip("\r").split("\t")]


def tsv_fields(path: Path, names: list[str], on_bad_line: str = "error") -> pl.DataFrame:
    """Columns `names` of a tab-separated file with a header line."""
    header = tsv_header(path)
    for name in names:
        if name not in header:
            raise TcaError(f"{path}: missing column {name!r} (the header has {', '.join(header)})")
    parts = pl.col("line").str.strip_chars_end("\r").str.split("\t")
    frame = read(path, lambda lines: lines.filter(pl.col(LINE_NO) > 1)
                 .select(LINE_NO, *[parts.list.get(header.index(n), null_on_oob=True).alias(n) for n in names]), on_bad_line)
    if frame.is_empty():
        raise TcaError(f"{path}: no data lines after the header line; the file holds no records")
    return frame


def require_columns(frame: pl.DataFrame, path: Path, names: list[str]) -> None:
    """A column absent from every line is a missing column, not a run of bad lines."""
    if frame.is_empty():
        raise TcaError(f"{path}: no data lines")
    parsed = frame.select(pl.any_horizontal(pl.exclude(LINE_NO).is_not_null())).to_series()
    n_parsed = parsed.sum()  # 0: nothing parsed at all, which drop_bad_lines reports by line
    for name in names:
        if n_parsed and frame[name].filter(parsed).null_count() == n_parsed:
            raise TcaError(f"{path}: missing column {name!r} (no line has it)")


def drop_bad_lines(frame: pl.DataFrame, path: Path, required: list[str], expected: str,
                   on_bad_line: str) -> tuple[pl.DataFrame, int]:
    """Rows lacking a required (already type-converted) field: an error, or dropped and counted."""
    bad = pl.any_horizontal(pl.col(required).is_null())
    n_bad = frame.select(bad.sum()).item()
    if n_bad and on_bad_line == "error":
        first = frame.filter(bad)[LINE_NO].min()
        raise TcaError(f"{path}, line {first}: malformed line, expected {expected} "
                       f"({n_bad} such line{'s' if n_bad > 1 else ''} in the file). Fix the file, or set "
                       f"data.on_bad_line=skip to skip such lines (they are counted in stats.json).")
    return frame.filter(~bad).drop(LINE_NO), n_bad
