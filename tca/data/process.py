"""Raw interactions -> the `data` stage's tables, by the rules of DESIGN.md "Data".

Chronological order everywhere is (timestamp, source user id, item key), the item key being
the cleaned title when duplicate titles are merged and the source item id otherwise. Filters run
in the authors' order: usable titles, the time window (`data.max_months`), the iterative k-core.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import polars as pl

from tca.data import sources, titles
from tca.data.config import DataConfig
from tca.errors import TcaError

SPLITS = ("train", "valid", "test")
STEPS = ("read source", "titles and duplicates", "k-core", "samples and split")
MONTH_SECONDS = 30 * 24 * 3600  # data.max_months counts 30-day months, as the authors' preprocessing does


@dataclass
class Dataset:
    items: pl.DataFrame  # item_id (int32, 1..N), title, raw_ids (list[str]), n_interactions
    splits: dict[str, pl.DataFrame]  # sample_id, user_id, history (list[int32]), item_id, timestamp
    stats: dict


def prepare(cfg: DataConfig, on_step: Callable[[str], None] = lambda step: None) -> Dataset:
    """Read `cfg.source` and build the dataset; `on_step` is called after each of STEPS."""
    raw = sources.read(sources.parse(cfg.source), cfg.on_bad_line)
    on_step(STEPS[0])
    return build(raw, cfg, on_step)


def build(raw: sources.RawData, cfg: DataConfig, on_step: Callable[[str], None] = lambda step: None) -> Dataset:
    items = catalog(raw.items, cfg)
    inter = encode(raw.interactions, items)
    if inter.is_empty():
        raise TcaError(f"data.source={cfg.source}: no interaction refers to an item with a usable title "
                       f"(are the interactions and the item titles from the same dataset?)")
    titled = inter.height
    inter = recent(inter, cfg.max_months)
    outside_window = titled - inter.height
    on_step(STEPS[1])
    inter = kcore(inter, cfg.min_item_interactions, cfg.min_user_interactions)
    if inter.is_empty():
        raise TcaError(f"the k-core filter (data.min_item_interactions={cfg.min_item_interactions}, "
                       f"data.min_user_interactions={cfg.min_user_interactions}) removed every interaction; "
                       f"lower these params")
    on_step(STEPS[2])
    ordered = inter.with_columns(user_id=first_appearance(inter["u"]), item_id=first_appearance(inter["i"]))
    splits = split(history_samples(ordered, cfg.min_history, cfg.history_len), cfg)
    on_step(STEPS[3])

    per_item = ordered.group_by("i").agg(pl.col("item_id").first(), n_interactions=pl.len().cast(pl.Int64))
    items = (items.with_row_index("i").join(per_item, on="i")
             .select("item_id", "title", "raw_ids", "n_interactions").sort("item_id"))
    n_users = ordered["user_id"].max()
    stats = {
        "source": cfg.source,
        "users": n_users,
        "items": items.height,
        "interactions": ordered.height,
        "density": ordered.height / (n_users * items.height),
        "samples": {name: frame.height for name, frame in splits.items()},
        "repeat_rate": {name: repeat_rate(frame) for name, frame in splits.items()},
        "raw_interactions": raw.interactions.height,
        "bad_lines_skipped": raw.bad_lines,
        "outside_time_window": outside_window,
    }
    return Dataset(items, splits, stats)


def repeat_rate(samples: pl.DataFrame) -> float:
    """Share of samples whose target is already in their history (0 where a user meets an item once, as
    MovieLens's ratings): decides whether recommending history items can ever be right."""
    if samples.is_empty():
        return 0.0
    return float(samples.select(pl.col("history").list.contains(pl.col("item_id")).mean()).item())


def catalog(raw_items: pl.DataFrame, cfg: DataConfig) -> pl.DataFrame:
    """One row per item to be, sorted by `key`: `key`, `title`, `raw_ids` (the source ids merged into it)."""
    cleaned = raw_items.with_columns(title=titles.clean(raw_items["title"], cfg.max_title_chars))
    cleaned = (cleaned.filter(titles.usable(cleaned["title"]))
               .unique("raw_id", keep="first", maintain_order=True))  # meta files repeat some ids
    if cleaned.is_empty():
        raise TcaError(f"data.source={cfg.source}: every item title is empty or a placeholder "
                       f"(such as {titles.PLACEHOLDERS[0]!r}) after cleaning; no item is left")
    key = "title" if cfg.merge_duplicate_titles else "raw_id"
    return (cleaned.group_by(pl.col(key).alias("key"))
            .agg(pl.col("title").first(), pl.col("raw_id").sort().alias("raw_ids"))
            .sort("key"))


def encode(interactions: pl.DataFrame, items: pl.DataFrame) -> pl.DataFrame:
    """Integer codes `u` (rank of the source user id) and `i` (row of `items`) with `timestamp`, in
    chronological order; interactions with untitled items and exact duplicates (after merging) go."""
    item_codes = (items.select(pl.int_range(pl.len(), dtype=pl.UInt32).alias("i"), pl.col("raw_ids").alias("item"))
                  .explode("item"))
    titled = interactions.lazy().join(item_codes.lazy(), on="item")
    users = titled.select(pl.col("user").unique().sort()).with_row_index("u")  # sorting the distinct ids is cheap
    coded = titled.join(users, on="user").select("u", "i", "timestamp").sort("timestamp", "u", "i").collect()
    repeat = pl.all_horizontal([pl.col(c) == pl.col(c).shift(1) for c in coded.columns]).fill_null(False)
    return coded.filter(~repeat)


def recent(inter: pl.DataFrame, months: int) -> pl.DataFrame:
    """The interactions later than the newest one minus `months` x 30 days (all when months is 0),
    before the k-core, as the authors' preprocessing cuts Toys and Sports to 48 months."""
    if months == 0:
        return inter
    return inter.filter(pl.col("timestamp") > inter["timestamp"].max() - months * MONTH_SECONDS)


def kcore(inter: pl.DataFrame, min_item: int, min_user: int) -> pl.DataFrame:
    """Drop items (`i`) with < min_item and users (`u`) with < min_user interactions, repeatedly,
    until both hold; row order is kept. Codes are small non-negative ints, so counts are bincounts."""
    users, items = inter["u"].to_numpy(), inter["i"].to_numpy()
    rows = np.arange(inter.height)
    while True:
        before = rows.size
        rows = rows[np.bincount(items[rows])[items[rows]] >= min_item]
        rows = rows[np.bincount(users[rows])[users[rows]] >= min_user]
        if rows.size == before:
            return inter[rows]


def first_appearance(codes: pl.Series) -> pl.Series:
    """Ids 1..K (int32) numbering the distinct codes in order of first appearance."""
    distinct = codes.unique(maintain_order=True)
    return codes.replace_strict(distinct, pl.int_range(1, len(distinct) + 1, dtype=pl.Int32, eager=True))


def history_samples(ordered: pl.DataFrame, min_history: int, history_len: int) -> pl.DataFrame:
    """One sample per interaction with >= min_history earlier ones of its user; `sample_id` = its rank
    in chronological order; `history` = the user's previous history_len items, oldest first."""
    position = pl.int_range(pl.len()).over("user_id")
    # Grouped by user, a row's predecessors are the rows above it; the shifted window reaches into
    # the previous user's rows only before `position`, which the tail cuts off.
    window = pl.concat_arr([pl.col("item_id").shift(k) for k in range(history_len, 0, -1)]).arr.to_list()
    return (ordered.with_row_index("order").sort("user_id", "order")
            .with_columns(position=position, history=window)
            .filter(pl.col("position") >= min_history)
            .sort("order")
            .select(pl.int_range(pl.len(), dtype=pl.Int64).alias("sample_id"), "user_id",
                    pl.col("history").list.tail(pl.min_horizontal("position", history_len)),
                    "item_id", "timestamp"))


def split(samples: pl.DataFrame, cfg: DataConfig) -> dict[str, pl.DataFrame]:
    """Global chronological 8:1:1 split (samples are in chronological order)."""
    n = samples.height
    if n == 0:
        raise TcaError(f"no interaction has data.min_history={cfg.min_history} earlier interactions of "
                       f"its user after the k-core filter; lower data.min_history")
    cuts = (0, n * 8 // 10, n * 9 // 10, n)
    parts = {name: samples[cuts[k]:cuts[k + 1]] for k, name in enumerate(SPLITS)}
    if any(frame.is_empty() for frame in parts.values()):
        raise TcaError(f"only {n} samples, too few for an 8:1:1 split; lower data.min_history "
                       f"(now {cfg.min_history}) or the k-core thresholds")
    return parts
