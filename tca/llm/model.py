"""The LLM side of training: loading the base (+ LoRA), prompt + target ids as model inputs, and the
forward that applies the LM head only where a loss is taken.

Prompts come from `tca.llm.prompt.PromptBuilder` and targets (title + EOS) from the `trie` stage; they
are joined as ids, never as text, so the trained ids are exactly the trie's paths. Batches are
right-padded (a causal model's real tokens never attend to the padding after them), or joined into one
unpadded sequence with a chunked mask (`tca.llm.packing`: packed rows, and per-sample prompts on a CPU).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from tca.config import check_keys
from tca.errors import TcaError
from tca.llm.hybrid_prompt import PROJECTOR, Projector, input_embeds
from tca.llm.packed_attention import NAME as PACKED_SDPA, KeyBlocks
from tca.llm.prompt import PromptBuilder
from tca.ragged import concat_ranges, pad, ragged_index

PROJECTOR_FILE = "cf_projector.safetensors"  # beside a fully fine-tuned hybrid model's weights (`save_model`)


@dataclass(frozen=True)
class LoraSettings:
    """The `lora:` param section (peft's LoraConfig fields under shorter names)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    @classmethod
    def from_params(cls, section: dict) -> "LoraSettings":
        check_keys(cls, section, "lora")
        cfg = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in section.items()})
        if cfg.r < 1 or not cfg.alpha > 0 or not 0 <= cfg.dropout < 1 or not cfg.target_modules:
            raise TcaError(f"lora: r ({cfg.r}) must be >= 1, alpha ({cfg.alpha}) > 0, dropout ({cfg.dropout}) in [0, 1) "
                           f"and target_modules ({list(cfg.target_modules)}) not empty")
        return cfg


PRECISIONS = ("auto", "bf16", "fp32")
ATTENTION = ("sdpa", "eager", "flash_attention_2")  # llm.attn_implementation: transformers' names


def use_bf16(device: str | torch.device, precision: str = "auto", param: str = "train.precision") -> bool:
    """Whether to compute in bf16: `auto` picks it on a GPU that supports it (Ampere and later:
    `torch.cuda.is_bf16_supported()`) and on CPUs with native bf16 instructions (AVX512-BF16, AMX),
    where its matmuls run 2-3x faster than fp32 ones; elsewhere fp32. `param` names the setting in errors."""
    if precision not in PRECISIONS:
        raise TcaError(f"{param}: {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision == "bf16"
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def check_attention(name: str, device: str | torch.device, bf16: bool) -> None:
    """`llm.attn_implementation` is one this device, dtype and Python can run (a clear error if not)."""
    if name not in ATTENTION:
        raise TcaError(f"llm.attn_implementation: {name!r} is not one of {', '.join(ATTENTION)}")
    if name != "flash_attention_2":
        return
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        raise TcaError("llm.attn_implementation=flash_attention_2 needs the flash-attn package "
                       "(`pip install flash-attn --no-build-isolation`, CUDA only); or use sdpa")
    if torch.device(device).type != "cuda" or not bf16:
        raise TcaError(f"llm.attn_implementation=flash_attention_2 runs on a GPU in bf16 only (here: {device}, "
                       f"{'bf16' if bf16 else 'fp32'}); use sdpa or set the precision to bf16")


def load_model(model_dir: Path, adapter_dir: Path | None = None, device: str = "cpu", lora: LoraSettings | None = None,
               merge: bool = False, bf16: bool = False, cf_dim: int | None = None, attention: str = "sdpa",
               full: bool = False):
    """The base model from an HF dir (`model` stage: one safetensors file or shards), in eval mode, its
    weights read straight onto `device` in bf16 or fp32 (never a full fp32 copy in host memory first).

    - `adapter_dir`, `lora`, `merge`, `cf_dim`: see `prepare`.
    - `full`: every weight trainable (full fine-tuning), kept in fp32 whatever `bf16` says; with `cf_dim`, a
      fresh projector too. A fully fine-tuned hybrid model keeps its projector beside its weights
      (`save_model`): loading that folder with `cf_dim` (and neither adapter nor LoRA) reads it back.
    - `attention`: transformers' attention implementation for training and prompts (`ATTENTION`);
      `sdpa` loads as `tca.llm.packed_attention`'s (SDPA that also runs packed rows block-locally);
      the beam search swaps in its own (`tca.llm.beam_attention`) while it decodes.
    On CUDA, fp32 matmuls (the LoRA weights, an fp32 model) run on TF32 tensor cores.
    """
    from transformers import AutoModelForCausalLM

    if full and (adapter_dir is not None or lora is not None):
        raise ValueError("full fine-tuning takes neither an adapter nor a LoRA config")
    check_attention(attention, device, bf16)
    if torch.device(device).type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if bf16 and not full else torch.float32,
                                                 device_map=torch.device(device),
                                                 attn_implementation=PACKED_SDPA if attention == "sdpa" else attention)
    if full:
        return prepare(model, cf_dim=cf_dim).requires_grad_(True).eval()
    model = prepare(model, adapter_dir, lora, merge, cf_dim)
    if cf_dim is not None and adapter_dir is None and lora is None:
        load_projector(model, model_dir)
    return model


def save_model(model, folder: Path) -> None:
    """`save_pretrained`; a fully fine-tuned hybrid model's projector goes to its own file (`PROJECTOR_FILE`),
    as transformers would not load it back from the model's weights (a LoRA adapter keeps it, peft does)."""
    from peft import PeftModel
    from safetensors.torch import save_file

    projector = None if isinstance(model, PeftModel) else getattr(model, PROJECTOR, None)
    if projector is None:
        model.save_pretrained(folder)
        return
    model.save_pretrained(folder, state_dict={k: v for k, v in model.state_dict().items() if not k.startswith(PROJECTOR + ".")})
    save_file({k: v.contiguous() for k, v in projector.state_dict().items()}, Path(folder) / PROJECTOR_FILE)


def load_projector(model, model_dir: Path) -> None:
    """The projector `save_model` wrote beside a fully fine-tuned hybrid model, into `model`'s."""
    from safetensors.torch import load_file

    path = Path(model_dir) / PROJECTOR_FILE
    if not path.exists():
        raise TcaError(f"{model_dir} holds no {PROJECTOR_FILE}: it is not a fully fine-tuned hybrid model (llara, collm); rerun the train stage")
    getattr(model, PROJECTOR).load_state_dict(load_file(path))


def prepare(model, adapter_dir: Path | None = None, lora: LoraSettings | None = None, merge: bool = False,
            cf_dim: int | None = None):
    """A built base model (`load_model`'s, or one initialised from a config: bench/gpu.py) in eval mode, with:

    - `adapter_dir`: a saved LoRA adapter on top (for inference; `merge=True` folds it into the weights).
    - `lora`: a fresh trainable LoRA instead (for training; seed torch first for a reproducible init).
    - `cf_dim`: the model also carries the hybrid prompts' projector from CF vectors of this size
      (`tca.llm.hybrid_prompt`), trained, saved and loaded with the LoRA weights (peft's `modules_to_save`).
    Only the LoRA weights (and the projector) are trainable in the returned peft model; they stay fp32
    (peft's default), so train under `torch.autocast(..., dtype=torch.bfloat16)` when the model is bf16.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter_dir is not None and lora is not None:
        raise ValueError("pass either adapter_dir (a trained adapter) or lora (a fresh one), not both")
    if cf_dim is not None:
        model.add_module(PROJECTOR, Projector(cf_dim, model.config.hidden_size).to(model.device))
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
        if merge:
            model = model.merge_and_unload()
    elif lora is not None:
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
                            modules_to_save=None if cf_dim is None else [PROJECTOR], task_type="CAUSAL_LM")
        try:
            model = get_peft_model(model, config)
        except ValueError as err:  # e.g. a target module the architecture does not have
            raise TcaError(f"lora.target_modules={list(lora.target_modules)}: {err}") from err
    return model.eval()


class ItemTargets:
    """Every item's target ids (title + EOS, as the `trie` stage wrote them), looked up by item id."""

    def __init__(self, item_ids: np.ndarray, token_ids: pl.Series):
        item_ids = np.asarray(item_ids, dtype=np.int64)
        lengths = token_ids.list.len().to_numpy().astype(np.int64)
        self.length = np.zeros(item_ids.max(initial=0) + 1, dtype=np.int64)  # 0 = not an item
        self.start = np.zeros_like(self.length)
        self.length[item_ids] = lengths
        self.start[item_ids] = np.cumsum(lengths) - lengths
        self.ids = token_ids.explode().to_numpy().astype(np.int64)

    def get(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(flat target ids, length per item) of these items."""
        items = np.asarray(items, dtype=np.int64)
        known = (items >= 0) & (items < len(self.length))
        if not known.all() or (self.length[items] == 0).any():
            bad = items[~known][0] if not known.all() else items[self.length[items] == 0][0]
            raise TcaError(f"item {bad} has no target ids; rerun the trie stage on the current data")
        return self.ids[concat_ranges(self.start[items], self.length[items])], self.length[items]


@dataclass
class Inputs:
    """A batch of prompt + target ids and where its targets are: right-padded, or one joined sequence
    (`window_mask` / `key_blocks`, `position_ids`; `tca.llm.packing`)."""

    input_ids: torch.Tensor  # int64 [B, T]
    attention_mask: torch.Tensor  # int64 [B, T]
    target_pos: torch.Tensor  # int64 [N]: flat index b * T + t of the hidden state that predicts each target id
    target: torch.Tensor  # int64 [N]: the target ids, sample by sample
    target_len: np.ndarray  # int64 [B]
    slot: torch.Tensor | None = None  # int64 [B, T], hybrid prompts: item id at an item slot, -1 at the user slot, else 0
    slot_vectors: torch.Tensor | None = None  # float [S, d]: the CF vector of each slot, row-major (HybridPrompt.fill)
    window_mask: torch.Tensor | None = None  # bool [B, 1, T, T], packed rows (tca.llm.packing): query t may attend key s
    key_blocks: KeyBlocks | None = None  # the window mask by query chunks (tca.llm.packed_attention), for the sdpa models
    position_ids: torch.Tensor | None = None  # int64 [B, T], packed rows concatenated into one sequence (tca.llm.packing.concatenate)

    @property
    def n_tokens(self) -> int:
        """Real (non-pad) tokens the model reads: the unit of tokens/s."""
        return int(self.attention_mask.sum())

    def to(self, device) -> "Inputs":
        move = lambda t: None if t is None else t.to(device)
        return Inputs(self.input_ids.to(device), self.attention_mask.to(device), self.target_pos.to(device),
                      self.target.to(device), self.target_len, move(self.slot), move(self.slot_vectors), move(self.window_mask),
                      move(self.key_blocks), move(self.position_ids))


def encode(builder: PromptBuilder, targets: ItemTargets, history: pl.Series, items: np.ndarray, max_len: int,
           pad_id: int) -> Inputs:
    """Prompts of the histories (list column, oldest first) joined with the target ids of `items`.

    A sequence longer than `max_len` keeps only its newest history items that fit.
    """
    target, target_len = targets.get(items)
    hist = history.explode().drop_nulls().to_numpy().astype(np.int64)
    hist, hist_len = builder.fit(hist, history.list.len().to_numpy().astype(np.int64), max_len - target_len)
    prompts = builder.build(hist, hist_len)
    lengths = prompts.lengths + target_len
    row, col = ragged_index(lengths)
    in_prompt = col < prompts.lengths[row]
    prompt_at = np.where(in_prompt, np.repeat(np.cumsum(prompts.lengths) - prompts.lengths, lengths) + col, 0)
    target_at = np.where(in_prompt, 0, np.repeat(np.cumsum(target_len) - target_len - prompts.lengths, lengths) + col)
    flat = np.where(in_prompt, prompts.ids[prompt_at], target[target_at])
    ids = pad(flat, lengths, fill=pad_id)
    width = ids.shape[1]
    return Inputs(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(pad(np.ones_like(flat), lengths, fill=0)),
        target_pos=torch.from_numpy(row[~in_prompt] * width + col[~in_prompt] - 1),
        target=torch.from_numpy(target),
        target_len=target_len,
        slot=None if prompts.slot is None else torch.from_numpy(pad(np.where(in_prompt, prompts.slot[prompt_at], 0), lengths, fill=0)),
    )


def target_hidden(model, inputs: Inputs) -> torch.Tensor:
    """Final hidden states [N, d] at the positions that predict the target ids (the decoder runs on
    the whole sequence; only these rows ever meet the LM head). Hybrid prompts enter as embeddings,
    positions counted over the attended tokens (a masked-out slot takes none; packed rows: their own)."""
    if inputs.slot is None:
        tokens = {"input_ids": inputs.input_ids}
    else:
        tokens = {"inputs_embeds": input_embeds(model, inputs.input_ids, inputs.slot, inputs.slot_vectors)}
    if inputs.key_blocks is not None and model.config._attn_implementation == PACKED_SDPA:
        blocks = inputs.key_blocks
        out = model.get_decoder()(**tokens, attention_mask=blocks.mask, key_index=blocks.index,
                                  position_ids=inputs.position_ids, use_cache=False)
        return out.last_hidden_state.flatten(0, 1)[inputs.target_pos]
    if inputs.window_mask is not None:
        out = model.get_decoder()(**tokens, attention_mask=model_mask(model, inputs.window_mask),
                                  position_ids=inputs.position_ids, use_cache=False)
        return out.last_hidden_state.flatten(0, 1)[inputs.target_pos]
    if inputs.slot is not None:
        tokens["position_ids"] = (inputs.attention_mask.cumsum(1) - 1).clamp(min=0)
    mask = inputs.attention_mask
    if model.config._attn_implementation in ("sdpa", PACKED_SDPA):  # from [B, T], HF reads the mask back to see if it may skip it: a GPU wait per forward
        causal = torch.ones(mask.shape[1], mask.shape[1], dtype=torch.bool, device=mask.device).tril()
        mask = causal & mask.bool()[:, None, None, :]  # the same mask, built on the device
    out = model.get_decoder()(**tokens, attention_mask=mask, use_cache=False)
    return out.last_hidden_state.flatten(0, 1)[inputs.target_pos]


def model_mask(model, mask: torch.Tensor) -> torch.Tensor:
    """A boolean [B, 1, T, T] mask in the form the model's attention takes: SDPA and flex read booleans,
    the eager kernel adds the mask to its scores (0 where seen, the dtype's minimum elsewhere)."""
    if model.config._attn_implementation != "eager":
        return mask
    dtype = torch.get_autocast_dtype(mask.device.type) if torch.is_autocast_enabled(mask.device.type) else model.dtype
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def head_logits(model, hidden: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [N, V] over the vocabulary, or [N, len(columns)] over these token ids only (the LM head's
    rows are gathered first, so tokens outside `columns` cost nothing)."""
    head = model.get_output_embeddings()
    if columns is None:
        return head(hidden)
    bias = None if head.bias is None else head.bias[columns]
    return torch.nn.functional.linear(hidden, head.weight[columns], bias)
