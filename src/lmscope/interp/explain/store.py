"""Explanations and scores in `features.db` (tables `explanations`, `scores`, `label_search`;
docs/formats.md, "Feature database").

`lmscope explain` writes into the published database in place, one latent per transaction
(SQLite's rollback journal makes each commit all-or-nothing, and readers see a latent's label and
scores together or not at all). `lmscope interpret` builds a new database whole; `carry_over`
copies the old one's explanations into it when both were made from the same suite with the same
settings (so they describe the same records), and drops them otherwise.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path

from lmscope.interp.db import EXPLAIN_SCHEMA, FORMAT, VERSION

LABEL_SEARCH = "CREATE VIRTUAL TABLE label_search USING fts5(label, sae UNINDEXED, idx UNINDEXED, explainer UNINDEXED)"

# meta keys that must agree for an old database's explanations to hold for a new one
SAME_RECORDS = ("suite", "corpus", "split", "seed", "seq_len", "tokens", "config")


def open_rw(path: Path) -> sqlite3.Connection:
    """A writable connection to a published database, with the explanation tables present (a
    version-2 database gets `scores.error`, NULL in its rows: the only change in version 3)."""
    conn = sqlite3.connect(path, timeout=30)
    conn.execute("PRAGMA journal_mode = DELETE")
    conn.executescript(EXPLAIN_SCHEMA)
    if "created" in _columns(conn, "explanations"):  # a development layout of version 2
        with conn:
            conn.execute("ALTER TABLE explanations DROP COLUMN created")
    if "error" not in _columns(conn, "scores"):
        with conn:
            conn.execute("ALTER TABLE scores ADD COLUMN error TEXT")
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('version', ?)", (str(VERSION),))
    return conn


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in conn.execute(f'PRAGMA table_info("{table}")')]


def finished(conn: sqlite3.Connection, sae: int, explainer: str, scorers: Iterable[str]) -> set[int]:  # fmt: skip
    """Latents of `sae` that have a score row of `explainer` for every scorer in `scorers` (a
    label too, unless the explainer failed on them: then their scores say so in `error`)."""
    done: set[int] | None = None
    for scorer in scorers:
        scored = {
            i
            for (i,) in conn.execute(
                "SELECT idx FROM scores WHERE sae = ? AND explainer = ? AND scorer = ?",
                (sae, explainer, scorer),
            )
        }
        done = scored if done is None else done & scored
    return done or set()


def labelled(conn: sqlite3.Connection, sae: int, explainer: str) -> dict[int, str]:
    return dict(conn.execute("SELECT idx, label FROM explanations WHERE sae = ? AND explainer = ?", (sae, explainer)))  # fmt: skip


def put_label(conn: sqlite3.Connection, sae: int, idx: int, explainer: str, label: str) -> None:
    """Store (or replace) a label; the caller commits, and `reindex` updates search at the end."""
    conn.execute(
        "INSERT OR REPLACE INTO explanations VALUES (?, ?, ?, ?)", (sae, idx, explainer, label)
    )


def reindex(conn: sqlite3.Connection) -> None:
    """Rebuild the label search index from `explanations` in one transaction (fresh, rows in key
    order), so that its contents depend only on the labels, not on the runs that wrote them."""
    with conn:
        conn.execute("DROP TABLE IF EXISTS label_search")
        conn.execute(LABEL_SEARCH)
        conn.execute(
            "INSERT INTO label_search (rowid, label, sae, idx, explainer) "
            "SELECT ROW_NUMBER() OVER (ORDER BY sae, idx, explainer), label, sae, idx, explainer "
            "FROM explanations ORDER BY sae, idx, explainer"
        )


def put_score(conn: sqlite3.Connection, sae: int, idx: int, explainer: str, scorer: str, judge: str,
              value: float | None, n: int, error: str | None = None) -> None:  # fmt: skip
    """Store a score over `n` judged items. `value` None (NULL) marks a latent that cannot be
    scored: with `error` None because it has no held-out contexts of one kind, else because the
    judge failed (`error` says how: an LLM that never answered the yes/no list asked for). Either
    way a rerun does not try it again. The caller commits."""
    conn.execute("INSERT OR REPLACE INTO scores (sae, idx, explainer, scorer, judge, value, n, error) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (sae, idx, explainer, scorer, judge, value, n, error))  # fmt: skip


def carry_over(old: Path, new: sqlite3.Connection) -> int:
    """Copy the explanations and scores of the database at `old` into `new` (being written, its
    meta and saes set) when both hold the same records; returns the labels copied."""
    if not old.is_file():
        return 0
    try:
        src = sqlite3.connect(f"{old.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:
        return 0
    try:
        meta_old = dict(src.execute("SELECT key, value FROM meta").fetchall())
        cols = "sae, idx, explainer, scorer, judge, value, n"
        cols += ", error" if "error" in _columns(src, "scores") else ""
        meta_new = dict(new.execute("SELECT key, value FROM meta").fetchall())
        if meta_old.get("format") != FORMAT or any(
            meta_old.get(k) != meta_new.get(k) for k in SAME_RECORDS
        ):
            return 0
        saes_old = src.execute("SELECT id, name, d_sae FROM saes ORDER BY id").fetchall()
        saes_new = new.execute("SELECT id, name, d_sae FROM saes ORDER BY id").fetchall()
        if saes_old != saes_new:
            return 0
        expl = src.execute("SELECT sae, idx, explainer, label FROM explanations").fetchall()
        scores = src.execute(f"SELECT {cols} FROM scores").fetchall()
    except sqlite3.Error:  # an older database without the tables, or not a database at all
        return 0
    finally:
        src.close()
    new.executemany("INSERT INTO explanations VALUES (?, ?, ?, ?)", expl)
    marks = ", ".join("?" * len(cols.split(", ")))
    new.executemany(f"INSERT INTO scores ({cols}) VALUES ({marks})", scores)
    reindex(new)
    return len(expl)
