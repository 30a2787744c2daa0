"""Trie-constrained beam search against an exhaustive teacher-forced reference and Hugging Face
`generate` with a prefix-allowed-tokens function, on a tiny random Llama over the real tokenizer."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from pipeline.runner import Project
from pipeline.stages.eval import eval_config
from tca.llm.decode import DeviceTrie, Syncs, beam_search, excluded_rows, ranked_items
from tca.errors import TcaError
from tca.llm.hf_decode import hf_beam_search
from tca.llm.losses import LossConfig, make_labels, position_losses
from tca.llm.prompt import PromptBuilder
from tca.collab.trie import build_trie, target_ids

REPO = Path(__file__).resolve().parents[1]
MSL_TAU = 4.5  # the authors' MSL temperature (params/paper.yaml)

# titles that are prefixes of others ("Alien", "Jaws") and titles that differ only at their end
TITLES = ["Alien (1979)", "Alien", "Aliens (1986)", "Toy Story (1995)", "Toy Story 2 (1999)", "Fargo (1996)",
          "Heat (1995)", "Up (2009)", "Jaws (1975)", "Jaws", "Jaws 2 (1978)", "Babe (1995)", "Heat (1995) "]
HISTORIES = [[1, 4, 5, 6], [7], [3, 2, 8, 9, 10, 12, 13], [11, 11]]


@pytest.fixture(scope="module")
def catalog(tokenizer):
    targets = target_ids(tokenizer, pl.Series(TITLES))
    item_ids = np.arange(1, len(TITLES) + 1)
    builder = PromptBuilder(tokenizer, ["", *TITLES])
    prompts = builder.build(np.concatenate(HISTORIES), np.array([len(h) for h in HISTORIES]))
    return build_trie(item_ids, targets), targets.to_list(), prompts, builder


@pytest.fixture(scope="module")
def model(tiny_llama):
    return tiny_llama(seed=1, initializer_range=0.15)  # peaked distributions: well separated title scores


def title_log_probs(model, prompts, trie, targets, renormalize=False, tau=1.0) -> np.ndarray:
    """[prompts, items] summed log-probs of every item's title after every prompt, one teacher-forced
    forward per (prompt, title); with `renormalize`, each position's softmax of logits / tau runs over
    the trie children."""
    out = np.zeros((len(prompts.lengths), len(targets)))
    for row, prompt in enumerate(prompts.rows()):
        for col, target in enumerate(targets):
            ids = torch.tensor(np.concatenate([prompt, target[:-1]]))[None]
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, len(prompt) - 1 :].double() / (tau if renormalize else 1.0)
            nodes = trie.paths(np.array([target]))[0]
            for t, token in enumerate(target):
                support = trie.child_token[trie.child_ptr[nodes[t]] : trie.child_ptr[nodes[t] + 1]] if renormalize else slice(None)
                out[row, col] += (logits[t, token] - logits[t, support].logsumexp(0)).item()
    return out


def reference(log_probs: np.ndarray, targets, length_penalty=1.0) -> list[list[tuple[float, int]]]:
    """Per prompt, (score, item id) of every item, best first (ties: lower item id first)."""
    scores = log_probs / np.array([len(t) for t in targets]) ** length_penalty
    return [sorted(zip(row.tolist(), range(1, len(targets) + 1)), key=lambda s: (-s[0], s[1])) for row in scores]


@pytest.fixture(scope="module")
def exhaustive(model, catalog):
    trie, targets, prompts, _ = catalog
    return {renormalize: title_log_probs(model, prompts, trie, targets, renormalize) for renormalize in (False, True)}


def search(model, catalog, k, **kw) -> tuple[np.ndarray, np.ndarray]:
    """Ranked items [prompts, k] and their scores."""
    trie, _, prompts, _ = catalog
    leaves, scores = beam_search(model, prompts, DeviceTrie(trie, "cpu"), k, **kw)
    return ranked_items(trie, leaves.numpy(), scores.numpy(), k)


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("length_penalty", [1.0, 0.0, -0.5, 2.0])
@pytest.mark.parametrize("extra_beams", [0, 3])
def test_equals_exhaustive_reference_when_beams_cover_the_catalog(model, catalog, exhaustive, renormalize, length_penalty, extra_beams):
    targets = catalog[1]
    k = len(TITLES) + extra_beams
    items, scores = search(model, catalog, k, length_penalty=length_penalty, renormalize=renormalize)
    for row, ref in enumerate(reference(exhaustive[renormalize], targets, length_penalty)):
        assert items[row, : len(ref)].tolist() == [i for _, i in ref]
        np.testing.assert_allclose(scores[row, : len(ref)], [s for s, _ in ref], atol=1e-4, rtol=0)
        assert (items[row, len(ref) :] == 0).all() and np.isneginf(scores[row, len(ref) :]).all()


def test_renormalized_top10_at_msl_tau_equals_brute_force_ranking(model, catalog):
    """With MSL's tau 4.5, the 10 beams' list is the top 10 of every item ranked by its title's
    log-prob under softmax(z / 4.5) over the trie children, and tau changes that ranking."""
    trie, targets, prompts, _ = catalog
    brute = reference(title_log_probs(model, prompts, trie, targets, renormalize=True, tau=MSL_TAU), targets)
    items, scores = search(model, catalog, 10, renormalize=True, tau=MSL_TAU)
    assert items.tolist() == [[i for _, i in ref[:10]] for ref in brute]
    np.testing.assert_allclose(scores, [[s for s, _ in ref[:10]] for ref in brute], atol=1e-4, rtol=0)
    assert search(model, catalog, 10, renormalize=True)[0].tolist() != items.tolist()  # tau 1 ranks otherwise


def test_msl_training_loss_and_renormalized_decoding_use_the_same_distribution(model, catalog):
    """Each title's summed MSL loss (train.msl_tau) is minus its renormalized decoding score at the
    same tau (length penalty 0: the summed log-prob), for every prompt and item."""
    trie, targets, prompts, _ = catalog
    cfg = LossConfig("ntp", msl=True, msl_tau=MSL_TAU)
    lengths = np.array([len(t) for t in targets])
    labels = make_labels(np.concatenate(targets), lengths, None, trie, cfg)
    items, scores = search(model, catalog, len(TITLES), renormalize=True, tau=MSL_TAU, length_penalty=0.0)
    for row, prompt in enumerate(prompts.rows()):
        logits = []
        for target in targets:
            ids = torch.tensor(np.concatenate([prompt, target[:-1]]))[None]
            with torch.no_grad():
                logits.append(model(input_ids=ids).logits[0, len(prompt) - 1 :])
        z = torch.cat(logits).double()[:, labels.columns]
        loss = position_losses(z, labels, cfg).split(lengths.tolist())
        decoded = dict(zip(items[row].tolist(), scores[row].tolist()))
        np.testing.assert_allclose([-part.sum().item() for part in loss], [decoded[i] for i in range(1, len(TITLES) + 1)], atol=1e-4)


@pytest.mark.parametrize("backbone, msl, tau", [("msl", False, MSL_TAU), ("tallrec", True, MSL_TAU), ("tallrec", False, 1.0)])
def test_eval_stage_renormalizes_at_the_temperature_the_model_trained_with(backbone, msl, tau):
    params = Project(REPO, [f"train.backbone={backbone}", f"train.msl={str(msl).lower()}", f"train.msl_tau={MSL_TAU}",
                            "eval.renormalize=true", "eval.exclude_history=false"]).params
    assert eval_config(params, REPO / "no-data-needed")[0].tau == tau


@pytest.mark.parametrize("k", [2, 3, 5, len(TITLES)])  # with 1 beam, generate decodes greedily instead
@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
def test_equals_hf_generate_with_prefix_allowed_tokens(model, catalog, tokenizer, k, length_penalty):
    trie, targets, prompts, _ = catalog
    items, scores = search(model, catalog, k, length_penalty=length_penalty)
    hf_items, hf_scores = hf_beam_search(model, prompts, targets, list(range(1, len(TITLES) + 1)), tokenizer.eos_token_id,
                                         num_beams=k, length_penalty=length_penalty)
    for row in range(len(HISTORIES)):
        assert items[row][items[row] > 0].tolist() == hf_items[row]
        np.testing.assert_allclose(scores[row][items[row] > 0], hf_scores[row], atol=1e-4, rtol=0)


def test_follows_hf_early_stopping_where_it_misses_a_better_title(tiny_llama, catalog, tokenizer):
    """HF stops a sample once its best running beam, scored at its current length, cannot beat the
    worst finished title; with a length penalty a longer title can still do so. This peaked model hits
    that case: generate's list differs from the exhaustive top-k, and ours equals generate's."""
    trie, targets, prompts, _ = catalog
    peaked = tiny_llama(seed=0, initializer_range=1.0)
    items, scores = search(peaked, catalog, 5)
    hf_items, hf_scores = hf_beam_search(peaked, prompts, targets, list(range(1, len(TITLES) + 1)), tokenizer.eos_token_id, num_beams=5)
    exact = [[i for _, i in ref[:5]] for ref in reference(title_log_probs(peaked, prompts, trie, targets), targets)]
    assert items.tolist() == hf_items and items.tolist() != exact
    np.testing.assert_allclose(scores, hf_scores, atol=1e-4, rtol=0)


@pytest.mark.parametrize("k", [2, 5])
def test_a_batch_equals_each_prompt_alone(model, catalog, k):
    """Left padding (prompts of different lengths in one batch) and dropping finished samples from
    the batch change nothing."""
    trie, _, prompts, builder = catalog
    items, scores = search(model, catalog, k)
    for row, history in enumerate(HISTORIES):
        alone = builder.build(np.array(history), np.array([len(history)]))
        leaves, s = beam_search(model, alone, DeviceTrie(trie, "cpu"), k)
        one_items, one_scores = ranked_items(trie, leaves.numpy(), s.numpy(), k)
        assert one_items[0].tolist() == items[row].tolist()
        np.testing.assert_allclose(one_scores[0], scores[row], atol=1e-5)


def test_no_beam_leaves_the_trie_under_adversarial_logits(tiny_llama, catalog, tokenizer):
    """Huge logits on EOS and on an off-trie token: a search that ever let a beam leave the trie, or
    end a title early, would return it."""
    trie, targets, prompts, _ = catalog
    off_trie = int(np.setdiff1d(np.arange(100, 200), trie.child_token)[0])
    boost = torch.zeros(len(tokenizer))
    boost[off_trie], boost[tokenizer.eos_token_id] = 50.0, 30.0
    spy = tiny_llama(seed=1, initializer_range=0.15)
    spy.lm_head.register_forward_hook(lambda module, args, out: out + boost)
    for k in (3, len(TITLES)):
        leaves, _ = beam_search(spy, prompts, DeviceTrie(trie, "cpu"), k)
        assert (leaves >= 0).all() and trie.is_leaf(leaves.numpy()).all()  # complete titles only
        for row in leaves.numpy():
            assert len(set(row.tolist())) == k  # never the same title twice
    # and the full lists still equal the exhaustive reference (EOS counts only where a title ends)
    leaves, scores = beam_search(spy, prompts, DeviceTrie(trie, "cpu"), len(TITLES))
    items, _ = ranked_items(trie, leaves.numpy(), scores.numpy(), len(TITLES))
    assert items.tolist() == [[i for _, i in ref] for ref in reference(title_log_probs(spy, prompts, trie, targets), targets)]


def test_ranked_items_expands_a_leaf_shared_by_equal_titles():
    targets = pl.Series([[5, 2], [5, 2], [5, 6, 2], [7, 2]], dtype=pl.List(pl.Int32))
    trie = build_trie(np.array([9, 4, 3, 8]), targets)
    leaf = trie.paths(np.array([[5, 2], [5, 6], [7, 2]]))[:, 2]
    leaf[1] = trie.step(leaf[1:2], [2])[0]
    leaves = np.array([[leaf[0], leaf[2], -1], [leaf[1], leaf[0], leaf[2]]])
    scores = np.array([[-1.0, -2.0, -np.inf], [-0.5, -1.5, -3.0]], dtype=np.float32)
    items, item_scores = ranked_items(trie, leaves, scores, 3)
    assert items.tolist() == [[4, 9, 8], [3, 4, 9]]  # equal titles: both items, lower id first, then cut at k
    assert item_scores.tolist() == [[-1.0, -1.0, -2.0], [-0.5, -1.5, -1.5]]
    items, item_scores = ranked_items(trie, leaves[:, :1], scores[:, :1], 4)
    assert items.tolist() == [[4, 9, 0, 0], [3, 0, 0, 0]] and np.isneginf(item_scores[1, 1:]).all()


def test_refuses_attention_it_does_not_implement(tiny_llama, catalog):
    trie, _, prompts, _ = catalog
    model = tiny_llama(seed=0)
    model.config.sliding_window = 16  # shorter than the prompts
    with pytest.raises(TcaError, match="sliding window"):
        beam_search(model, prompts, DeviceTrie(trie, "cpu"), 2)
    assert model.config._attn_implementation == "sdpa"  # left as it was


@pytest.mark.parametrize("renormalize", [False, True])
def test_excluding_history_ranks_every_other_item_as_brute_force(model, catalog, tokenizer, renormalize):
    """With `excluded`, no list holds a history item; with as many beams as items the ranking is the
    exhaustive ranking of every non-history item. Item 14 shares item 7's title (one leaf, two items):
    excluding one of them keeps the other."""
    _, _, prompts, _ = catalog
    targets = target_ids(tokenizer, pl.Series([*TITLES, TITLES[6]]))
    trie = build_trie(np.arange(1, len(TITLES) + 2), targets)
    histories = [[1, 4, 5, 6], [7], [3, 2, 8, 9, 10, 12, 13], [11, 11]]  # the prompts' own histories
    flat, lengths = np.concatenate(histories), np.array([len(h) for h in histories])
    k = len(TITLES) + 1
    leaves, scores = beam_search(model, prompts, DeviceTrie(trie, "cpu"), k, renormalize=renormalize,
                                 excluded=excluded_rows(trie, flat, lengths))
    items, item_scores = ranked_items(trie, leaves.numpy(), scores.numpy(), k, (flat, lengths))
    builder = catalog[3]
    for row, hist in enumerate(histories):
        # the reference: the catalog without the row's history items (renormalize: over the children left)
        keep = [i for i in range(1, len(TITLES) + 2) if i not in hist]
        kept_targets = [targets[i - 1] for i in keep]
        row_trie = build_trie(np.array(keep), pl.Series(kept_targets))
        log_probs = title_log_probs(model, builder.build(np.array(hist), np.array([len(hist)])), row_trie, kept_targets, renormalize)
        allowed = [(s, keep[i - 1]) for s, i in reference(log_probs, kept_targets)[0]]
        got = items[row][items[row] > 0]
        assert not set(got.tolist()) & set(hist)
        assert got.tolist() == [i for _, i in allowed]
        np.testing.assert_allclose(item_scores[row][items[row] > 0], [s for s, _ in allowed], atol=1e-4, rtol=0)
    assert 14 in items[1] and 7 not in items[1]
    # with few beams, none is spent on a history item: every list is full
    few, _ = beam_search(model, prompts, DeviceTrie(trie, "cpu"), 3, renormalize=renormalize, excluded=excluded_rows(trie, flat, lengths))
    few_items, _ = ranked_items(trie, few.numpy(), np.zeros(few.shape), 3, (flat, lengths))
    assert (few_items > 0).all() and not any(set(r) & set(h) for r, h in zip(few_items.tolist(), histories))


def test_host_syncs_counter_sees_every_kind_of_read_back(host_syncs):
    """The counter the sync tests rely on records value reads, data-dependent shapes and copies to the host."""
    x = torch.arange(6.0)
    with host_syncs() as syncs:
        y = (x * 2).topk(3).values + x[torch.tensor([0, 1, 2])]  # device-side work only
        bool(x[0] > 1), x[1].item(), x.tolist(), x.nonzero(), x[x > 2], torch.where(x > 1), int(x[2]), x.cpu()
        torch.repeat_interleave(x, torch.ones(6, dtype=torch.long))
        x[x > 3] = 0
    assert syncs.calls == ["__bool__", "item", "tolist", "nonzero", "__getitem__", "where", "__int__", "cpu", "repeat_interleave", "__setitem__"]
    assert y.shape == (3,)


@pytest.mark.parametrize("renormalize, exclude", [(False, False), (True, True)])
def test_search_steps_never_read_back_from_the_device(model, catalog, tokenizer, host_syncs, renormalize, exclude):
    """With the GPU's policy (fixed shapes, a check every 4 steps) the only host syncs of a whole search
    are those checks; with no check at all (every step runs to the deepest title) there are none, from
    the prompt forward to the last step. The lists equal the CPU policy's (check every step, finished
    samples leave the batch)."""
    trie, _, prompts, _ = catalog
    dtrie, k = DeviceTrie(trie, "cpu"), 5
    excluded = excluded_rows(trie, np.concatenate(HISTORIES), np.array([len(h) for h in HISTORIES])) if exclude else None
    runs = {}
    for syncs in (Syncs(1, True), Syncs(4, False), Syncs(10**6, False)):
        with host_syncs() as seen:
            runs[syncs] = beam_search(model, prompts, dtrie, k, renormalize=renormalize, excluded=excluded, syncs=syncs)
        if not syncs.shrink:
            assert seen.calls == ["__bool__"] * len(seen.calls) and len(seen.calls) <= dtrie.max_depth // syncs.check_every
    assert Syncs.default(torch.device("cpu")) == Syncs(1, True)
    for leaves, scores in list(runs.values())[1:]:
        assert torch.equal(leaves, runs[Syncs(1, True)][0])
        torch.testing.assert_close(scores, runs[Syncs(1, True)][1], rtol=0, atol=1e-5)
    assert (runs[Syncs(1, True)][0] >= 0).all()


def test_device_trie_branching_bounds_every_node_of_its_depth(catalog):
    trie = catalog[0]
    dtrie = DeviceTrie(trie, "cpu")
    depth, count = trie.depths(), np.diff(trie.child_ptr)
    assert len(dtrie.branching) == dtrie.max_depth == depth.max()
    for d in range(dtrie.max_depth):
        assert dtrie.branching[d] == count[depth == d].max()
    assert dtrie.branching[0] == count[0] > 1


def test_grouped_query_attention_equals_exhaustive_reference(tiny_llama, catalog):
    """4 query heads sharing 2 key/value heads (Llama-3, Qwen2.5): the prefill expands K/V to every
    head, the decode steps score each group's heads as extra query rows; the lists stay exact."""
    trie, targets, prompts, _ = catalog
    gqa = tiny_llama(seed=1, initializer_range=0.15, num_attention_heads=4, num_key_value_heads=2)
    items, scores = search(gqa, catalog, len(TITLES))
    for row, ref in enumerate(reference(title_log_probs(gqa, prompts, trie, targets), targets)):
        assert items[row].tolist() == [i for _, i in ref]
        np.testing.assert_allclose(scores[row], [s for s, _ in ref], atol=1e-4, rtol=0)
