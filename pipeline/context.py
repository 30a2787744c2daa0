"""What the runner hands a stage: resolved params, where to read, where to write.

A stage module (``pipeline/stages/<name>.py``) defines:

- ``run(ctx: StageContext) -> None``: reads upstream artifacts through ``ctx.input(stage)``
  and writes its outputs *only* under ``ctx.out`` (a fresh temporary directory; the runner
  moves it to ``artifacts/<name>/`` once ``run`` returns, so a crash never leaves a
  half-written artifact).
- optionally ``external_deps(params: dict) -> list[Path]``: files outside ``artifacts/``
  that the stage reads (e.g. the raw data files a ``data.source`` param points to); their
  content hashes take part in staleness like any dep.
- optionally ``reads(params: dict) -> dict[str, list[str]]``: for a dep the stage reads only in part,
  the outputs it reads (e.g. eval reads one split of `subset`); only those take part in its
  staleness and run-cache key, so a change elsewhere in that dep does not rerun the stage (a
  larger test subset does not retrain the LLM). Other deps count whole.
- optionally ``inert(params: dict) -> dict[str, str]``: declared params (keys or whole sections) that these
  params make irrelevant to the stage's outputs, each with why (train: `tca.alpha` under `train.loss: ntp`);
  they stay out of its staleness and run-cache key, so setting one reruns nothing, and a `--set` of one
  is reported as changing nothing.
- optionally ``check_params(params: dict) -> None``: builds the typed config of every param section
  the stage reads (each config validates itself), raising TcaError on a bad value; the runner calls
  it for every stage before `run`, `--dry` or `status` does anything, so a new param slots in by
  being a field of its section's config.
- optionally ``inspect(artifact: Path, params: dict) -> str``: the human summary that
  ``tca inspect <name>`` prints.
- optionally ``merge(ctx: StageContext, shards: list[Path]) -> None``: the stage can be split by
  sample range (``tca run-stage NAME --shard i/n``: ``run`` then sees ``ctx.shard`` and covers only
  ``ctx.shard_range(...)``); ``merge`` joins the shards' outputs, in order, into ``ctx.out``
  exactly as one unsharded ``run`` would have written them (``tca merge NAME``).
- optionally ``DISTRIBUTED = True``: ``run`` may be launched on several processes (torchrun);
  every rank runs it, only rank 0's ``ctx.out`` is kept (see ``tca.llm.ddp``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


def lookup(params: dict, key: str) -> Any:
    """``lookup(p, "data.source")`` -> ``p["data"]["source"]``; KeyError names the key."""
    node: Any = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


@dataclass
class StageContext:
    name: str
    params: dict  # the full resolved param tree (defaults + --set overrides)
    out: Path  # temporary output directory, empty at start
    artifacts: Path  # artifacts root; upstream outputs live in artifacts/<stage>/
    device_request: str = "auto"  # --device: auto | cpu | cuda | cuda:1 ...
    shard: tuple[int, int] | None = None  # (i, n): this run computes shard i of n (`--shard i/n`)

    @property
    def device(self) -> str:
        """The torch device to use: a GPU when one is there and --device is auto; under torchrun,
        "cuda" is this rank's GPU (cuda:LOCAL_RANK)."""
        import torch  # here, not at the top: `tca status` must not pay for importing torch

        from tca.llm.ddp import World

        device = self.device_request
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return World.from_env().device(device)

    def shard_range(self, n: int, unit: int = 1) -> tuple[int, int]:
        """The rows [lo, hi) of n that this run covers: all, or shard i of n's contiguous share of
        whole blocks of `unit` rows (so a shard's batches are exactly those of an unsharded run)."""
        if self.shard is None:
            return 0, n
        i, count = self.shard
        blocks = -(-n // unit)
        if count > blocks:
            from tca.errors import TcaError

            raise TcaError(f"--shard {i}/{count}: `{self.name}` splits {n:,} rows into {blocks} block(s) of {unit}; use at most {blocks} shards")
        return i * blocks // count * unit, min(n, (i + 1) * blocks // count * unit)

    def param(self, key: str) -> Any:
        return lookup(self.params, key)

    def section(self, name: str) -> dict:
        """A whole param section (``ctx.section("data")``), ready for ``Config(**...)``."""
        return dict(lookup(self.params, name))

    def input(self, stage: str) -> Path:
        return self.artifacts / stage

    def log(self, msg: str) -> None:
        tqdm.write(f"[{self.name}] {msg}")

    def progress(self, iterable=None, total: int | None = None, desc: str = "", unit: str = "it"):
        """A progress bar labelled with the stage name (tqdm; silent when not a terminal is fine)."""
        return tqdm(iterable, total=total, desc=f"[{self.name}] {desc}".rstrip(), unit=unit, dynamic_ncols=True)
