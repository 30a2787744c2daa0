"""Packed item-window training (`tca.llm.packing`): rows supervise exactly the selected samples, the mask
is the item window, a one-target row equals the per-sample prompt, and the trainer trains packed."""
import json
from dataclasses import replace

import numpy as np
import polars as pl
import pytest
import torch

from tca.collab.tokenizer import CollabConfig, token_dist
from tca.collab.store import DistReader, DistWriter
from tca.llm.model import Inputs, ItemTargets, LoraSettings, encode, load_model, target_hidden
from tca.llm.losses import LossConfig, make_labels, position_losses
from tca.llm.packed_attention import key_blocks
from tca.llm.packing import encode_windows, pack_samples, prefix_histories, select_rows, slot_histories
from tca.llm.prompt import PromptBuilder
from tca.llm.train import Batcher, TrainConfig, Trainer
from tca.collab.trie import build_trie, target_ids

TITLES = ["", "Toy Story (1995)", "Toy Soldiers (1991)", "Fargo (1996)", "Heat (1995)", "Amélie (2001)", "Alien (1979)",
          "Aliens (1986)", "Casino (1995)", "Clueless (1995)", "Babe (1995)", "Braveheart (1995)", "Batman (1989)"]
N_ITEMS = len(TITLES) - 1
L = 3  # history_len of these samples


def user_samples(n_users: int, seed: int, history_len: int = L, min_history: int = L) -> pl.DataFrame:
    """Every sample of random users' sequences (as the data stage makes them: history = the previous
    `history_len` items, at least `min_history` of them)."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(n_users):
        seq = rng.integers(1, N_ITEMS + 1, rng.integers(min_history + 1, min_history + 12)).tolist()
        for j in range(min_history, len(seq)):
            rows.append({"user_id": user, "timestamp": 1000 * user + j, "history": seq[max(0, j - history_len):j], "item_id": seq[j]})
    frame = pl.DataFrame(rows, schema_overrides={"history": pl.List(pl.Int32), "item_id": pl.Int32})
    return frame.with_columns(sample_id=pl.Series(rng.permutation(frame.height)).cast(pl.Int64))


def supervised_pairs(windows) -> list[tuple]:
    """(history, target) of every supervised item, read back off the rows: the `window` items before it."""
    pairs = []
    starts = np.cumsum(windows.n_items) - windows.n_items
    for r, (s, n) in enumerate(zip(starts, windows.n_items)):
        items, sample, window = windows.item[s:s + n], windows.sample[s:s + n], windows.window[s:s + n]
        for j in np.flatnonzero(sample >= 0):
            pairs.append((tuple(items[j - window[j]:j]), int(items[j]), int(sample[j])))
    return pairs


@pytest.mark.parametrize("max_targets", [1, 4, 100])
@pytest.mark.parametrize("keep", [1.0, 0.6])
@pytest.mark.parametrize("history", [(L, L), (4, 2)])
def test_rows_supervise_exactly_the_selected_samples(max_targets, keep, history):
    """Whole splits, random subsets (chains break at every gap) and histories shorter than history_len."""
    samples = user_samples(9, seed=3, history_len=history[0], min_history=history[1])
    chosen = samples.sample(fraction=keep, seed=5, shuffle=True)
    windows = pack_samples(chosen, max_targets)
    got = sorted((h, t, int(chosen["sample_id"][s])) for h, t, s in supervised_pairs(windows))
    want = sorted((tuple(h), t, s) for h, t, s in chosen.select("history", "item_id", "sample_id").iter_rows())
    assert got == want
    assert windows.n_targets.max() <= max_targets
    if keep == 1.0 and max_targets == 100:  # a whole user's samples are one row
        assert len(windows.n_items) == samples["user_id"].n_unique()


def test_no_sample_outside_the_subset_is_supervised():
    train, later = user_samples(6, seed=1), user_samples(6, seed=2).with_columns(pl.col("sample_id") + 10_000)
    windows = pack_samples(train, 5)
    supervised = set(train["sample_id"].to_numpy()[windows.sample[windows.sample >= 0]].tolist())
    assert supervised == set(train["sample_id"].to_list()) and not supervised & set(later["sample_id"].to_list())


@pytest.fixture(scope="module")
def world(tokenizer):
    targets = target_ids(tokenizer, pl.Series(TITLES[1:]))
    item_targets = ItemTargets(np.arange(1, N_ITEMS + 1), targets)
    pieces = [[]] + [item_targets.get(np.array([i]))[0].tolist() for i in range(1, N_ITEMS + 1)]
    return {"builder": PromptBuilder(tokenizer, TITLES, targets=pieces), "targets": item_targets,
            "trie": build_trie(np.arange(1, N_ITEMS + 1), targets), "pad": tokenizer.pad_token_id}


def brute_force_mask(rows, builder, windows) -> np.ndarray:
    """Token by token: which block each token is in, which item it predicts, what it may see."""
    out = np.zeros(rows.mask.shape, dtype=bool)
    starts = np.cumsum(windows.n_items) - windows.n_items
    head = builder.piece_len[builder.HEAD]
    for r in range(len(windows.n_items)):
        items = windows.item[starts[r]:starts[r] + windows.n_items[r]]
        win = windows.window[starts[r]:starts[r] + windows.n_items[r]]
        block, pos = [-1] * head, head
        for j, item in enumerate(items):
            block += [j] * (builder.piece_len[item] + builder.piece_len[builder.SEP])
        n = len(block)
        for q in range(n):
            pred = block[min(q + 1, n - 1)]
            for k in range(q + 1):
                out[r, 0, q, k] = block[k] == -1 or (pred >= 0 and block[k] >= pred - win[pred])
        for q in range(n, rows.mask.shape[2]):
            out[r, 0, q, q] = True
    return out


def test_mask_is_the_item_window(world):
    samples = user_samples(3, seed=4)
    windows = pack_samples(samples, 4)
    rows = encode_windows(world["builder"], windows, world["pad"])
    np.testing.assert_array_equal(rows.mask.numpy(), brute_force_mask(rows, world["builder"], windows))
    # every target id is the token its target position predicts
    flat = rows.input_ids.flatten()
    np.testing.assert_array_equal(flat[rows.target_pos + 1].numpy(), rows.target.numpy())


def packed_losses(model, world, samples, windows, cfg):
    batcher = Batcher(world["builder"], world["targets"], world["trie"], None, cfg, 512, world["pad"])
    inputs, labels = batcher.packed(samples, windows)
    return position_losses(model.get_output_embeddings()(target_hidden(model, inputs)), labels, cfg)


def test_one_target_row_equals_the_per_sample_prompt(world, tiny_llama, tmp_path):
    """Same per-position losses and the same LoRA gradients as the items-format prompt of the sample."""
    tiny_llama(seed=1).save_pretrained(tmp_path / "m")
    samples = user_samples(4, seed=6)
    windows = pack_samples(samples, 1)  # one target per row: each row is exactly one sample's prompt + target
    cfg = LossConfig("ntp")
    grads = []
    for path in ("packed", "per_sample"):
        torch.manual_seed(0)
        model = load_model(tmp_path / "m", lora=LoraSettings(r=4, alpha=8, dropout=0.0))
        with torch.no_grad():  # LoRA B starts at 0: make the adapter matter
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        if path == "packed":
            losses = packed_losses(model, world, samples, windows, cfg)
            order = windows.sample[windows.sample >= 0]
        else:
            rows = samples[order]
            inputs = encode(world["builder"], world["targets"], rows["history"], rows["item_id"].to_numpy(), 512, world["pad"])
            labels = make_labels(inputs.target.numpy(), inputs.target_len, None, world["trie"], cfg)
            losses = position_losses(model.get_output_embeddings()(target_hidden(model, inputs)), labels, cfg)
        losses.sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        if path == "packed":
            reference = losses.detach()
        else:
            torch.testing.assert_close(losses.detach(), reference, rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def test_tokens_outside_a_window_do_not_reach_its_target(world, tiny_llama, tmp_path):
    """One layer: attention is the only path between tokens, so a target's logits are a function of
    its window alone (deeper layers carry older items through history states, see tca.llm.packing)."""
    tiny_llama(seed=2, num_hidden_layers=1).save_pretrained(tmp_path / "m")
    model = load_model(tmp_path / "m")
    samples = user_samples(1, seed=7).sort("timestamp")[:8]
    windows = pack_samples(samples, 100)
    cfg = LossConfig("ntp")
    with torch.no_grad():
        base = packed_losses(model, world, samples, windows, cfg)
        n_items = int(windows.n_items[0])
        targets = np.flatnonzero(windows.sample >= 0)

        def per_target(losses, w):  # the loss vector cut into one piece per target
            return np.split(losses, np.cumsum(world["targets"].get(w.item[targets])[1])[:-1])

        before = per_target(base, windows)
        for changed in range(n_items):
            other = replace(windows, item=windows.item.copy())
            other.item[changed] = other.item[changed] % N_ITEMS + 1  # another item (another title) at that place
            after = per_target(packed_losses(model, world, samples, other, cfg), other)
            for k, j in enumerate(targets):
                if changed < j - windows.window[j]:  # outside: equal up to rounding (a title of another length moves positions)
                    torch.testing.assert_close(after[k], before[k], rtol=1e-5, atol=1e-5)
                elif changed < j:  # inside its window: the change is seen
                    assert (after[k] - before[k]).abs().max() > 1e-3


@pytest.mark.parametrize("backbone, finetune", [("tallrec", "lora"), ("llara", "lora"), ("collm", "full")])
def test_trainer_trains_packed_rows(world, tiny_llama, tokenizer, tmp_path, host_syncs, backbone, finetune):
    """A packed run: every step's loss finite, the loss falls, q reaches the packed targets, resume is
    exact (LLaRA: its curriculum's draws too; CoLLM: the projector of a fully fine-tuned model); a
    micro-batch's forward and backward make no host sync."""
    tiny_llama(seed=0, initializer_range=0.3).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    samples = user_samples(5, seed=8)
    scores = torch.randn(samples.height, N_ITEMS + 1, generator=torch.Generator().manual_seed(0))
    writer = DistWriter(tmp_path / "dist.zarr", {"trie_hash": world["trie"].digest()})
    writer.append(samples["sample_id"].to_numpy(), token_dist(world["trie"], samples["item_id"].to_numpy(), scores, CollabConfig()))
    writer.close()
    cfg = TrainConfig(backbone=backbone, epochs=4, micro_batch=2, grad_accum=1, lr=5e-3 if finetune == "lora" else 1e-3,
                      eval_every=0, log_every=1, precision="fp32", packing="items", pack_targets=4, loss="tca", alpha=0.3,
                      checkpoint_every=3, finetune=finetune)
    builder, hybrid = (world["builder"], None) if backbone == "tallrec" else hybrid_world(world, tokenizer, backbone)

    def make(work):
        torch.manual_seed(cfg.seed)
        model = load_model(tmp_path / "m", lora=LoraSettings(r=4, alpha=8, dropout=0.0) if finetune == "lora" else None,
                           cf_dim=None if hybrid is None else hybrid.cf_dim, full=finetune == "full")
        batcher = Batcher(builder, world["targets"], world["trie"], DistReader(tmp_path / "dist.zarr", world["trie"]),
                          cfg.loss_config, cfg.max_len, world["pad"], hybrid)
        return Trainer(model, batcher, samples, None, cfg, work, log=lambda m: None)

    t = make(tmp_path / "a")
    assert t.n_units == len(pack_samples(samples, 4).n_items) < samples.height
    rows = t.order(0)[: t.step_size]
    units = t.micro_batches(rows)[0]
    inputs, labels = t.prepare(units)
    if hybrid is not None:
        inputs = t.batcher.fill(inputs, slot_histories(select_rows(t.windows, units)))
    with host_syncs() as syncs:
        t.micro_step(inputs, labels, int(t.target_len[rows].sum()))
    assert syncs.calls == [] and inputs.window_mask is not None
    t.optimizer.zero_grad()
    t.run()
    log = [r for r in map(json.loads, (tmp_path / "a" / "log.jsonl").read_text().splitlines()) if "loss" in r]
    losses = [r["loss"] for r in log]
    assert len(losses) == t.total_steps and np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    # resume: a run stopped after its checkpoint at step 3 continues to the same weights
    interrupted = make(tmp_path / "b")
    original, taken = interrupted.train_step, []

    def stop_after_three(rows, batches):
        if len(taken) == 3:
            raise KeyboardInterrupt
        taken.append(rows)
        return original(rows, batches)

    interrupted.train_step = stop_after_three
    with pytest.raises(KeyboardInterrupt):
        interrupted.run()
    t3 = make(tmp_path / "b")
    t3.run()
    for (n, p), (_, q) in zip(t.model.named_parameters(), t3.model.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_grad_checkpointing_gives_the_same_loss_and_gradients(world, tiny_llama, tokenizer, tmp_path, finetune):
    """train.grad_checkpointing recomputes activations in the backward; the loss and every trainable
    gradient stay the same (packed rows, so the 4-D mask goes through the recomputation too)."""
    tiny_llama(seed=3).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    samples = user_samples(3, seed=9)
    windows = pack_samples(samples, 5)
    results = []
    for checkpointing in (False, True):
        cfg = TrainConfig(precision="fp32", packing="items", loss="ntp", finetune=finetune, grad_checkpointing=checkpointing, eval_every=0)
        torch.manual_seed(0)
        model = load_model(tmp_path / "m", lora=None if finetune == "full" else LoraSettings(r=4, alpha=8, dropout=0.0),
                           full=finetune == "full")
        batcher = Batcher(world["builder"], world["targets"], world["trie"], None, cfg.loss_config, cfg.max_len, world["pad"])
        trainer = Trainer(model, batcher, samples, None, cfg, tmp_path / f"w{checkpointing}{finetune}", log=lambda m: None)
        model.train()
        inputs, labels = trainer.batcher.packed(samples, windows)
        loss = position_losses(model.get_output_embeddings()(target_hidden(model, inputs)), labels, cfg.loss_config).sum()
        loss.backward()
        uses = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, uses))
    (loss_off, grads_off, used_off), (loss_on, grads_on, used_on) = results
    assert not used_off and used_on
    assert loss_on == pytest.approx(loss_off, rel=1e-6)
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 5, 16, 1000])
def test_block_local_attention_equals_the_dense_mask(world, tiny_llama, tmp_path, chunk):
    """Packed rows cut into query chunks (tca.llm.packed_attention) give the dense-mask forward's losses and
    gradients: chunks of one token, chunks that split items, and one chunk longer than the rows."""
    tiny_llama(seed=4, num_attention_heads=4, num_key_value_heads=2).save_pretrained(tmp_path / "m")  # GQA: 2 heads a K/V head
    samples = user_samples(3, seed=10)
    windows = pack_samples(samples, 6)
    cfg = LossConfig("ntp")
    model = load_model(tmp_path / "m", lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    batcher = Batcher(world["builder"], world["targets"], world["trie"], None, cfg, 512, world["pad"])
    inputs, labels = batcher.packed(samples, windows)
    assert inputs.input_ids.shape[1] > 40
    results = []
    for blocks in (None, key_blocks(inputs.window_mask, chunk)):
        model.zero_grad(set_to_none=True)
        losses = position_losses(model.get_output_embeddings()(target_hidden(model, replace(inputs, key_blocks=blocks))), labels, cfg)
        losses.sum().backward()
        results.append((losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (dense, dense_grads), (block, block_grads) = results
    torch.testing.assert_close(block, dense, rtol=1e-5, atol=1e-5)
    for name in dense_grads:
        torch.testing.assert_close(block_grads[name], dense_grads[name], rtol=1e-4, atol=1e-6)
    if chunk < inputs.input_ids.shape[1]:  # the chunks read fewer keys than a row has
        blocks = key_blocks(inputs.window_mask, chunk)
        assert blocks.index.shape[2] < inputs.input_ids.shape[1]


def test_key_blocks_hold_exactly_the_keys_the_mask_allows(world):
    samples = user_samples(2, seed=11)
    rows = encode_windows(world["builder"], pack_samples(samples, 7), world["pad"])
    mask = rows.mask[:, 0]
    blocks = key_blocks(rows.mask, 8)
    B, T = mask.shape[:2]
    for b in range(B):
        for q in range(T):
            c, i = divmod(q, 8)
            seen = blocks.index[b, c][blocks.mask[b, c, i]]
            assert seen.tolist() == torch.nonzero(mask[b, q]).squeeze(1).tolist()


def assert_same_losses_and_gradients(model, padded: Inputs, joined: Inputs, labels, cfg: LossConfig) -> None:
    """The per-position losses and every trainable gradient of the two layouts of one micro-batch agree."""
    results = []
    for inputs in (padded, joined):
        model.zero_grad(set_to_none=True)
        losses = position_losses(model.get_output_embeddings()(target_hidden(model, inputs)), labels, cfg)
        losses.sum().backward()
        results.append((losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    assert results[0][1]
    for name in results[0][1]:
        torch.testing.assert_close(results[1][1][name], results[0][1][name], rtol=1e-4, atol=1e-6)


def test_concatenated_rows_equal_the_padded_rows(world, tiny_llama, tmp_path):
    """A micro-batch's rows run end to end as one unpadded sequence: every target's loss and the
    gradients are those of the right-padded batch of rows (no token attends across rows; positions
    restart per row, which a RoPE model could not tell from shifted ones)."""
    tiny_llama(seed=5).save_pretrained(tmp_path / "m")
    samples = user_samples(4, seed=12)
    windows = pack_samples(samples, 5)
    rows = encode_windows(world["builder"], windows, world["pad"])
    assert len(set(rows.lengths.tolist())) > 1  # rows of different lengths: the padded batch has padding
    cfg = LossConfig("ntp")
    model = load_model(tmp_path / "m", lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    padded = Inputs(rows.input_ids, torch.from_numpy((np.arange(rows.input_ids.shape[1]) < rows.lengths[:, None]).astype(np.int64)),
                    rows.target_pos, rows.target, rows.target_len, window_mask=rows.mask)
    batcher = Batcher(world["builder"], world["targets"], world["trie"], None, cfg, 512, world["pad"])
    joined, labels = batcher.packed(samples, windows)
    assert joined.input_ids.shape == (1, rows.lengths.sum())
    assert_same_losses_and_gradients(model, padded, joined, labels, cfg)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_unpadded_micro_batches_equal_the_padded_ones(world, tiny_llama, tmp_path, attention):
    """Per-sample prompts end to end without padding (`Batcher(unpadded=True)`, `tca.llm.packing.unpad`):
    every target's loss and the LoRA gradients are those of the right-padded micro-batch, through the
    chunked mask (sdpa) and the dense one (eager)."""
    tiny_llama(seed=6).save_pretrained(tmp_path / "m")
    rows = user_samples(3, seed=4, history_len=4, min_history=1).head(7)
    cfg = LossConfig("ntp")
    padded, labels = Batcher(world["builder"], world["targets"], world["trie"], None, cfg, 512, world["pad"])(rows)
    joined, joined_labels = Batcher(world["builder"], world["targets"], world["trie"], None, cfg, 512, world["pad"], unpadded=True)(rows)
    assert (padded.attention_mask == 0).any()  # prompts of different lengths: the padded batch has padding
    assert joined.input_ids.shape == (1, padded.n_tokens) and joined.n_tokens == padded.n_tokens
    torch.testing.assert_close(joined.target, padded.target)
    torch.testing.assert_close(joined_labels.gold, labels.gold)
    model = load_model(tmp_path / "m", lora=LoraSettings(r=4, alpha=8, dropout=0.0), attention=attention)
    assert_same_losses_and_gradients(model, padded, joined, labels, cfg)


def test_device_copies_reach_the_key_blocks(world):
    """The trainer moves (and on CUDA pins) a micro-batch with `on_tensors`: the chunked mask and key
    index of packed rows must travel with the rest."""
    from tca.llm.train import on_tensors

    cfg = LossConfig("ntp")
    batcher = Batcher(world["builder"], world["targets"], world["trie"], None, cfg, 512, world["pad"])
    samples = user_samples(2, seed=13)
    inputs, _ = batcher.packed(samples, pack_samples(samples, 5))
    seen = []
    on_tensors(inputs, lambda t: seen.append(t) or t)
    assert any(t is inputs.key_blocks.index for t in seen) and any(t is inputs.key_blocks.mask for t in seen)
    assert any(t is inputs.position_ids for t in seen)


def hybrid_world(world, tokenizer, backbone):
    """The items-format builder with the backbone's CF slots, and the frozen CF model that fills them."""
    from tca.cf.base import CFConfig
    from tca.cf.registry import build
    from tca.llm.hybrid_prompt import SLOTS, HybridPrompt

    pieces = [[]] + [world["targets"].get(np.array([i]))[0].tolist() for i in range(1, N_ITEMS + 1)]
    torch.manual_seed(3)
    cf = build(CFConfig(hidden=8, blocks=1, max_len=4), N_ITEMS)
    return PromptBuilder(tokenizer, TITLES, slots=SLOTS[backbone], targets=pieces), HybridPrompt(cf, backbone, (0.0, 0.5))


def hybrid_model(path, hybrid):
    torch.manual_seed(0)
    model = load_model(path, lora=LoraSettings(r=4, alpha=8, dropout=0.0), cf_dim=hybrid.cf_dim)
    with torch.no_grad():  # LoRA B starts at 0: make the adapter matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("backbone", ["llara", "collm"])
def test_hybrid_one_target_row_equals_its_per_sample_prompt(world, tiny_llama, tokenizer, tmp_path, backbone):
    """LLaRA / CoLLM packed: each item's slot after its target ids (CoLLM: a user slot ending each line
    break); a one-target row gives the losses and the LoRA and projector gradients of the sample's
    items-format hybrid prompt, its user slots showing the history's prefixes."""
    tiny_llama(seed=1).save_pretrained(tmp_path / "m")
    builder, hybrid = hybrid_world(world, tokenizer, backbone)
    samples = user_samples(4, seed=6)
    windows = pack_samples(samples, 1)
    order = windows.sample[windows.sample >= 0]
    cfg = LossConfig("ntp")
    batcher = Batcher(builder, world["targets"], world["trie"], None, cfg, 512, world["pad"], hybrid)
    results = []
    for path in ("packed", "per_sample"):
        model = hybrid_model(tmp_path / "m", hybrid)
        if path == "packed":
            inputs, labels = batcher.packed(samples, windows)
            histories = slot_histories(windows)
        else:
            inputs, labels = batcher.prepare(samples[order])
            histories = prefix_histories(samples[order]["history"])
        assert int((inputs.slot > 0).sum()) > 0 and int((inputs.slot < 0).sum()) == (len(histories) if backbone == "collm" else 0)
        inputs = batcher.fill(inputs, histories)  # progress 1: every prompt hybrid
        losses = position_losses(model.get_output_embeddings()(target_hidden(model, inputs)), labels, cfg)
        losses.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        assert any("cf_projector" in n for n in grads)
        results.append((losses.detach(), grads))
    (packed, g_packed), (single, g_single) = results
    torch.testing.assert_close(packed, single, rtol=1e-5, atol=1e-5)
    assert g_packed.keys() == g_single.keys()
    for name in g_packed:
        torch.testing.assert_close(g_packed[name], g_single[name], rtol=1e-4, atol=1e-6)


def test_user_slot_before_each_target_shows_its_sample_history():
    """CoLLM packed: the user slot ending the line break before a target shows exactly that sample's
    history (the slot after item i is the i-th, row-major); the tail's shows the whole row."""
    samples = user_samples(5, seed=9)
    windows = pack_samples(samples, 6)
    shown = slot_histories(windows).to_list()
    assert len(shown) == len(windows.item)
    targets = np.flatnonzero(windows.sample >= 0)
    assert all(targets >= 1)
    for j in targets:
        assert shown[j - 1] == samples["history"][int(windows.sample[j])].to_list()
    ends = np.cumsum(windows.n_items)
    for r, end in enumerate(ends):
        assert shown[end - 1] == windows.item[end - windows.n_items[r]:end].tolist()
    assert prefix_histories(pl.Series([[4, 5, 6]])).to_list() == [[4], [4, 5], [4, 5, 6]]


def test_llara_text_only_packed_rows_hide_their_slots(world, tiny_llama, tokenizer, tmp_path):
    """Before the curriculum starts every packed row is text-only: the targets' losses do not depend on
    the CF vectors; once it has ended, they do."""
    tiny_llama(seed=2).save_pretrained(tmp_path / "m")
    builder, hybrid = hybrid_world(world, tokenizer, "llara")
    hybrid.curriculum = (0.5, 0.5)
    samples = user_samples(3, seed=8)
    windows = pack_samples(samples, 4)
    cfg = LossConfig("ntp")
    batcher = Batcher(builder, world["targets"], world["trie"], None, cfg, 512, world["pad"], hybrid)
    inputs, labels = batcher.packed(samples, windows)
    model = hybrid_model(tmp_path / "m", hybrid)

    def losses(progress, scale):
        filled = batcher.fill(inputs, slot_histories(windows), progress)
        filled = replace(filled, slot_vectors=filled.slot_vectors * scale)
        with torch.no_grad():
            return position_losses(model.get_output_embeddings()(target_hidden(model, filled)), labels, cfg)

    torch.testing.assert_close(losses(0.0, 1.0), losses(0.0, 5.0), rtol=1e-5, atol=1e-5)
    assert (losses(1.0, 1.0) - losses(1.0, 5.0)).abs().max() > 1e-3
