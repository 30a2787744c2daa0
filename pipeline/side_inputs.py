"""The CF model's side inputs (text_emb, profiles): where each is read from, whether cf.model
reads a stage's artifact at all, and the stand-in such a stage writes when nothing reads it.

text_emb and profiles decide from the params (the CF class's `needs`), so a model that reads
neither (the default sasrec) never waits for an LLM pass, and their stand-ins do not depend on
`llm.base`: switching base models leaves `cf` up to date.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.context import lookup
from tca.errors import TcaError

# A model's side inputs (`CFModel.needs`) and the upstream artifact each is read from.
SIDE_INPUTS = {"text_emb": ("text_emb", "items.npy"), "user_profiles": ("profiles", "users.npy"), "item_profiles": ("profiles", "items.npy")}


def cf_reads(params: dict, stage: str) -> bool:
    """Whether cf.model's class (registered or module:Class) names an artifact of `stage` in its `needs`."""
    from tca.cf.registry import resolve  # imports torch: not at module level (`tca status`)

    return any(SIDE_INPUTS[need][0] == stage for need in resolve(lookup(params, "cf.model")).needs if need in SIDE_INPUTS)


def write_stand_in(out: Path, reason: str, tables: tuple[str, ...]) -> None:
    """Each `.npy` table as an empty float32 [0, 0] array and meta.json `needed: false`: loadable,
    instant, and the same bytes whatever `llm.base` is."""
    for name in tables:
        np.save(out / name, np.zeros((0, 0), np.float32))
    (out / "meta.json").write_text(json.dumps({"needed": False, "reason": reason}, indent=2) + "\n")


def skipped(folder: Path) -> str | None:
    """The reason an artifact is a stand-in, or None when it was computed."""
    meta = folder / "meta.json"
    if not meta.exists():
        return None
    doc = json.loads(meta.read_text())
    return None if doc.get("needed", True) else doc.get("reason", "skipped")


def check_computed(folder: Path, reader: str) -> None:
    """Refuse a stand-in: `reader` would otherwise train on empty tables. Through the runner this
    takes a class whose `needs` changed after the stage ran (its params did not)."""
    reason = skipped(folder)
    if reason is not None:
        raise TcaError(f"{folder} is a stand-in ({reason}), but {reader} reads it; "
                       f"recompute it with the same --set options: `tca run-stage {folder.name} --force --downstream`")
