"""`tca recommend`: what the trained LLM recommends after a history of titles, or after a user's
latest interactions, with the eval stage's beam search settings."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from pipeline.runner import Project


def history_of_titles(items, titles: list[str]) -> list[int]:
    """Item ids of titles as typed: an exact title, else the one title that contains the text (any case)."""
    import polars as pl

    from tca.errors import TcaError

    ids = []
    for text in titles:
        exact = items.filter(pl.col("title") == text)
        match = exact if exact.height else items.filter(pl.col("title").str.to_lowercase().str.contains(text.lower(), literal=True))
        if match.height != 1:
            shown = "; ".join(match["title"].head(5).to_list())
            raise TcaError(f"--history {text!r} matches {match.height} titles{': ' + shown if shown else ''}; "
                           "give the exact title (`tca inspect data` shows some)")
        ids.append(int(match["item_id"][0]))
    return ids


def history_of_user(data: Path, user: int, history_len: int) -> list[int]:
    """The user's latest `history_len` interactions: the history of their latest sample, then its item."""
    import polars as pl

    from tca.errors import TcaError

    samples = pl.concat([pl.scan_parquet(data / f"{split}.parquet") for split in ("train", "valid", "test")])
    latest = samples.filter(pl.col("user_id") == user).sort("timestamp", "sample_id").last().collect()
    if latest.height == 0:
        raise TcaError(f"--user {user}: no sample of that user in {data}; user ids are those of the data stage")
    return [*latest["history"][0].to_list(), int(latest["item_id"][0])][-history_len:]


def recommend(project: Project, titles: list[str], user: int | None, top_k: int) -> str:
    """The top-k titles and scores, as text, for the history given by titles or by a user id."""
    import polars as pl
    import torch

    from pipeline.stages.eval import eval_config, load_recommender, load_sid_recommender
    from pipeline.stages.train import SID_RECORD
    from tca.errors import TcaError
    from tca.llm.evaluate import recommend as rank
    from tca.sid.seq2seq import recommend_sids

    if bool(titles) == (user is not None):
        raise TcaError("give either --history TITLE (repeatable) or --user ID")
    for stage in ("data", "model", "trie"):
        project.artifact(stage)  # a clear error if one was never run
    data = project.artifacts / "data"
    items = pl.read_parquet(data / "items.parquet", columns=["item_id", "title"])
    history = history_of_titles(items, titles) if titles else history_of_user(data, user, project.params["data"]["history_len"])
    device = project.device if project.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    cfg, _ = eval_config(project.params, data)
    cfg = replace(cfg, num_beams=max(cfg.num_beams, top_k))
    histories = pl.Series([history], dtype=pl.List(pl.Int64))
    adapter = project.artifacts / "train" / "adapter"
    names = ["", *items.sort("item_id")["title"].to_list()]
    if (adapter / SID_RECORD).exists():  # tiger / letter: the T5 over semantic IDs
        model, sid_items, trie, record = load_sid_recommender(project.artifacts, device)
        ranked, scores = recommend_sids(model, sid_items, trie, histories, cfg, record["max_history"])
        prompts = f"{record['backbone']} T5 over SIDs, "
    else:
        model, builder, trie, names, hybrid = load_recommender(project.artifacts, project.params, device)
        ranked, scores = rank(model, builder, trie, histories, cfg, hybrid=hybrid)
        prompts = "" if hybrid is None else f"{hybrid.backbone} prompts, "
    lines = [f"history ({'user ' + str(user) + ', ' if user is not None else ''}oldest first):",
             *(f"    {names[i]}" for i in history),
             f"top {top_k} ({'adapter ' + str(adapter) if adapter.is_dir() else 'no trained adapter: the base model'}; {prompts}"
             f"{cfg.num_beams} beams, score = log-prob / length ** {cfg.length_penalty}):"]
    lines += [f"  {r + 1:>2}. {scores[0, r]:8.3f}  {names[i]}" for r, i in enumerate(ranked[0, :top_k]) if i > 0]
    return "\n".join(lines)
