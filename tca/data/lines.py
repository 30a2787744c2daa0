"""Line-oriented raw files (JSON lines, RecBole atomic TSV), read by Polars' streaming engine.

Every row keeps its 1-based line number so that a bad line can be named in the error.
Fields come out as strings (null where a line lacks them); callers convert types, then
`drop_bad_lines` applies `data.on_bad_line`.
"""
from __future__ import annotations

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


def json_fields(path: Path, names: list[str]) -> pl.DataFrame:
    """Top-level `names` of each JSON line as strings; only the fields are kept in memory."""
    lines = scan(path)
    try:  # fast path: one strict parse per line
        struct = pl.Struct({name: pl.String for name in names})
        return (lines.select(LINE_NO, pl.col("line").str.json_decode(struct).struct.unnest())
                .collect(engine="streaming"))
    except pl.exceptions.ComputeError:
        pass  # some line is not a JSON object of scalars; the path matcher yields null there instead
    return (lines.select(LINE_NO, *[pl.col("line").str.json_path_match(f"$.{name}").alias(name)
                                    for name in names])
            .collect(engine="streaming"))


def tsv_header(path: Path) -> list[str]:
    """Column names of a RecBole atomic file, without their `:type` suffix."""
    first = scan(path).head(1).collect()
    if first.is_empty():
        raise TcaError(f"{path}: the file is empty")
    return [col.split(":")[0] for col in first["line"][0].rstrip("\r").split("\t")]


def tsv_fields(path: Path, names: list[str]) -> pl.DataFrame:
    """Columns `names` of a tab-separated file with a header line."""
    header = tsv_header(path)
    for name in names:
        if name not in header:
            raise TcaError(f"{path}: missing column {name!r} (the header has {', '.join(header)})")
    parts = pl.col("line").str.strip_chars_end("\r").str.split("\t")
    return (scan(path).filter(pl.col(LINE_NO) > 1)
            .select(LINE_NO, *[parts.list.get(header.index(n), null_on_oob=True).alias(n) for n in names])
            .collect(engine="streaming"))


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
