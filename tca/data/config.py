"""Typed configs of the `data` and `subset` stages (the `data:` and `subset:` param sections)."""
from __future__ import annotations

from dataclasses import dataclass, fields

from tca.errors import TcaError

BAD_LINE_POLICIES = ("error", "skip")


def _require_positive(cfg, section: str, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise TcaError(f"{section}.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    """How raw interactions become samples; see DESIGN.md "Data" for every rule."""

    source: str = "ml-100k"
    max_title_chars: int = 120
    merge_duplicate_titles: bool = True
    min_item_interactions: int = 5
    min_user_interactions: int = 5
    min_history: int = 10
    history_len: int = 10
    max_months: int = 0  # keep the interactions of the last max_months x 30 days only; 0 = all
    on_bad_line: str = "error"

    def __post_init__(self):
        _require_positive(self, "data", ("max_title_chars", "min_item_interactions",
                                         "min_user_interactions", "min_history", "history_len"))
        if not isinstance(self.max_months, int) or isinstance(self.max_months, bool) or self.max_months < 0:
            raise TcaError(f"data.max_months must be an integer >= 0 (0 = no time window), got {self.max_months!r}")
        if self.on_bad_line not in BAD_LINE_POLICIES:
            raise TcaError(f"data.on_bad_line must be one of {', '.join(BAD_LINE_POLICIES)}, "
                           f"got {self.on_bad_line!r}")


@dataclass(frozen=True)
class SubsetConfig:
    """Sizes of the LLM's seeded random subsets of each split (the paper: 10000/5000/5000)."""

    train: int = 4096
    valid: int = 512
    test: int = 1024
    seed: int = 42

    def __post_init__(self):
        _require_positive(self, "subset", tuple(f.name for f in fields(self) if f.name != "seed"))
        if not isinstance(self.seed, int):
            raise TcaError(f"subset.seed must be an integer, got {self.seed!r}")
