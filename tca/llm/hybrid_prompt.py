"""Hybrid prompts of the LLaRA and CoLLM backbones: CF embeddings in the LLM's input.

The prompt builder leaves one placeholder token per CF slot (`PromptBuilder(slots=...)`):
- `llara` (Liao et al., SIGIR 2024): a slot after each history title, showing that item's CF
  embedding; a curriculum moves training from text-only to hybrid prompts.
- `collm` (Zhang et al., 2023): the same item slots plus a user slot showing the CF model's user
  representation (`encode_users` of the history).
A slot's input embedding is projector(CF vector): the frozen CF model gives the vectors (a gather
of its item table, one `encode_users` per batch), a trained MLP maps them to the LLM's hidden
size, and a masked scatter writes them over the placeholders' token embeddings, for the whole
batch at once. The projector is attached to the LLM as `cf_projector` and listed in peft's
`modules_to_save` (`tca.llm.model.load_model(cf_dim=...)`), so it is trained, checkpointed, saved in
the adapter file and merged like the LoRA weights; `save`/`load` here record which backbone
(slot layout) and which CF model it was trained with.

Text-only prompts of LLaRA's curriculum are the same sequences with their slots masked out of the
attention (positions counted without them): exactly the text prompt, batched with hybrid ones. In
packed rows (`train.packing: items`: `tca.llm.packing`) a text-only row hides its slots from every
other token the same way; the slots keep their positions.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import polars as pl
import torch
from torch import nn

from tca.cf.base import CFModel, pad_histories
from tca.errors import TcaError
from tca.llm.packed_attention import key_blocks

SLOTS = {"llara": ("item",), "collm": ("user", "item")}  # the hybrid backbones and the slots they add
PROJECTOR = "cf_projector"  # the projector's attribute name on the LLM (and in the adapter file)
RECORD = "hybrid.json"  # next to the adapter: backbone, CF model and dimension the projector expects


class Projector(nn.Sequential):
    """CF space [*, cf_dim] -> the LLM's input embedding space [*, hidden] (LLaRA's and CoLLM's MLP)."""

    def __init__(self, cf_dim: int, hidden: int):
        super().__init__(nn.Linear(cf_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))


def mix_ratio(progress: float, start: float, end: float) -> float:
    """LLaRA's curriculum: the share of hybrid prompts when `progress` (share of the optimizer steps
    done) of training is done: 0 until `start`, rising linearly to 1 at `end` (start = end: a step)."""
    if progress >= end:
        return 1.0
    return 0.0 if progress <= start else (progress - start) / (end - start)


class HybridPrompt:
    """The frozen CF model's side of the slots: which slots a backbone has and the CF vector each
    slot shows. The projector itself belongs to the LLM (see the module docstring)."""

    def __init__(self, cf: CFModel, backbone: str, curriculum: tuple[float, float] = (0.0, 1.0)):
        if backbone not in SLOTS:
            raise TcaError(f"train.backbone: {backbone!r} has no CF slots; hybrid backbones: {', '.join(SLOTS)}")
        self.cf, self.backbone, self.curriculum = cf.eval().requires_grad_(False), backbone, curriculum
        self.slots = SLOTS[backbone]
        with torch.no_grad():
            self.items = cf.item_embeddings().detach().float()  # [N+1, d]; frozen, so looked up once
        self.cf_dim = self.items.shape[1]

    def ratio(self, progress: float) -> float:
        """The share of hybrid prompts at this point of training (LLaRA's curriculum; CoLLM: always 1)."""
        return mix_ratio(progress, *self.curriculum) if self.backbone == "llara" else 1.0

    @torch.no_grad()
    def vectors(self, slot: torch.Tensor, histories: pl.Series | None) -> torch.Tensor:
        """CF vectors [S, d] of the slots of a padded batch (`slot` [B, T]: item id, -1 user, 0 no slot), in
        row-major slot order; `histories`: the history each user slot shows, oldest first, in the same order
        (per-sample prompts: each row's; the items format: `tca.llm.packing.slot_histories`)."""
        slot = slot.to(self.items.device)
        shown = slot[slot != 0]
        vectors = self.items[shown.clamp(min=0)]
        if "user" in self.slots:
            is_user = shown < 0
            if histories is None or len(histories) != int(is_user.sum()):
                raise ValueError(f"{int(is_user.sum())} user slots need as many histories, got {None if histories is None else len(histories)}")
            users = self.cf.encode_users(pad_histories(histories, self.cf.cfg.max_len).to(self.items.device)).float()
            vectors = vectors.index_put((is_user.nonzero()[:, 0],), users)
        return vectors

    def fill(self, inputs, histories: pl.Series, progress: float = 1.0):
        """A training batch (`tca.llm.model.Inputs` with its slot map) with its slots' CF vectors; before the
        curriculum's end, each sample (packed: each row) is text-only (its slots masked out) with probability
        1 - ratio, drawn from torch's RNG (which training checkpoints restore). `histories`: what each user
        slot shows (`vectors`)."""
        mask, ratio = inputs.attention_mask, self.ratio(progress)
        if inputs.window_mask is not None:
            return self._fill_packed(inputs, histories, ratio)
        if ratio < 1:
            text_only = torch.rand(len(mask)) >= ratio
            mask = mask.masked_fill(text_only[:, None] & (inputs.slot != 0), 0)
        return replace(inputs, attention_mask=mask, slot_vectors=self.vectors(inputs.slot, histories))

    def _fill_packed(self, inputs, histories: pl.Series, ratio: float):
        """Packed rows joined in one sequence (`tca.llm.packing.concatenate`): a text-only row's slots are
        keys no other token sees (each still sees itself, so no softmax row is empty)."""
        if ratio < 1:
            row = (inputs.position_ids[0] == 0).cumsum(0) - 1  # each token's row
            text_only = torch.rand(int(row[-1]) + 1) >= ratio
            hidden = text_only[row] & (inputs.slot[0] != 0)
            eye = torch.eye(len(row), dtype=torch.bool)
            mask = inputs.window_mask & ~hidden[None, None, None, :] | eye
            inputs = replace(inputs, window_mask=mask, key_blocks=key_blocks(mask))
        return replace(inputs, slot_vectors=self.vectors(inputs.slot, histories))

    def save(self, adapter_dir: Path) -> None:
        record = {"backbone": self.backbone, "cf_model": self.cf.cfg.model, "cf_dim": self.cf_dim}
        (Path(adapter_dir) / RECORD).write_text(json.dumps(record, indent=2) + "\n")

    @classmethod
    def load(cls, adapter_dir: Path, cf: CFModel) -> "HybridPrompt | None":
        """The slots an adapter was trained with, on this CF model; None for a text-only adapter."""
        path = Path(adapter_dir) / RECORD
        if not path.exists():
            return None
        record = json.loads(path.read_text())
        hybrid = cls(cf, record["backbone"])
        if (record["cf_model"], record["cf_dim"]) != (cf.cfg.model, hybrid.cf_dim):
            raise TcaError(f"{path}: the projector was trained on a {record['cf_model']} of dimension {record['cf_dim']}, "
                           f"the cf stage now holds a {cf.cfg.model} of dimension {hybrid.cf_dim}; rerun the train stage")
        return hybrid


def input_embeds(model, input_ids: torch.Tensor, slot: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Token embeddings [B, T, h] of `input_ids` with projector(vector) at the slots (`slot` != 0,
    row-major order as `HybridPrompt.vectors` returns them): one gather and one masked scatter."""
    tokens = model.get_input_embeddings()(input_ids)
    projected = getattr(model, PROJECTOR)(vectors.to(tokens.device)).to(tokens.dtype)
    return tokens.masked_scatter((slot != 0).to(tokens.device)[..., None], projected)
