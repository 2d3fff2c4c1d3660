"""Read a suite's feature database: one latent's record, lists of latents, search by token.

Every call opens its own read-only connection (`file:…?mode=ro`), so threads of a web server can
call these functions concurrently.

>>> suite.feature("L6.resid_post", 123).top[0].tokens
>>> search(suite, "Paris", by="activating")[:5]
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from lmscope.interp import FeatureIndexError, InterpError
from lmscope.interp.db import FORMAT, normalise_token
from lmscope.interp.features import band_bounds

if TYPE_CHECKING:
    from lmscope.suite import Suite

ORDERS = {"index": "idx", "density": "density DESC, idx", "max_act": "max_act DESC, idx",
          "score": "score IS NULL, score DESC, idx"}  # fmt: skip
SEARCH_BY = ("activating", "logits", "label")
DENSE = 0.1  # a latent firing on more than 10% of tokens counts as dense
N_SUMMARY = 5  # tokens shown in a summary


@dataclass
class Example:
    """One context: the latent's activation `act` at token `pos` of sequence `seq`; `tokens` and
    `acts` cover a window around it, `tokens[center]` being the token itself."""

    act: float
    seq: int
    pos: int
    tokens: list[str]
    acts: list[float]
    center: int


@dataclass
class FeatureRecord:
    """Everything interpret recorded about one latent."""

    sae: str
    index: int
    site: str
    density: float
    max_act: float
    mean_act: float  # over the tokens where it fires
    hist_edges: list[float]  # linear bins over [0, ≥ max_act) of the nonzero activations
    hist_counts: list[int]
    top: list[Example]
    bands: list[tuple[str, list[Example]]]  # strongest band first
    logits_up: list[tuple[str, float]]
    logits_down: list[tuple[str, float]]
    neighbours: list[tuple[str, int, float]]  # (sae, index, decoder cosine)
    prev_layer: list[tuple[str, int, float]]
    next_layer: list[tuple[str, int, float]]
    n_fire: int = 0  # tokens it fired on
    tokens: int = 0  # tokens interpret read
    band_ranges: list[tuple[float, float]] = field(default_factory=list)  # [lo, hi) per band
    label: str | None = None  # the best-scoring explanation (`lmscope explain`), if any
    score: float | None = None  # its detection score (balanced accuracy)
    explanations: list[Explanation] = field(default_factory=list)  # every explainer's, best first
    labels: dict[str, str] = field(default_factory=dict)  # "sae:index" -> label, for neighbours


@dataclass
class Explanation:
    """One explainer's label of a latent and its scores (balanced accuracies; None: not scorable)."""

    explainer: str
    label: str
    detection: float | None = None
    fuzzing: float | None = None
    judge: str | None = None


@dataclass
class FeatureSummary:
    """A line of a list of latents."""

    sae: str
    index: int
    density: float
    max_act: float
    top_tokens: list[str]  # the tokens its top contexts fire on, most frequent first
    logits_up: list[str]
    label: str | None = None  # its best explanation (`lmscope explain`), if any
    score: float | None = None  # that label's detection score


def has_db(suite: Suite) -> bool:
    """Whether `lmscope interpret` has written the suite's feature database."""
    return suite.features_db.is_file()


@contextmanager
def _connect(suite: Suite) -> Iterator[sqlite3.Connection]:
    from lmscope.interp.pipeline import suite_fingerprint

    path = suite.features_db
    if not path.is_file():
        raise InterpError(f"suite {suite.path} has no feature database yet; run `lmscope interpret {suite.path} --tokens N`")  # fmt: skip
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
    try:
        try:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as e:
            raise InterpError(f"{path} is not a feature database ({e}); rerun `lmscope interpret {suite.path}`") from e  # fmt: skip
        if meta.get("format") != FORMAT:
            raise InterpError(f"{path} is not a feature database (format {meta.get('format')!r}); rerun `lmscope interpret {suite.path}`")  # fmt: skip
        if meta.get("suite") != suite_fingerprint(suite):
            raise InterpError(
                f"{path} was written for another suite (model and creation time {meta.get('suite')}, "
                f"this suite: {suite_fingerprint(suite)}); rerun `lmscope interpret {suite.path}`"
            )
        yield conn
    finally:
        conn.close()


def _sae(conn: sqlite3.Connection, suite: Suite, name: str) -> tuple[int, str, int, int]:
    """(id, site, d_sae, tokens) of an SAE in the database."""
    name = suite.resolve(name)
    row = conn.execute(
        "SELECT id, site, d_sae, tokens FROM saes WHERE name = ?", (name,)
    ).fetchone()
    if row is None:
        held = [r[0] for r in conn.execute("SELECT name FROM saes ORDER BY id")]
        raise InterpError(f"SAE {name!r} is not in {suite.features_db} (it holds {', '.join(held)}); rerun `lmscope interpret {suite.path}`")  # fmt: skip
    return row


def _texts(conn: sqlite3.Connection, ids: list[int]) -> dict[int, str]:
    rows = conn.execute("SELECT id, text FROM vocab WHERE id IN (SELECT value FROM json_each(?))",
                        (json.dumps(sorted(set(ids))),))  # fmt: skip
    return dict(rows.fetchall())


def _examples(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> list[Example]:
    """Examples from (act, seq, pos, acts blob) rows."""
    seqs = {s: np.frombuffer(b, dtype=np.int32)
            for s, b in conn.execute("SELECT id, tokens FROM sequences WHERE id IN (SELECT value FROM json_each(?))",
                                     (json.dumps(sorted({r[1] for r in rows})),))}  # fmt: skip
    texts = _texts(conn, [int(t) for s in seqs.values() for t in s])
    out = []
    for act, seq, pos, blob in rows:
        window = np.frombuffer(blob, dtype=np.float32)
        w = (len(window) - 1) // 2
        ids = seqs[seq]
        lo, hi = max(0, pos - w), min(len(ids) - 1, pos + w)
        out.append(Example(act=act, seq=seq, pos=pos,
                           tokens=[texts.get(int(t), f"<{t}>") for t in ids[lo : hi + 1]],
                           acts=window[w - (pos - lo) : w + (hi - pos) + 1].tolist(),
                           center=pos - lo))  # fmt: skip
    return out


def feature(suite: Suite, sae: str, index: int) -> FeatureRecord:
    """One latent's record: `feature(suite, "L6.resid_post-w16384-l064", 123)`."""
    with _connect(suite) as conn:
        sae_id, site, d_sae, tokens = _sae(conn, suite, sae)
        name = suite.resolve(sae)
        if not 0 <= index < d_sae:
            raise FeatureIndexError(f"latent {index} is out of range for {name}; valid: 0-{d_sae - 1}")  # fmt: skip
        n_fire, density, max_act, mean_act, top, hist = conn.execute(
            "SELECT n_fire, density, max_act, mean_act, hist_top, hist_counts FROM features "
            "WHERE sae = ? AND idx = ?", (sae_id, index)).fetchone()  # fmt: skip
        counts = np.frombuffer(hist, dtype=np.int32).tolist()
        filled = max((i + 1 for i, c in enumerate(counts) if c), default=0)
        edges = np.linspace(0.0, top, len(counts) + 1)[: filled + 1].tolist() if filled else []
        rows = conn.execute("SELECT band, act, seq, pos, acts FROM examples WHERE sae = ? AND idx = ? "
                            "ORDER BY band, rank", (sae_id, index)).fetchall()  # fmt: skip
        examples = _examples(conn, [r[1:] for r in rows])
        by_band: dict[int, list[Example]] = {}
        for (band, *_), ex in zip(rows, examples):
            by_band.setdefault(band, []).append(ex)
        cfg = json.loads(conn.execute("SELECT value FROM meta WHERE key = 'config'").fetchone()[0])
        n_bands = int(cfg["stats"]["bands"])
        ranges = [band_bounds(top, b, n_bands) for b in range(n_bands)]
        bands = [(_band_label(lo, hi, max_act), by_band.get(b, [])) for b, (lo, hi) in enumerate(ranges)]  # fmt: skip
        lens = conn.execute("SELECT sign, token, value FROM logits WHERE sae = ? AND idx = ? "
                            "ORDER BY sign DESC, rank", (sae_id, index)).fetchall()  # fmt: skip
        texts = _texts(conn, [t for _, t, _ in lens])
        near: dict[str, list[tuple[str, int, float]]] = {r: [] for r in ("same", "prev", "next")}
        for relation, other, other_idx, cos in conn.execute(
            "SELECT n.relation, s.name, n.other_idx, n.cosine FROM neighbours n JOIN saes s "
            "ON s.id = n.other_sae WHERE n.sae = ? AND n.idx = ? ORDER BY n.relation, n.rank",
            (sae_id, index),
        ):
            near[relation].append((other, other_idx, cos))
        expl = _explanations(conn, [(sae_id, index)]).get((sae_id, index), [])
        ids = dict(conn.execute("SELECT name, id FROM saes").fetchall())
        keys = [(ids[o], i) for rel in near.values() for o, i, _ in rel if o in ids]
        names = {v: k for k, v in ids.items()}
        labels = {f"{names[k[0]]}:{k[1]}": e[0].label for k, e in _explanations(conn, keys).items()}
    return FeatureRecord(
        sae=name, index=index, site=site, density=density, max_act=max_act, mean_act=mean_act,
        hist_edges=edges, hist_counts=counts[:filled], top=by_band.get(-1, []), bands=bands,
        logits_up=[(texts[t], v) for s, t, v in lens if s > 0],
        logits_down=[(texts[t], v) for s, t, v in lens if s < 0],
        neighbours=near["same"], prev_layer=near["prev"], next_layer=near["next"],
        n_fire=n_fire, tokens=tokens, band_ranges=ranges,
        label=expl[0].label if expl else None, score=expl[0].detection if expl else None,
        explanations=expl, labels=labels,
    )  # fmt: skip


def _band_label(lo: float, hi: float, max_act: float) -> str:
    if max_act <= 0:
        return f"{lo:.3g}–{hi:.3g}"
    return f"{100 * lo / max_act:.0f}–{min(100.0, 100 * hi / max_act):.0f}% of max"


def _summaries(conn: sqlite3.Connection, keys: list[tuple[int, int]]) -> list[FeatureSummary]:
    """Summaries of (sae id, index) pairs, in that order."""
    if not keys:
        return []
    names = dict(conn.execute("SELECT id, name FROM saes").fetchall())
    pairs = json.dumps([list(k) for k in keys])
    sel = "SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?)"
    stats = {(s, i): (d, m) for s, i, d, m in conn.execute(
        f"SELECT sae, idx, density, max_act FROM features WHERE (sae, idx) IN ({sel})", (pairs,))}  # fmt: skip
    tops: dict[tuple[int, int], list[int]] = {}
    for s, i, t in conn.execute(
        f"SELECT sae, idx, token FROM examples WHERE band = -1 AND (sae, idx) IN ({sel}) ORDER BY rank",
        (pairs,),
    ):
        tops.setdefault((s, i), []).append(t)
    ups: dict[tuple[int, int], list[int]] = {}
    for s, i, t in conn.execute(
        f"SELECT sae, idx, token FROM logits WHERE sign = 1 AND rank < {N_SUMMARY} "
        f"AND (sae, idx) IN ({sel}) ORDER BY rank", (pairs,)):  # fmt: skip
        ups.setdefault((s, i), []).append(t)
    texts = _texts(conn, [t for ts in (*tops.values(), *ups.values()) for t in ts])
    expl = _explanations(conn, keys)
    out = []
    for key in keys:
        best = expl.get(key, [None])[0]
        ranked = sorted(set(tops.get(key, [])), key=lambda t: (-tops[key].count(t), tops[key].index(t)))  # fmt: skip
        out.append(FeatureSummary(sae=names[key[0]], index=key[1], density=stats[key][0],
                                  max_act=stats[key][1],
                                  top_tokens=[texts[t] for t in ranked[:N_SUMMARY]],
                                  logits_up=[texts[t] for t in ups.get(key, [])],
                                  label=best.label if best else None,
                                  score=best.detection if best else None))  # fmt: skip
    return out


def features(suite: Suite, sae: str, *, order: str = "density", offset: int = 0,
             limit: int = 50) -> list[FeatureSummary]:  # fmt: skip
    """A page of an SAE's latents, by `order`: `index`, `density` or `max_act` (both descending)."""
    if order not in ORDERS:
        raise InterpError(f"unknown order {order!r}; valid: {', '.join(ORDERS)}")
    if offset < 0 or limit < 0:
        raise InterpError(f"offset and limit must be >= 0, got {offset} and {limit}")
    with _connect(suite) as conn:
        sae_id = _sae(conn, suite, sae)[0]
        if order == "score":
            if not _has_labels(conn):
                raise InterpError(f"no explanations to sort by; run `lmscope explain {suite.path}`")
            sql = ("SELECT f.idx, (SELECT MAX(value) FROM scores s WHERE s.sae = f.sae AND s.idx = f.idx "
                   f"AND s.scorer = 'detection') AS score FROM features f WHERE f.sae = ? "
                   f"ORDER BY {ORDERS[order]} LIMIT ? OFFSET ?")  # fmt: skip
        else:
            sql = (
                f"SELECT idx FROM features WHERE sae = ? ORDER BY {ORDERS[order]} LIMIT ? OFFSET ?"
            )
        rows = conn.execute(sql, (sae_id, limit, offset)).fetchall()
        return _summaries(conn, [(sae_id, r[0]) for r in rows])


def search(suite: Suite, text: str, *, sae: str | None = None, by: str = "activating",
           limit: int = 50) -> list[FeatureSummary]:  # fmt: skip
    """Latents whose top contexts fire on the token `text` (`by="activating"`: most such contexts
    first), whose logit lens raises it (`by="logits"`: best rank first), or whose label holds
    every word of `text` (`by="label"`: full-text search, best match first). Tokens match `text`
    ignoring case and surrounding whitespace."""
    if by not in SEARCH_BY:
        raise InterpError(f"unknown search {by!r}; valid: {', '.join(SEARCH_BY)}")
    if not normalise_token(text):
        raise InterpError("give a token to search for, e.g. 'Paris'")
    with _connect(suite) as conn:
        where = ""
        args: list[Any] = [normalise_token(text)]
        if sae is not None:
            where = "AND sae = ?"
            args.append(_sae(conn, suite, sae)[0])
        tokens = "token IN (SELECT id FROM vocab WHERE norm = ?)"
        if by == "label":
            return _summaries(
                conn, _label_search(conn, text, args[1] if sae is not None else None, limit)
            )
        if by == "activating":
            sql = (f"SELECT sae, idx FROM examples WHERE band = -1 AND {tokens} {where} "
                   "GROUP BY sae, idx ORDER BY COUNT(*) DESC, MAX(act) DESC, sae, idx LIMIT ?")  # fmt: skip
        else:
            sql = (f"SELECT sae, idx FROM logits WHERE sign = 1 AND {tokens} {where} "
                   "GROUP BY sae, idx ORDER BY MIN(rank), MAX(value) DESC, sae, idx LIMIT ?")  # fmt: skip
        keys = [(s, i) for s, i in conn.execute(sql, (*args, limit))]
        return _summaries(conn, keys)


def counts(suite: Suite, sae: str) -> dict[str, int]:
    """{"n": d_sae, "dead": never fired, "dense": fired on more than 10% of tokens, "tokens": read}."""
    with _connect(suite) as conn:
        sae_id, _, d_sae, tokens = _sae(conn, suite, sae)
        dead, dense = conn.execute(
            "SELECT SUM(n_fire = 0), SUM(density > ?) FROM features WHERE sae = ?", (DENSE, sae_id)
        ).fetchone()
    return {"n": d_sae, "dead": int(dead or 0), "dense": int(dense or 0), "tokens": tokens}


def _has_labels(conn: sqlite3.Connection) -> bool:
    """Whether `lmscope explain` has written any label (older databases lack the tables)."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'explanations'").fetchone() is None:
        return False
    return conn.execute("SELECT 1 FROM explanations LIMIT 1").fetchone() is not None


def _explanations(conn: sqlite3.Connection, keys: list[tuple[int, int]]) -> dict[tuple[int, int], list[Explanation]]:  # fmt: skip
    """Every explanation of the (sae id, index) pairs, best detection score first."""
    if not keys or not _has_labels(conn):
        return {}
    pairs = json.dumps([list(k) for k in keys])
    sel = "SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?)"
    out: dict[tuple[int, int], list[Explanation]] = {}
    for s, i, explainer, label in conn.execute(
        f"SELECT sae, idx, explainer, label FROM explanations WHERE (sae, idx) IN ({sel})", (pairs,)
    ):
        out.setdefault((s, i), []).append(Explanation(explainer, label))
    scores = {(s, i, e, sc): (v, j) for s, i, e, sc, v, j in conn.execute(
        f"SELECT sae, idx, explainer, scorer, value, judge FROM scores WHERE (sae, idx) IN ({sel})", (pairs,))}  # fmt: skip
    for (s, i), lst in out.items():
        for ex in lst:
            ex.detection, ex.judge = scores.get((s, i, ex.explainer, "detection"), (None, None))
            ex.fuzzing = scores.get((s, i, ex.explainer, "fuzzing"), (None, None))[0]
        lst.sort(key=lambda ex: (-(ex.detection if ex.detection is not None else -1.0), ex.explainer == "tokens", ex.explainer))  # fmt: skip
    return out


def _label_search(conn: sqlite3.Connection, text: str, sae_id: int | None, limit: int) -> list[tuple[int, int]]:  # fmt: skip
    """(sae id, index) of the latents whose labels hold every word of `text` (FTS5, bm25 order);
    text without words (":") matches labels containing it literally."""
    if not _has_labels(conn):
        return []
    words = re.findall(r"\w+", text)
    where, args = ("AND sae = ?", [sae_id]) if sae_id is not None else ("", [])
    if words:
        match = " ".join('"' + w.replace('"', '""') + '"' for w in words)
        sql = (f"SELECT sae, idx FROM label_search WHERE label_search MATCH ? {where} "
               "GROUP BY sae, idx ORDER BY MIN(rank), sae, idx LIMIT ?")  # fmt: skip
        rows = conn.execute(sql, (match, *args, limit)).fetchall()
    else:
        pattern = (
            "%" + text.strip().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        )
        sql = (f"SELECT sae, idx FROM explanations WHERE label LIKE ? ESCAPE '\\' {where} "
               "GROUP BY sae, idx ORDER BY sae, idx LIMIT ?")  # fmt: skip
        rows = conn.execute(sql, (pattern, *args, limit)).fetchall()
    return [(int(s), int(i)) for s, i in rows]


def labels(
    suite: Suite, keys: list[tuple[str, int]]
) -> dict[tuple[str, int], tuple[str, float | None]]:
    """The best label and its detection score of each (SAE name, index) that has one."""
    with _connect(suite) as conn:
        ids = dict(conn.execute("SELECT name, id FROM saes").fetchall())
        wanted = [(ids[s], i) for s, i in keys if s in ids]
        names = {v: k for k, v in ids.items()}
        return {(names[k[0]], k[1]): (e[0].label, e[0].detection) for k, e in _explanations(conn, wanted).items()}  # fmt: skip
