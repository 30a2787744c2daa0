"""Typed configs of the `data` and `subset` stages (the `data:` and `subset:` param sections)."""
from __future__ import annotations

from dataclasses import dataclass, fields

from tca.config import require_positive
from tca.errors import TcaError

BAD_LINE_POLICIES = ("error", "skip")


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
        require_positive({k: getattr(self, k) for k in ("max_title_chars", "min_item_interactions",
                                                        "min_user_interactions", "min_history", "history_len")}, "data")
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
        require_positive({f.name: getattr(self, f.name) for f in fields(self) if f.name != "seed"}, "subset")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise TcaError(f"subset.seed must be an integer >= 0, got {self.seed!r}")
