"""`explain` with the built-in explainer and simulator on the tiny suite: every live latent gets a
label and both scores, scored only on contexts its explainer never saw, and reruns resume."""

from __future__ import annotations

import random
import re
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from interp_support import Interpreted

from lmscope.interp import InterpError
from lmscope.interp.explain import ExplainError
from lmscope.interp.explain.records import Context, Corpus, Latent, SaeData, load_sae
from lmscope.interp.explain.run import explain
from lmscope.interp.explain.scorers import (
    SimulatorJudge,
    balanced_accuracy,
    detection_items,
    fuzzing_items,
    score,
)
from lmscope.interp.explain.simulator import Rule, parse_label, render, token_class
from lmscope.interp.explain.tokens import TokensExplainer
from lmscope.suite import Suite


@pytest.fixture()
def suite(interpreted: Interpreted, tmp_path: Path) -> Suite:
    shutil.copytree(interpreted.suite.path, tmp_path / "suite")
    return Suite.open(tmp_path / "suite")


def _rows(suite: Suite, sql: str) -> list[tuple]:
    with sqlite3.connect(suite.features_db) as conn:
        return conn.execute(sql).fetchall()


def test_every_live_latent_gets_a_tokens_label_and_both_scores(suite: Suite) -> None:
    report = explain(suite, progress=False)
    live = _rows(suite, "SELECT sae, idx FROM features WHERE n_fire > 0")
    labels = dict(
        ((s, i), lab) for s, i, lab in _rows(suite, "SELECT sae, idx, label FROM explanations")
    )
    assert set(labels) == set(live) and report.labelled == len(live) > 50
    for scorer in ("detection", "fuzzing"):
        scored = {(s, i): v for s, i, v in _rows(suite, f"SELECT sae, idx, value FROM scores WHERE scorer = '{scorer}'")}  # fmt: skip
        assert set(scored) == set(live)
        values = [v for v in scored.values() if v is not None]
        assert len(values) > 0.8 * len(live) and all(0.0 <= v <= 1.0 for v in values)
    # labels are rules the simulator can read, naming tokens or token classes
    rules = [parse_label(lab) for lab in labels.values()]
    assert all(r.tokens is None or r.tokens or r.classes for r in rules)


def test_scored_contexts_are_held_out_and_fire_or_not_as_the_sae_says(interpreted: Interpreted, suite: Suite) -> None:  # fmt: skip
    T = interpreted.ids.shape[1]
    conn = sqlite3.connect(suite.features_db)
    corpus = Corpus(conn)
    checked = extra = 0
    for sae_id, name in conn.execute("SELECT id, name FROM saes").fetchall():
        f = (interpreted.latents[name] * interpreted.mask[..., None]).reshape(-1, interpreted.latents[name].shape[-1])  # fmt: skip
        data = load_sae(conn, corpus, sae_id, name)
        for lat in data.latents:
            shown = {c.where for c in lat.shown}
            assert shown and not shown & {c.where for c in lat.held}
            for c in lat.shown + lat.held:
                seq, pos = c.where
                assert float(f[seq * T + pos, lat.index]) == pytest.approx(c.act) and c.act > 0
                assert list(c.ids) == interpreted.ids[seq, max(0, pos - 3) : pos + 1].tolist()
            held_texts = {tuple(corpus.text(t) for t in c.ids) for c in lat.held}
            items = detection_items(lat, data, corpus.text)
            assert sum(it.truth for it in items) == len(lat.held)
            assert sum(not it.truth for it in items) <= len(lat.held)
            for it in items:
                if it.truth:
                    assert tuple(it.texts) in held_texts
            silent = [c for c, fired in zip(data.pool, data.pool_latents) if lat.index not in fired]
            for c in silent:
                seq, pos = c.where
                assert float(f[seq * T + pos, lat.index]) == 0.0
            for it in fuzzing_items(lat, corpus.text):
                assert it.truth or it.marked  # random highlights differ from the right ones
            # extra firings: real, and never a token any scorer asks about
            asked = {c.where for c in data.pool} | {c.where for c in lat.held}
            for c in lat.held:
                if c.acts:
                    asked |= {(c.where[0], p) for p in range(c.where[1] - len(c.ids) + 1, c.where[1] + 1)}  # fmt: skip
            assert not asked & {c.where for c in lat.extra}
            assert not shown & {c.where for c in lat.extra}
            for c in lat.extra:
                seq, pos = c.where
                assert float(f[seq * T + pos, lat.index]) == pytest.approx(c.act) and c.act > 0
            extra += len(lat.extra)
            checked += 1
    assert checked > 50 and extra > checked
    conn.close()


def test_a_rerun_labels_nothing_twice_and_finishes_what_was_left(suite: Suite) -> None:
    first = explain(suite, latents=3, progress=False)
    n_saes = len(suite.names)
    assert first.labelled == 3 * n_saes
    labels = _rows(suite, "SELECT sae, idx, label FROM explanations")
    second = explain(suite, progress=False)
    assert second.skipped == 3 * n_saes
    live = _rows(suite, "SELECT COUNT(*) FROM features WHERE n_fire > 0")[0][0]
    assert second.labelled == live - 3 * n_saes
    after = set(_rows(suite, "SELECT sae, idx, label FROM explanations"))
    assert set(labels) <= after  # the first run's labels were kept as they were
    assert explain(suite, progress=False).labelled == 0


def _synthetic() -> tuple[SaeData, dict[int, str]]:
    """An SAE of two latents over a made-up vocabulary: latent 0 fires on "Paris" or "Rome" after
    "in", latent 1 on every "(" whatever precedes it; random tokens are the other words."""
    words = ["in", "Paris", "Rome", " the", "(", "x", "cat", "sat", "on", "mat", "run", "=", "in"]
    vocab = dict(enumerate(words))
    rng = random.Random(0)
    ordinary = [3, 5, 6, 7, 8, 9, 10, 11]

    def ctx(last: int, before: list[int], act: float, k: int) -> Context:
        ids = (*before, last)
        return Context(ids, act, tuple([0.0] * len(before) + [act]), (k, len(before)))

    def filler(n: int) -> list[int]:
        return [rng.choice(ordinary) for _ in range(n)]

    k = iter(range(10_000))
    paris = [ctx(rng.choice([1, 2]), [*filler(3), 0], 5.0 - i / 10, next(k)) for i in range(24)]
    paren = [ctx(4, filler(4), 3.0 - i / 10, next(k)) for i in range(24)]
    baseline = [
        ctx(t, filler(4), 0.0, next(k)) for t in filler(60) + [1, 2, 1, 2]
    ]  # silent "Paris" too
    baseline += [
        ctx(t, [0, *filler(3)], 0.0, next(k)) for t in filler(6)
    ]  # "in" before other words
    pool = [ctx(t, filler(4), 0.0, next(k)) for t in filler(60)] + [ctx(2, [*filler(3), 3], 0.0, next(k))]  # fmt: skip
    latents = [Latent(0, 0, 0.01, 5.0, paris[::2], paris[1::2], [1]), Latent(0, 1, 0.01, 3.0, paren[::2], paren[1::2])]  # fmt: skip
    none = np.zeros(0, dtype=np.int32)
    return SaeData(0, "syn", latents, baseline, [none] * len(baseline), pool, [none] * len(pool)), vocab  # fmt: skip


def test_the_tokens_label_names_the_firing_tokens_and_their_context() -> None:
    data, vocab = _synthetic()
    ex = TokensExplainer(data, vocab.__getitem__)
    labels = [ex.explain(lat) for lat in data.latents]
    # every firing of latent 0 is right after "in", which never precedes a baseline token
    assert labels[0] == 'any token right after "in" · promotes "Paris"'
    rule = parse_label(labels[0])
    assert rule.fires([" the", "in", "Rome"]) and not rule.fires(["in", " the", "Rome"])
    assert labels[1] == '"("'
    judge = SimulatorJudge()
    for lat, own, other in zip(data.latents, labels, labels[::-1]):
        items = detection_items(lat, data, vocab.__getitem__)
        assert len(items) == 24  # 12 held-out firing contexts, 12 silent random tokens
        assert score("detection", judge, own, items) == 1.0
        assert score("detection", judge, other, items) == 0.5  # another latent's label: chance
        fuzz = fuzzing_items(lat, vocab.__getitem__)
        assert score("fuzzing", judge, own, fuzz) > score("fuzzing", judge, other, fuzz)


def test_labels_round_trip_through_the_simulator() -> None:
    label = render(["Paris", "\n", 'say "hi"'], ["in"], ["France"])
    assert label == '"Paris", "\\n", "say \\"hi\\"" after "in" · promotes "France"'
    rule = parse_label(label)
    assert rule == Rule(frozenset({"paris", "\n", 'say "hi"'}), frozenset({"in"}))
    assert rule.fires(["We", " live", " in", " paris"]) and not rule.fires(
        ["We", " live", " paris"]
    )
    assert parse_label('any token after "("').fires(["(", "x"])
    assert parse_label("Fires on city names like Paris").fires([" Paris"])
    label = render(["of"], prev=["end"], classes=["number", "punctuation"])
    assert label == '"of", any number, any punctuation right after "end"'
    rule = parse_label(label)
    assert rule == Rule(frozenset({"of"}), classes=frozenset({"number", "punctuation"}), prev=frozenset({"end"}))  # fmt: skip
    assert rule.fires([" end", " 42"]) and rule.fires(["end", "."]) and rule.fires(["end", " Of"])
    assert not rule.fires(["end", "x", "."]) and not rule.fires(["x", " 42"])
    assert not rule.fires(["end", " cat"])
    assert parse_label('"after", "x" after "y"') == Rule(
        frozenset({"after", "x"}), frozenset({"y"})
    )
    assert [token_class(t) for t in ["\n", " ", " 12", ",", " Paris", "ing", " the", "x2"]] == [
        "line break", "space", "number", "punctuation", "capitalised word", "word piece", None, None]  # fmt: skip
    assert balanced_accuracy([True, True, False, False], [True, False, False, False]) == 0.75
    assert balanced_accuracy([True], [True]) is None


def test_bad_choices_are_one_line_errors(suite: Suite) -> None:
    with pytest.raises(ExplainError, match="valid: tokens"):
        explain(suite, explainer="gpt", progress=False)
    with pytest.raises(ExplainError, match="valid: detection, fuzzing"):
        explain(suite, scorers=["recall"], progress=False)
    with pytest.raises(ExplainError, match="positive"):
        explain(suite, latents=0, progress=False)


def test_queries_show_labels_sort_by_score_and_search_label_words(suite: Suite) -> None:
    from lmscope.interp import query

    name = suite.names[0]
    with pytest.raises(InterpError, match="lmscope explain"):
        query.features(suite, name, order="score")
    assert query.search(suite, "anything", by="label") == []
    explain(suite, progress=False)
    page = query.features(suite, name, order="score", limit=1000)
    scores = [r.score for r in page if r.score is not None]
    assert scores == sorted(scores, reverse=True) and len(scores) > 10
    assert all(r.label for r in page if r.score is not None)
    rec = query.feature(suite, name, page[0].index)
    assert rec.label == page[0].label and rec.score == page[0].score
    assert [(e.explainer, e.judge) for e in rec.explanations] == [("tokens", "simulator")]
    assert all(
        f"{s}:{i}" in rec.labels for s, i, _ in rec.neighbours if query.feature(suite, s, i).label
    )
    # a word of a label finds its latent, and every hit's label holds that word
    word = next(w for r in page for w in re.findall(r"\w+", r.label or "") if w != "promotes")
    hits = query.search(suite, word, by="label", limit=500)
    assert (page[0].sae, page[0].index) in {(h.sae, h.index) for h in hits} or word not in (
        page[0].label or ""
    )
    assert hits and all(word.casefold() in (h.label or "").casefold() for h in hits)
    assert query.labels(suite, [(name, page[0].index)]) == {
        (name, page[0].index): (page[0].label, page[0].score)
    }


def test_random_tokens_hold_every_latent_that_fires_there(interpreted: Interpreted) -> None:
    """The SAE's random-token sample: distinct counted tokens, each with exactly the latents
    (and activations) that brute-force encoding gives there."""
    conn = sqlite3.connect(interpreted.suite.features_db)
    n_samples = interpreted.cfg.stats.samples
    for sae_id, name in conn.execute("SELECT id, name FROM saes").fetchall():
        f = interpreted.latents[name]
        rows = conn.execute("SELECT seq, pos, token, latents, acts FROM samples WHERE sae = ?", (sae_id,)).fetchall()  # fmt: skip
        assert len(rows) == min(n_samples, int(interpreted.mask.sum()))
        assert len({(s, p) for s, p, *_ in rows}) == len(rows)
        for seq, pos, token, lat, act in rows:
            assert bool(interpreted.mask[seq, pos]) and token == int(interpreted.ids[seq, pos])
            want = f[seq, pos].nonzero().squeeze(1)
            assert np.frombuffer(lat, dtype=np.int32).tolist() == want.tolist()
            assert np.frombuffer(act, dtype=np.float32).tolist() == f[seq, pos, want].tolist()
    conn.close()


def test_rerunning_interpret_keeps_labels_of_the_same_records_and_drops_others(interpreted: Interpreted, suite: Suite) -> None:  # fmt: skip
    from dataclasses import replace

    from lmscope.interp.pipeline import interpret
    from lmscope.model import tiny_model

    explain(suite, latents=4, progress=False)
    before = _rows(suite, "SELECT sae, idx, explainer, label FROM explanations ORDER BY sae, idx")
    scores = _rows(suite, "SELECT * FROM scores ORDER BY sae, idx, scorer")
    interpret(suite, interpreted.cfg, loaded=tiny_model("gemma3"), progress=False)
    assert (
        _rows(suite, "SELECT sae, idx, explainer, label FROM explanations ORDER BY sae, idx")
        == before
    )
    assert _rows(suite, "SELECT * FROM scores ORDER BY sae, idx, scorer") == scores
    assert explain(suite, latents=4, progress=False).labelled == 0  # nothing left to do
    interpret(suite, replace(interpreted.cfg, seed=1), loaded=tiny_model("gemma3"), progress=False)
    assert _rows(suite, "SELECT COUNT(*) FROM explanations") == [(0,)]  # other records: labels gone


def test_a_version_2_database_gets_the_error_column_in_place(suite: Suite) -> None:
    explain(suite, latents=1, progress=False)
    with sqlite3.connect(suite.features_db) as conn:  # back to version 2: scores without `error`
        old = conn.execute("SELECT sae, idx, explainer, scorer, judge, value, n FROM scores").fetchall()  # fmt: skip
        conn.execute("DROP TABLE scores")
        conn.execute("CREATE TABLE scores (sae INTEGER NOT NULL, idx INTEGER NOT NULL, explainer TEXT NOT NULL, "
                     "scorer TEXT NOT NULL, judge TEXT NOT NULL, value REAL, n INTEGER NOT NULL, "
                     "PRIMARY KEY (sae, idx, explainer, scorer)) WITHOUT ROWID")  # fmt: skip
        conn.executemany("INSERT INTO scores VALUES (?, ?, ?, ?, ?, ?, ?)", old)
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'version'")
    report = explain(suite, latents=2, progress=False)
    assert report.skipped == len(old) // 2 and report.labelled == len(suite.names)
    assert _rows(suite, "SELECT value FROM meta WHERE key = 'version'") == [("3",)]
    rows = _rows(suite, "SELECT sae, idx, explainer, scorer, judge, value, n, error FROM scores")
    assert set(old) <= {r[:7] for r in rows} and all(r[7] is None for r in rows)
