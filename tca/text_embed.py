"""Offline text embeddings of item titles: mean-pooled, L2-normalized last hidden states of an HF model.

Text-aware recommenders (AlphaRec, RLMRec, TIGER's semantic ids) start from a fixed vector per
item title. We take it from the LLM the pipeline already has (`artifacts/model/`, SmolLM2-135M by
default), so nothing new is installed or downloaded: the model's last hidden states averaged over
the title's tokens (padding excluded), then scaled to unit length so dot products are cosines.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tca.ragged import concat_ranges, pad


@torch.no_grad()
def embed_texts(texts: list[str], model_dir: Path | str | None = None, batch_size: int = 64, device: str = "cpu",
                max_tokens: int = 128, model=None, tokenizer=None) -> np.ndarray:
    """float32 [len(texts), d]: each text's mean-pooled, L2-normalized last hidden state.

    Texts are batched in order of length (less padding); rows come back in the input order and do
    not depend on `batch_size` beyond float rounding. An already loaded `model` / `tokenizer` may be
    passed instead of loading them from `model_dir`. Texts are cut to `max_tokens` tokens; an
    empty text gets a zero vector (no information, orthogonal to everything).
    """
    from transformers import AutoModel, AutoTokenizer

    tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_dir)
    model = (model or AutoModel.from_pretrained(model_dir, dtype=torch.float32)).to(device).eval()
    ids = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_tokens)["input_ids"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = [x or [pad_id] for x in ids]
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    flat = np.concatenate([np.asarray(x, dtype=np.int64) for x in ids]) if ids else np.zeros(0, np.int64)
    starts = np.cumsum(lengths) - lengths
    order = np.argsort(lengths, kind="stable")
    out = np.zeros((len(ids), model.config.hidden_size), dtype=np.float32)
    for begin in range(0, len(order), batch_size):
        rows = order[begin : begin + batch_size]
        batch = torch.from_numpy(pad(flat[concat_ranges(starts[rows], lengths[rows])], lengths[rows], pad_id)).to(device)
        mask = torch.arange(batch.shape[1], device=device)[None, :] < torch.from_numpy(lengths[rows]).to(device)[:, None]
        result = model(input_ids=batch, attention_mask=mask.long(), output_hidden_states=True)
        hidden = result.hidden_states[-1].float()
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        out[rows] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
    out[[not t for t in texts]] = 0
    return out
