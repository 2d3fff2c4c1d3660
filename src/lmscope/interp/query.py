"""Read a suite's feature database: one latent's record, lists of latents, search by token.

Every call opens its own read-only connection (`file:…?mode=ro`), so threads of a web server can
call these functions concurrently.

>>> suite.feature("L6.resid_post", 123).top[0].tokens
>>> search(suite, "Paris", by="activating")[:5]
"""

from __future__ import annotations

import json
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

ORDERS = {"index": "idx", "density": "density DESC, idx", "max_act": "max_act DESC, idx"}
SEARCH_BY = ("activating", "logits")
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


@dataclass
class FeatureSummary:
    """A line of a list of latents."""

    sae: str
    index: int
    density: float
    max_act: float
    top_tokens: list[str]  # the tokens its top contexts fire on, most frequent first
    logits_up: list[str]


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
    return FeatureRecord(
        sae=name, index=index, site=site, density=density, max_act=max_act, mean_act=mean_act,
        hist_edges=edges, hist_counts=counts[:filled], top=by_band.get(-1, []), bands=bands,
        logits_up=[(texts[t], v) for s, t, v in lens if s > 0],
        logits_down=[(texts[t], v) for s, t, v in lens if s < 0],
        neighbours=near["same"], prev_layer=near["prev"], next_layer=near["next"],
        n_fire=n_fire, tokens=tokens, band_ranges=ranges,
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
    out = []
    for key in keys:
        ranked = sorted(set(tops.get(key, [])), key=lambda t: (-tops[key].count(t), tops[key].index(t)))  # fmt: skip
        out.append(FeatureSummary(sae=names[key[0]], index=key[1], density=stats[key][0],
                                  max_act=stats[key][1],
                                  top_tokens=[texts[t] for t in ranked[:N_SUMMARY]],
                                  logits_up=[texts[t] for t in ups.get(key, [])]))  # fmt: skip
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
        rows = conn.execute(f"SELECT idx FROM features WHERE sae = ? ORDER BY {ORDERS[order]} "
                            "LIMIT ? OFFSET ?", (sae_id, limit, offset)).fetchall()  # fmt: skip
        return _summaries(conn, [(sae_id, r[0]) for r in rows])


def search(suite: Suite, text: str, *, sae: str | None = None, by: str = "activating",
           limit: int = 50) -> list[FeatureSummary]:  # fmt: skip
    """Latents whose top contexts fire on the token `text` (`by="activating"`: most such contexts
    first) or whose logit lens raises it (`by="logits"`: best rank first). Tokens match `text`
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
