"""Title cleaning: the LLM reads and generates titles, so they must be clean and distinct."""
from __future__ import annotations

import html

import polars as pl

# Titles that name no item (lowercased); such items are dropped like empty ones.
PLACEHOLDERS = ["unknown", "unkonwn", "untitled", "no title", "title", "n/a", "na", "none", "null", "nan",
                "-", "?"]


def unescape_html(titles: pl.Series) -> pl.Series:
    """Decode HTML entities (`&amp;`, `&#39;`); Python's decoder runs once per distinct title with a '&'."""
    todo = titles.filter(titles.str.contains("&", literal=True)).unique()
    return titles.replace(todo, pl.Series([html.unescape(t) for t in todo], dtype=pl.String))


def clean(titles: pl.Series, max_chars: int) -> pl.Series:
    """HTML-unescaped, whitespace collapsed and stripped, cut to `max_chars` characters."""
    titles = unescape_html(titles.fill_null(""))
    squeezed = titles.str.replace_all(r"\s+", " ").str.strip_chars()
    return squeezed.str.slice(0, max_chars).str.strip_chars()


def usable(titles: pl.Series) -> pl.Series:
    """False for empty and placeholder titles."""
    return (titles.str.len_bytes() > 0) & ~titles.str.to_lowercase().is_in(PLACEHOLDERS)
