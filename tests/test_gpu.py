"""On a CUDA device (`pytest -m gpu`; skipped without one): a training step there matches the same
step on the CPU within bf16 tolerance, and the beam search decodes the CPU's top-10 lists in fp32."""
from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from tca.collab.tokenizer import CollabConfig, token_dist
from tca.collab.store import DistReader, DistWriter
from tca.llm.evaluate import EvalConfig, recommend
from tca.llm.model import ItemTargets, LoraSettings, load_model
from tca.llm.losses import LossConfig
from tca.llm.prompt import PromptBuilder
from tca.llm.train import Batcher, batch_loss
from tca.collab.trie import build_trie, target_ids

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TITLES = ["", "Toy Story (1995)", "Toy Soldiers (1991)", "Fargo (1996)", "Heat (1995)", "Amélie (2001)", "Alien (1979)",
          "Aliens (1986)", "Casino (1995)", "Clueless (1995)", "Babe (1995)", "Braveheart (1995)", "Batman (1989)"]
N = len(TITLES) - 1


@pytest.fixture(scope="module")
def world(tokenizer, tmp_path_factory):
    """Prompt builder, trie, batcher (tca loss, q from random CF scores) and 8 samples."""
    rng = np.random.default_rng(0)
    targets = target_ids(tokenizer, pl.Series(TITLES[1:]))
    trie = build_trie(np.arange(1, N + 1), targets)
    samples = pl.DataFrame({"sample_id": np.arange(8), "history": [rng.integers(1, N + 1, 4).tolist() for _ in range(8)],
                            "item_id": rng.integers(1, N + 1, 8)})
    path = tmp_path_factory.mktemp("gpu") / "dist.zarr"
    writer = DistWriter(path, {"trie_hash": trie.digest()})
    scores = torch.randn(8, N + 1, generator=torch.Generator().manual_seed(0)) * 2
    writer.append(samples["sample_id"].to_numpy(), token_dist(trie, samples["item_id"].to_numpy(), scores, CollabConfig()))
    writer.close()
    builder = PromptBuilder(tokenizer, TITLES)
    batcher = Batcher(builder, ItemTargets(np.arange(1, N + 1), targets), trie, DistReader(path, trie), LossConfig(), 512, builder.pad_id)
    return {"builder": builder, "trie": trie, "batcher": batcher, "samples": samples}


def lora_grads(model_dir, world, device: str, bf16: bool, lora_state: dict | None):
    """(loss / target tokens, LoRA grads by name, LoRA weights) of one step; weights from `lora_state` if given."""
    torch.manual_seed(0)
    model = load_model(model_dir, device=device, lora=LoraSettings(r=4, alpha=8, dropout=0.0), bf16=bf16).train()
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, p in lora.items():
            if lora_state is None:  # B = 0 would leave A without a gradient: random B, the same on both devices
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
            else:
                p.copy_(lora_state[name])
    inputs, labels = world["batcher"](world["samples"])
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
        loss = batch_loss(model, inputs.to(device), labels.to(device), LossConfig()) / len(labels.gold)
    loss.backward()
    return loss.item(), {n: p.grad.float().cpu() for n, p in lora.items()}, {n: p.detach().cpu() for n, p in lora.items()}


def test_train_step_on_cuda_matches_cpu(tiny_model_dir, world):
    loss_cpu, grads_cpu, state = lora_grads(tiny_model_dir, world, "cpu", False, None)
    loss_cuda, grads_cuda, _ = lora_grads(tiny_model_dir, world, "cuda", True, state)
    assert loss_cuda == pytest.approx(loss_cpu, rel=1e-2)
    for name, g in grads_cpu.items():
        assert g.norm() > 0
        assert (grads_cuda[name] - g).norm() / g.norm() < 0.05, name  # bf16: ~3 significant digits per operation


def test_decoding_on_cuda_gives_the_cpu_top10_in_fp32(tiny_llama, tokenizer, tmp_path, world):
    model_dir = tmp_path / "peaky"  # larger weights: peaked next-token distributions, well-separated titles
    tiny_llama(seed=0, initializer_range=0.3).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    cfg = EvalConfig(num_beams=10, batch_size=4, precision="fp32")
    lists = {}
    for device in ("cpu", "cuda"):
        model = load_model(model_dir, device=device)
        torch.set_float32_matmul_precision("highest")  # load_model turned TF32 on for CUDA: fp32 proper here
        lists[device] = recommend(model, world["builder"], world["trie"], world["samples"]["history"], cfg)
    np.testing.assert_array_equal(lists["cuda"][0], lists["cpu"][0])
    np.testing.assert_allclose(lists["cuda"][1], lists["cpu"][1], rtol=1e-4, atol=1e-4)
