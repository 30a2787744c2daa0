"""The `data` stage: k-core, history and split rules against plain-Python references, the raw
readers on fixtures in the real file formats, every bad-input error, and ml-100k end to end."""
from __future__ import annotations

import gzip
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipeline.context import StageContext
from pipeline.stages import data as data_stage
from tca.data import DataConfig, RawData, build, parse, prepare, read
from tca.data import titles
from tca.data.process import kcore
from tca.errors import TcaError

LOOSE = dict(min_item_interactions=1, min_user_interactions=1, min_history=1, history_len=3)


# ---------- plain-Python references ----------

def brute_kcore(rows, min_item, min_user):
    """Remove one violating user or item at a time; the k-core is the unique fixed point."""
    rows = list(rows)
    while True:
        items, users = Counter(r[1] for r in rows), Counter(r[0] for r in rows)
        bad = next((r for r in rows if items[r[1]] < min_item or users[r[0]] < min_user), None)
        if bad is None:
            return rows
        if items[bad[1]] < min_item:
            rows = [r for r in rows if r[1] != bad[1]]
        else:
            rows = [r for r in rows if r[0] != bad[0]]


def reference(interactions, items, cfg):
    """Every rule of DESIGN "Data" for already clean titles; where build must raise, the start of its message."""
    title_of = {}
    for raw, title in items:
        if raw not in title_of and title.lower() not in ("", "unknown"):
            title_of[raw] = title
    key_of = {raw: title if cfg.merge_duplicate_titles else raw for raw, title in title_of.items()}
    events = {(user, key_of[item], t) for user, item, t in interactions if item in key_of}
    if events and cfg.max_months:
        newest = max(t for _, _, t in events)
        events = {e for e in events if e[2] > newest - cfg.max_months * 30 * 24 * 3600}
    events = brute_kcore(events, cfg.min_item_interactions, cfg.min_user_interactions)
    if not events:
        return "the k-core filter"
    order = sorted(events, key=lambda e: (e[2], e[0], e[1]))
    user_id, item_id = {}, {}
    for user, key, _ in order:
        user_id.setdefault(user, len(user_id) + 1)
        item_id.setdefault(key, len(item_id) + 1)
    seen, samples = defaultdict(list), []
    for user, key, t in order:
        past = seen[user]
        if len(past) >= cfg.min_history:
            samples.append((len(samples), user_id[user], past[-cfg.history_len:], item_id[key], t))
        past.append(item_id[key])
    n = len(samples)
    if n == 0:
        return f"no interaction has data.min_history={cfg.min_history} earlier interactions"
    splits = samples[:n * 8 // 10], samples[n * 8 // 10:n * 9 // 10], samples[n * 9 // 10:]
    if not all(splits):
        return f"only {n} samples, too few for an 8:1:1 split"
    raw_ids = defaultdict(list)
    for raw, key in key_of.items():
        if key in item_id:
            raw_ids[item_id[key]].append(raw)
    counts = Counter(item_id[key] for _, key, _ in order)
    table = [(i, title_of[min(raw_ids[i])], sorted(raw_ids[i]), counts[i]) for i in sorted(raw_ids)]
    return table, splits


@given(rows=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), max_size=80),
       min_item=st.integers(1, 4), min_user=st.integers(1, 4))
@settings(max_examples=150, deadline=None)
def test_kcore_matches_brute_force(rows, min_item, min_user):
    frame = pl.DataFrame({"u": [r[0] for r in rows], "i": [r[1] for r in rows], "timestamp": range(len(rows))},
                         schema={"u": pl.Int64, "i": pl.Int64, "timestamp": pl.Int64})
    got = kcore(frame, min_item, min_user).rows()
    want = brute_kcore([(u, i, t) for t, (u, i) in enumerate(rows)], min_item, min_user)
    assert sorted(got) == sorted(want)
    for n, what in ((min_item, "i"), (min_user, "u")):  # and it is a k-core
        assert all(c >= n for c in Counter(r[what == "i"] for r in got).values())


def random_raw(seed: int) -> tuple[list, list]:
    """Small data with timestamp ties, exact duplicates, shared titles, a placeholder and an untitled
    item, over ~10 months (times are multiples of 10 days)."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(40, 160))
    interactions = [(f"u{rng.integers(0, 12):02d}", f"i{rng.integers(0, 14):02d}", int(rng.integers(0, 30)) * 864_000)
                    for _ in range(n)]
    interactions += interactions[:5]  # exact duplicates
    names = ["Alpha", "Beta", "Gamma", "Alpha", "Delta", "unknown", "Eps", "Beta", "Zeta", "Eta", "Theta", "Iota",
             "Kappa"]
    items = [(f"i{k:02d}", name) for k, name in enumerate(names)]  # i13 has no title at all
    return interactions, items


@given(seed=st.integers(0, 10**6), merge=st.booleans(), min_history=st.integers(1, 4),
       history_len=st.integers(1, 4), max_months=st.sampled_from([0, 2, 5, 9]))
@example(seed=2959, merge=False, min_history=1, history_len=2, max_months=0)  # the k-core removes everything
@example(seed=81, merge=False, min_history=4, history_len=2, max_months=0)  # no user has 4 earlier interactions
@example(seed=23, merge=False, min_history=4, history_len=2, max_months=0)  # 4 samples: an empty valid split
@settings(max_examples=40, deadline=None)
def test_build_matches_python_reference(seed, merge, min_history, history_len, max_months):
    interactions, items = random_raw(seed)
    cfg = DataConfig(merge_duplicate_titles=merge, min_item_interactions=2, min_user_interactions=3,
                     min_history=min_history, history_len=history_len, max_months=max_months)
    raw = RawData(pl.DataFrame(interactions, schema=["user", "item", "timestamp"], orient="row"),
                  pl.DataFrame(items, schema=["raw_id", "title"], orient="row"))
    want = reference(interactions, items, cfg)
    if isinstance(want, str):
        with pytest.raises(TcaError, match=f"^{re.escape(want)}"):
            build(raw, cfg)
        return
    dataset = build(raw, cfg)
    table, splits = want
    assert dataset.items.rows() == table
    for name, rows in zip(("train", "valid", "test"), splits):
        assert dataset.splits[name].rows() == [tuple(r) for r in rows]
    assert dataset.stats["items"] == len(table)
    assert dataset.stats["interactions"] == sum(r[3] for r in table)
    for name, rows in zip(("train", "valid", "test"), splits):  # share of samples whose target is in its history
        assert dataset.stats["repeat_rate"][name] == pytest.approx(np.mean([r[3] in r[2] for r in rows]) if rows else 0.0)


# ---------- titles ----------

def test_clean_titles():
    raw = pl.Series(["Tom &amp; Jerry&#39;s  Set", " a\t\nb\u00a0c ", None, "x" * 300, "&lt;3 &quot;Q&quot;", "Fish & Chips"])
    assert titles.clean(raw, 120).to_list() == ["Tom & Jerry's Set", "a b c", "", "x" * 120, '<3 "Q"', "Fish & Chips"]
    assert titles.clean(pl.Series(["abc def"]), 4).to_list() == ["abc"]  # no trailing space after the cut
    assert titles.usable(pl.Series(["", "Unknown", "N/A", "ok"])).to_list() == [False, False, False, True]


# ---------- Amazon 2018 reader ----------

def review(user, asin, t):
    """One line of the real 2018 review files (fields in their order)."""
    return {"overall": 5.0, "verified": True, "reviewTime": "10 17, 2015", "reviewerID": user, "asin": asin,
            "style": {"Format:": " Hardcover"}, "reviewerName": "Some Name", "reviewText": "Great, \"really\".",
            "summary": "Five Stars", "unixReviewTime": t, "vote": "2"}


def meta(asin, **title):
    """One line of the real 2018 meta files; `title` may be left out, as some lines do."""
    return {"category": ["Toys & Games"], "tech1": "", "description": ["A toy."], "fit": "", **title,
            "also_buy": ["B000000000"], "image": [], "tech2": "", "brand": "Acme", "feature": [],
            "rank": "1,234 in Toys & Games (", "also_view": [], "main_cat": "Toys &amp; Games",
            "similar_item": "", "date": "", "price": "$9.99", "asin": asin}


LONG = "Deluxe Wooden Train Set " * 30
META = [meta("B00", title="Magna-Tiles &amp; Friends  32 Piece\tSet"), meta("B01"), meta("B02", title=LONG),
        meta("B03", title=""), meta("B03", title="Rubik&#39;s Cube"), meta("B04", title="Rubik's Cube"),
        meta("B05", title="unknown"), meta("B99", title="Never Reviewed")]
REVIEWS = [review(f"A{u}", f"B0{k}", 1_400_000_000 + 1000 * u + 10 * k) for u in range(4) for k in range(6)]


def write_lines(path: Path, lines: list[str]) -> Path:
    text = "".join(line + "\n" for line in lines)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def write_amazon(folder: Path, suffix: str, reviews=REVIEWS, metas=META, bad_at: int | None = None):
    lines = [json.dumps(r) for r in reviews]
    if bad_at is not None:  # a truncated line, as a cut download leaves
        lines.insert(bad_at - 1, '{"overall": 4.0, "verified": true, "reviewerID": "AX", "asin": "B0')
    r = write_lines(folder / f"reviews.json{suffix}", lines)
    m = write_lines(folder / f"meta.json{suffix}", [json.dumps(x) for x in metas])
    return r, m


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_amazon_reader(tmp_path, suffix):
    r, m = write_amazon(tmp_path, suffix)
    raw = read(parse(f"amazon2018:{r}:{m}"), "error")
    assert raw.interactions.rows() == [(x["reviewerID"], x["asin"], x["unixReviewTime"]) for x in REVIEWS]
    assert raw.bad_lines == 0
    dataset = prepare(DataConfig(source=f"amazon2018:{r}:{m}", **LOOSE))
    got = {tuple(row["raw_ids"]): row["title"] for row in dataset.items.iter_rows(named=True)}
    assert got == {("B00",): "Magna-Tiles & Friends 32 Piece Set", ("B02",): LONG[:120].strip(),
                   ("B03", "B04"): "Rubik's Cube"}  # B01 has no title, B05 a placeholder
    assert dataset.stats["interactions"] == 4 * 4  # B03 and B04 are one item now, reviewed at distinct times


def test_amazon_unmerged_titles_stay_apart(tmp_path):
    r, m = write_amazon(tmp_path, ".gz")
    dataset = prepare(DataConfig(source=f"amazon2018:{r}:{m}", merge_duplicate_titles=False, **LOOSE))
    assert dataset.items.filter(pl.col("title") == "Rubik's Cube")["raw_ids"].to_list() == [["B03"], ["B04"]]


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_amazon_malformed_line(tmp_path, suffix):
    r, m = write_amazon(tmp_path, suffix, bad_at=7)
    with pytest.raises(TcaError, match=r"line 7\b.*data\.on_bad_line=skip") as err:
        read(parse(f"amazon2018:{r}:{m}"), "error")
    assert str(r) in str(err.value)
    raw = read(parse(f"amazon2018:{r}:{m}"), "skip")
    assert raw.bad_lines == 1 and raw.interactions.height == len(REVIEWS)
    dataset = prepare(DataConfig(source=f"amazon2018:{r}:{m}", on_bad_line="skip", **LOOSE))
    assert dataset.stats["bad_lines_skipped"] == 1


def test_amazon_bad_field_values_are_bad_lines(tmp_path):
    """Valid JSON with a non-numeric time is a bad line; an array where a string belongs sends the
    reader to its slow path, which keeps the array's JSON text as the id."""
    reviews = REVIEWS[:3] + [{**REVIEWS[3], "unixReviewTime": "soon"}, {**REVIEWS[4], "asin": ["B00"]}]
    r, m = write_amazon(tmp_path, "", reviews=reviews)
    with pytest.raises(TcaError, match=r"line 4\b.*\(1 such line in"):
        read(parse(f"amazon2018:{r}:{m}"), "error")
    assert read(parse(f"amazon2018:{r}:{m}"), "skip").interactions.height == 4  # '["B00"]' is an id string


def test_amazon_missing_column(tmp_path):
    r, m = write_amazon(tmp_path, ".gz", reviews=[{k: v for k, v in x.items() if k != "unixReviewTime"} for x in REVIEWS])
    with pytest.raises(TcaError, match="missing column 'unixReviewTime'") as err:
        read(parse(f"amazon2018:{r}:{m}"), "skip")
    assert str(r) in str(err.value)
    r, m = write_amazon(tmp_path, "", metas=[{k: v for k, v in x.items() if k != "title"} for x in META])
    with pytest.raises(TcaError, match="missing column 'title'"):
        read(parse(f"amazon2018:{r}:{m}"), "error")


def test_amazon_empty_titles(tmp_path):
    r, m = write_amazon(tmp_path, "", metas=[meta(f"B0{k}", title=" ") for k in range(6)])
    with pytest.raises(TcaError, match="column 'title' is empty on every line") as err:
        read(parse(f"amazon2018:{r}:{m}"), "error")
    assert str(m) in str(err.value)
    r, m = write_amazon(tmp_path, "", metas=[meta(f"B0{k}", title="Unknown") for k in range(6)])
    with pytest.raises(TcaError, match="every item title is empty or a placeholder"):
        prepare(DataConfig(source=f"amazon2018:{r}:{m}", **LOOSE))


def test_missing_file(tmp_path):
    with pytest.raises(TcaError, match="no such file"):
        read(parse(f"amazon2018:{tmp_path / 'r.json'}:{tmp_path / 'm.json'}"), "error")


# ---------- RecBole atomic files ----------

def write_atomic(folder: Path, inter_rows: list[str], item_rows: list[str],
                 inter_header="user_id:token\titem_id:token\trating:float\ttimestamp:float",
                 item_header="item_id:token\tproduct_title:token_seq\tbrand:token") -> Path:
    folder.mkdir()
    write_lines(folder / f"{folder.name}.inter", [inter_header, *inter_rows])
    write_lines(folder / f"{folder.name}.item", [item_header, *item_rows])
    return folder


def test_recbole_source(tmp_path):
    inter = [f"{u}\t{i}\t5\t{100 * u + i}.0" for u in range(3) for i in range(4)]
    folder = write_atomic(tmp_path / "toy", inter, [f"{i}\tThing {i}\tAcme" for i in range(4)])
    dataset = prepare(DataConfig(source=f"recbole:{folder}", **LOOSE))
    assert sorted(dataset.items["title"]) == [f"Thing {i}" for i in range(4)]
    assert dataset.stats["interactions"] == 12
    bad = write_atomic(tmp_path / "bad", inter[:5] + ["1\t2\t5\tyesterday"], [f"{i}\tThing {i}\tAcme" for i in range(4)])
    with pytest.raises(TcaError, match=r"bad\.inter, line 7\b.*data\.on_bad_line=skip"):
        read(parse(f"recbole:{bad}"), "error")
    assert read(parse(f"recbole:{bad}"), "skip").bad_lines == 1


def test_recbole_missing_columns(tmp_path):
    folder = write_atomic(tmp_path / "a", ["1\t2\t5"], ["2\tThing"], inter_header="user_id:token\titem_id:token\trating:float")
    with pytest.raises(TcaError, match=r"a\.inter: missing column 'timestamp'"):
        read(parse(f"recbole:{folder}"), "error")
    folder = write_atomic(tmp_path / "b", ["1\t2\t5\t1"], ["2\tAcme"], item_header="item_id:token\tbrand:token")
    with pytest.raises(TcaError, match=r"b\.item: missing column: no column name contains 'title'"):
        read(parse(f"recbole:{folder}"), "error")
    with pytest.raises(TcaError, match=r"expected exactly one \.inter file"):
        parse(f"recbole:{tmp_path}")


# ---------- other bad input ----------

@pytest.mark.parametrize("spec", ["ml-1m", "amazon2018:only_one.json", "recbole:", "amazon2018:a:b:c"])
def test_unknown_source(spec):
    with pytest.raises(TcaError, match=r"unknown data\.source.*ml-100k, recbole:<dir>, amazon2018:<reviews"):
        parse(spec)


@pytest.mark.parametrize("params, match", [
    (dict(on_bad_line="ignore"), r"data\.on_bad_line must be one of error, skip"),
    (dict(min_history=0), r"data\.min_history must be a positive integer"),
    (dict(max_months=-1), r"data\.max_months must be an integer >= 0"),
])
def test_bad_params(params, match):
    with pytest.raises(TcaError, match=match):
        DataConfig(**params)


def test_filters_that_empty_the_dataset():
    with pytest.raises(TcaError, match=r"k-core filter .*data\.min_user_interactions=800.*lower these params"):
        prepare(DataConfig(min_user_interactions=800))
    with pytest.raises(TcaError, match=r"data\.min_history=900 .*lower data\.min_history"):
        prepare(DataConfig(min_history=900))
    with pytest.raises(TcaError, match=r"only \d+ samples, too few for an 8:1:1 split"):
        prepare(DataConfig(min_history=646))  # 3 samples: one user has 649 interactions


# ---------- MovieLens-100k end to end ----------

@pytest.fixture(scope="module")
def ml100k():
    return prepare(DataConfig())


def test_ml100k_stats(ml100k):
    """Measured once; a change here is a change of the rules' result, not noise."""
    s = ml100k.stats
    assert (s["users"], s["items"], s["interactions"], s["raw_interactions"]) == (943, 1341, 99259, 100000)
    assert s["samples"] == {"train": 71863, "valid": 8983, "test": 8983}
    assert s["density"] == pytest.approx(99259 / (943 * 1341))
    items = ml100k.items
    assert items["item_id"].to_list() == list(range(1, 1342))
    assert items["n_interactions"].sum() == 99259 and items["n_interactions"].min() >= 5
    assert items.filter(pl.col("title") == "Chasing Amy (1997)")["raw_ids"].to_list() == [["246", "268"]]
    assert not items["title"].str.contains("nkonwn").any()
    assert items.schema["item_id"] == pl.Int32


def test_ml100k_split_is_chronological(ml100k):
    train, valid, test = (ml100k.splits[n] for n in ("train", "valid", "test"))
    assert train["timestamp"].max() <= valid["timestamp"].min()
    assert valid["timestamp"].max() <= test["timestamp"].min()
    everything = pl.concat([train, valid, test])
    assert everything["sample_id"].to_list() == list(range(everything.height))
    assert everything["timestamp"].is_sorted()
    assert everything.schema["history"] == pl.List(pl.Int32) and everything.schema["item_id"] == pl.Int32
    assert (everything["history"].list.len() == 10).all()


def test_data_stage(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    params = {"data": DataConfig().__dict__}
    ctx = StageContext(name="data", params=params, out=out, artifacts=tmp_path)
    data_stage.run(ctx)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["items.parquet", "train.parquet", "valid.parquet", "test.parquet", "stats.json"])
    assert json.loads((out / "stats.json").read_text())["users"] == 943
    text = data_stage.inspect(out, params)
    assert "test.parquet: 8,983 rows" in text and "target: " in text and "(199" in text
    assert all(p.is_file() for p in data_stage.external_deps(params))


# ---------- the paper presets' filters on synthetic Amazon files ----------

MONTH = 30 * 24 * 3600


def synthetic_amazon(folder: Path) -> tuple[Path, Path, list, dict]:
    """Six years of reviews by users and items of very different activity, titles longer than 100
    characters, two items sharing a title and one without a title; returns the files, the reviews
    (user, asin, time) and the titles by asin."""
    rng = np.random.default_rng(7)
    asins = [f"B{k:03d}" for k in range(150)]
    words = ["Wooden", "Train", "Set", "Deluxe", "Puzzle", "Blocks", "Magnetic", "Tiles", "Kit", "Racing"]
    titles = {a: " ".join(rng.choice(words, int(rng.integers(2, 30)))) + f" {a}" for a in asins}
    titles["B001"] = titles["B000"] = "Classic Rubik's Cube"  # the same title on two items
    titles["B002"] = "Long " * 40 + "B002"  # cut to 100 characters
    reviews = set()
    for u in range(60):
        activity = int(rng.integers(3, 40))
        start = int(rng.integers(0, 60)) * MONTH  # many users are active only before the 48-month window
        for _ in range(activity):
            item = asins[min(int(rng.zipf(1.3)) - 1, len(asins) - 1)] if rng.random() < 0.5 else asins[int(rng.integers(0, 150))]
            reviews.add((f"A{u:02d}", item, 1_300_000_000 + start + int(rng.integers(0, 14 * MONTH))))
    reviews = sorted(reviews)
    metas = [meta(a, title=titles[a]) for a in asins if a != "B003"] + [meta("B003")]  # B003 has no title
    r = write_lines(folder / "reviews.json.gz", [json.dumps(review(*x)) for x in reviews])
    m = write_lines(folder / "meta.json.gz", [json.dumps(x) for x in metas])
    return r, m, reviews, {a: t for a, t in titles.items() if a != "B003"}


def brute_counts(reviews, titles, data: dict) -> dict:
    """users, items, interactions and samples per split by the preset's rules, one Python loop at a time."""
    clean = {a: " ".join(t.split())[: data["max_title_chars"]].strip() for a, t in titles.items()}
    key = (lambda a: clean[a]) if data["merge_duplicate_titles"] else (lambda a: a)
    events = {(u, key(a), t) for u, a, t in reviews if a in clean}
    if data["max_months"]:
        newest = max(t for _, _, t in events)
        events = {e for e in events if e[2] > newest - data["max_months"] * MONTH}
    events = brute_kcore(events, data["min_item_interactions"], data["min_user_interactions"])
    seen, samples = Counter(), 0
    for user, _, _ in sorted(events, key=lambda e: (e[2], e[0], e[1])):
        samples += seen[user] >= data["min_history"]
        seen[user] += 1
    cuts = (samples * 8 // 10, samples * 9 // 10)
    return {"users": len({e[0] for e in events}), "items": len({e[1] for e in events}), "interactions": len(events),
            "samples": {"train": cuts[0], "valid": cuts[1] - cuts[0], "test": samples - cuts[1]}}


@pytest.mark.parametrize("preset", ["paper-toys", "paper-office"])
def test_paper_preset_filters_on_amazon_files_match_brute_force(tmp_path, preset):
    """The preset's data section (48-month window on Toys, none on Office; users >= 10 iterated with
    items >= 5; no title merge; titles cut to 100 characters) against a recomputation, and each of
    those filters changes the counts here, so each is exercised."""
    from pipeline.runner import Project

    r, m, reviews, titles_by_asin = synthetic_amazon(tmp_path)
    data = {**Project(Path(__file__).resolve().parents[1], params_file=Path(__file__).resolve().parents[1] / "params" / f"{preset}.yaml").params["data"],
            "source": f"amazon2018:{r}:{m}"}
    dataset = prepare(DataConfig(**data))
    want = brute_counts(reviews, titles_by_asin, data)
    got = dataset.stats
    assert {k: got[k] for k in want} == want
    assert dataset.items["title"].str.len_chars().max() == 100  # the long title, cut
    assert dataset.items.filter(pl.col("title") == "Classic Rubik's Cube").height == 2  # not merged
    assert got["outside_time_window"] > 0 if data["max_months"] else got["outside_time_window"] == 0
    for off in ({"max_months": 0} if data["max_months"] else {"max_months": 48}, {"min_user_interactions": 5},
                {"min_item_interactions": 1}, {"merge_duplicate_titles": True}):
        assert brute_counts(reviews, titles_by_asin, {**data, **off}) != want, off
