"""The raw sources `data.source` can name: where their files are and how to read them."""
from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from tca.data import lines
from tca.errors import TcaError

FORMS = ("ml-100k", "recbole:<dir>", "amazon2018:<reviews.json[.gz]>:<meta.json[.gz]>")
REVIEW_FIELDS = ["reviewerID", "asin", "unixReviewTime"]
META_FIELDS = ["asin", "title"]


@dataclass(frozen=True)
class Source:
    kind: str  # "ml-100k" | "recbole" | "amazon2018"
    files: tuple[Path, ...]  # (interactions, items)


@dataclass
class RawData:
    """Interactions (`user`, `item`, `timestamp`) and item titles (`raw_id`, `title`), uncleaned."""

    interactions: pl.DataFrame
    items: pl.DataFrame
    bad_lines: int = 0  # lines skipped under data.on_bad_line=skip


def parse(spec: str) -> Source:
    """Resolve a `data.source` value to its files (not read yet; `external_deps` needs only this)."""
    kind, _, rest = spec.partition(":")
    if spec == "ml-100k":
        return Source("ml-100k", _ml100k_files())
    if kind == "recbole" and rest:
        folder = Path(rest).expanduser()
        return Source("recbole", (_atomic_file(folder, ".inter"), _atomic_file(folder, ".item")))
    parts = rest.split(":")
    if kind == "amazon2018" and len(parts) == 2 and all(parts):
        return Source("amazon2018", tuple(Path(p).expanduser() for p in parts))
    raise TcaError(f"unknown data.source {spec!r}; valid forms: {', '.join(FORMS)}")


def read(source: Source, on_bad_line: str) -> RawData:
    if source.kind == "amazon2018":
        return _read_amazon(*source.files, on_bad_line)
    return _read_atomic(*source.files, on_bad_line, movielens=source.kind == "ml-100k")


def _ml100k_files() -> tuple[Path, Path]:
    """MovieLens-100k as shipped in the recbole wheel, found without importing recbole."""
    try:
        dist = importlib.metadata.distribution("recbole")
    except importlib.metadata.PackageNotFoundError:
        raise TcaError("data.source=ml-100k reads the files of the recbole wheel: "
                       "pip install --no-deps recbole") from None
    folder = Path(dist.locate_file("recbole/dataset_example/ml-100k"))
    return folder / "ml-100k.inter", folder / "ml-100k.item"


def _atomic_file(folder: Path, suffix: str) -> Path:
    found = sorted(folder.glob(f"*{suffix}"))
    if len(found) != 1:
        raise TcaError(f"{folder}: expected exactly one {suffix} file (RecBole atomic format), "
                       f"found {', '.join(p.name for p in found) or 'none'}")
    return found[0]


def _seconds(name: str) -> pl.Expr:
    """A timestamp string as integer seconds; null (a bad line) when it is not a number."""
    return pl.col(name).cast(pl.Float64, strict=False).cast(pl.Int64, strict=False)


def _require_titles(items: pl.DataFrame, path: Path, column: str) -> None:
    if not (items["title"].str.strip_chars().str.len_bytes() > 0).any():
        raise TcaError(f"{path}: column {column!r} is empty on every line; items need titles "
                       f"(the LLM reads and generates them)")


def _read_atomic(inter_path: Path, item_path: Path, on_bad_line: str, movielens: bool) -> RawData:
    inter = lines.tsv_fields(inter_path, ["user_id", "item_id", "timestamp"], on_bad_line)
    inter, bad_inter = lines.drop_bad_lines(
        inter.with_columns(_seconds("timestamp")), inter_path, ["user_id", "item_id", "timestamp"],
        "user_id, item_id and a numeric timestamp", on_bad_line)

    header = lines.tsv_header(item_path)
    title_col = next((c for c in header if "title" in c.lower()), None)
    if title_col is None:
        raise TcaError(f"{item_path}: missing column: no column name contains 'title' "
                       f"(the header has {', '.join(header)})")
    with_year = movielens and "release_year" in header
    items = lines.tsv_fields(item_path, ["item_id", title_col] + ["release_year"] * with_year, on_bad_line)
    items, bad_items = lines.drop_bad_lines(items, item_path, ["item_id"], "an item_id", on_bad_line)
    title = pl.col(title_col)
    if with_year:  # MovieLens titles are "Toy Story (1995)"; a broken year is left out
        year = pl.col("release_year")
        title = pl.when(year.str.contains(r"^\d{4}$")).then(pl.format("{} ({})", title, year)).otherwise(title)
    items = items.select(raw_id="item_id", title=title)
    _require_titles(items, item_path, title_col)
    interactions = inter.select(user="user_id", item="item_id", timestamp="timestamp")
    return RawData(interactions, items, bad_inter + bad_items)


def _read_amazon(reviews_path: Path, meta_path: Path, on_bad_line: str) -> RawData:
    """Amazon 2018 reviews + meta (JSON lines, plain or gzip); a meta row without a title is kept
    here and dropped with the other unusable titles."""
    reviews = lines.json_fields(reviews_path, REVIEW_FIELDS, on_bad_line)
    lines.require_columns(reviews, reviews_path, REVIEW_FIELDS)
    reviews, bad_reviews = lines.drop_bad_lines(
        reviews.with_columns(_seconds("unixReviewTime")), reviews_path, REVIEW_FIELDS,
        'a JSON object with "reviewerID", "asin" and a numeric "unixReviewTime"', on_bad_line)

    meta = lines.json_fields(meta_path, META_FIELDS, on_bad_line)
    lines.require_columns(meta, meta_path, META_FIELDS)
    meta, bad_meta = lines.drop_bad_lines(meta, meta_path, ["asin"], 'a JSON object with "asin"', on_bad_line)
    items = meta.select(raw_id="asin", title=pl.col("title").fill_null(""))
    _require_titles(items, meta_path, "title")
    interactions = reviews.select(user="reviewerID", item="asin", timestamp="unixReviewTime")
    return RawData(interactions, items, bad_reviews + bad_meta)
