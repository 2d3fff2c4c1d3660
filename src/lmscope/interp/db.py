"""The feature database (`<suite>/features.db`): schema and writer. Layout: docs/formats.md,
"Feature database".

The writer builds the database in a temp file beside the target (`.features.db.<random>.tmp`) with
journaling off, and renames it over `features.db` only when everything is in: an interrupted run
leaves the previous database (or none), never half of one.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmscope.atomic import temp_path
from lmscope.interp.features import LatentStats

FORMAT = "lmscope.features"
VERSION = 3  # 2: random-token samples, explanations and their scores; 3: scores.error

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE saes (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, site TEXT NOT NULL,
    layer INTEGER NOT NULL, kind TEXT NOT NULL, d_sae INTEGER NOT NULL, tokens INTEGER NOT NULL,
    prev_sae INTEGER, next_sae INTEGER);
CREATE TABLE features (sae INTEGER NOT NULL, idx INTEGER NOT NULL, n_fire INTEGER NOT NULL,
    density REAL NOT NULL, max_act REAL NOT NULL, mean_act REAL NOT NULL, hist_top REAL NOT NULL,
    hist_counts BLOB NOT NULL, PRIMARY KEY (sae, idx)) WITHOUT ROWID;
CREATE TABLE examples (sae INTEGER NOT NULL, idx INTEGER NOT NULL, band INTEGER NOT NULL,
    rank INTEGER NOT NULL, act REAL NOT NULL, seq INTEGER NOT NULL, pos INTEGER NOT NULL,
    token INTEGER NOT NULL, acts BLOB NOT NULL, PRIMARY KEY (sae, idx, band, rank)) WITHOUT ROWID;
CREATE TABLE logits (sae INTEGER NOT NULL, idx INTEGER NOT NULL, sign INTEGER NOT NULL,
    rank INTEGER NOT NULL, token INTEGER NOT NULL, value REAL NOT NULL,
    PRIMARY KEY (sae, idx, sign, rank)) WITHOUT ROWID;
CREATE TABLE neighbours (sae INTEGER NOT NULL, idx INTEGER NOT NULL, relation TEXT NOT NULL,
    rank INTEGER NOT NULL, other_sae INTEGER NOT NULL, other_idx INTEGER NOT NULL,
    cosine REAL NOT NULL, PRIMARY KEY (sae, idx, relation, rank)) WITHOUT ROWID;
CREATE TABLE samples (sae INTEGER NOT NULL, rank INTEGER NOT NULL, seq INTEGER NOT NULL,
    pos INTEGER NOT NULL, token INTEGER NOT NULL, latents BLOB NOT NULL, acts BLOB NOT NULL,
    PRIMARY KEY (sae, rank)) WITHOUT ROWID;
CREATE TABLE sequences (id INTEGER PRIMARY KEY, tokens BLOB NOT NULL);
CREATE TABLE vocab (id INTEGER PRIMARY KEY, text TEXT NOT NULL, norm TEXT NOT NULL);
"""
# Per-latent lookups use the primary keys (WITHOUT ROWID: the table is its own index, rows are
# inserted in key order); search uses these, built after the bulk inserts.
INDEXES = """
CREATE INDEX examples_by_token ON examples (token) WHERE band = -1;
CREATE INDEX logits_by_token ON logits (token, sign);
CREATE INDEX vocab_by_norm ON vocab (norm);
"""
RELATIONS = ("same", "prev", "next")
# Written by `lmscope explain` in place, a latent per transaction (so a killed run keeps what it
# finished); created empty by interpret, and by explain in databases older than them. No
# timestamps, and the search index is rebuilt whole from `explanations` (`explain.store.reindex`),
# so the same labels give the same file contents however many runs wrote them.
EXPLAIN_SCHEMA = """
CREATE TABLE IF NOT EXISTS explanations (sae INTEGER NOT NULL, idx INTEGER NOT NULL,
    explainer TEXT NOT NULL, label TEXT NOT NULL, PRIMARY KEY (sae, idx, explainer)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS scores (sae INTEGER NOT NULL, idx INTEGER NOT NULL,
    explainer TEXT NOT NULL, scorer TEXT NOT NULL, judge TEXT NOT NULL, value REAL,
    n INTEGER NOT NULL, error TEXT, PRIMARY KEY (sae, idx, explainer, scorer)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS scores_by_value ON scores (sae, scorer, value);
CREATE VIRTUAL TABLE IF NOT EXISTS label_search USING fts5(label, sae UNINDEXED, idx UNINDEXED,
    explainer UNINDEXED);
"""


def normalise_token(text: str) -> str:
    """How search matches token text: surrounding whitespace dropped, case folded."""
    return text.strip().casefold()


def _rows(*columns: Tensor | np.ndarray) -> Iterable[tuple[Any, ...]]:
    return zip(*(c.tolist() for c in columns))


class FeatureDBWriter:
    """Write a feature database into a temp file; `finish()` publishes it, `abort()` drops it.

    >>> with FeatureDBWriter(suite.features_db) as db: ...  # published only without an exception
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        # a killed (SIGKILL) earlier run cannot drop its temp file: drop it now
        for stale in self.path.parent.glob(f".{self.path.name}.tmp-*"):
            stale.unlink(missing_ok=True)
        self.tmp = Path(temp_path(self.path))
        self.conn = sqlite3.connect(self.tmp)
        self.conn.execute("PRAGMA journal_mode = OFF")  # the temp file is all-or-nothing anyway
        self.conn.execute("PRAGMA synchronous = OFF")
        self.conn.executescript(SCHEMA + EXPLAIN_SCHEMA)
        self._token_ids: set[int] = set()  # every id an example or a logit list shows
        self._seqs: set[int] = set()  # sequences that examples point into

    def __enter__(self) -> FeatureDBWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None and self.tmp.exists():
            self.abort()

    def set_meta(self, meta: dict[str, Any]) -> None:
        self.conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                              [(k, str(v)) for k, v in meta.items()])  # fmt: skip

    def add_sequences(self, first: int, input_ids: Tensor) -> None:
        """One block's sequences, numbered from `first` (unreferenced ones are dropped at the end)."""
        ids = input_ids.to("cpu", torch.int32).numpy()
        self.conn.executemany("INSERT INTO sequences VALUES (?, ?)",
                              ((first + i, row.tobytes()) for i, row in enumerate(ids)))  # fmt: skip

    def add_sae(self, sae_id: int, entry: dict[str, Any], tokens: int,
                prev_sae: int | None, next_sae: int | None) -> None:  # fmt: skip
        self.conn.execute(
            "INSERT INTO saes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (sae_id, entry["name"], entry["site"], entry["layer"], entry["kind"], entry["d_sae"],
             tokens, prev_sae, next_sae),
        )  # fmt: skip

    def add_stats(self, sae_id: int, stats: LatentStats, seq_len: int) -> None:
        """Per-latent statistics and examples (top: band -1, then bands 0, 1, … strongest first)."""
        d = stats.d
        counts = stats.hist.to("cpu", torch.int32).numpy()
        max_act = stats.top.act[0].clamp(min=0)
        sae_col = np.full(d, sae_id)
        self.conn.executemany(
            "INSERT INTO features VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            ((s, i, n, dens, mx, mean, top, counts[i].tobytes()) for s, i, n, dens, mx, mean, top in
             _rows(sae_col, np.arange(d), stats.n_fire, stats.density(), max_act, stats.mean_act(),
                   stats.hist_top())),
        )  # fmt: skip
        rows: list[tuple[Any, ...]] = []
        for band, buf in [(-1, stats.top), *enumerate(stats.bands)]:
            if band >= 0:  # show a band's samples strongest first, like the top list
                order = buf.act.argsort(dim=0, descending=True)
                act, token = buf.act.gather(0, order), buf.token.gather(0, order)
                token_id = buf.token_id.gather(0, order)
                window = buf.window.gather(0, order[..., None].expand_as(buf.window))
            else:
                act, token, token_id, window = buf.act, buf.token, buf.token_id, buf.window
            # filled slots come first in every column (empty ones score -inf), so slot = rank
            rank, lat = (token >= 0).nonzero(as_tuple=True)
            g = token[rank, lat]
            seq, pos = g // seq_len, g % seq_len
            windows = window[rank, lat].to("cpu", torch.float32).numpy()
            self._seqs.update(seq.tolist())
            rows += ((sae_id, i, band, r, a, s, p, t, w.tobytes()) for (i, r, a, s, p, t), w in
                     zip(_rows(lat, rank, act[rank, lat], seq, pos, token_id[rank, lat]), windows))  # fmt: skip
        rows.sort(key=lambda row: row[1:4])  # primary-key order
        self.conn.executemany("INSERT INTO examples VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def add_samples(self, sae_id: int, stats: LatentStats, seq_len: int) -> None:
        """The SAE's random tokens, each with the latents firing there (int32 / float32 blobs)."""
        sample = stats.sample
        tokens = sample.token.tolist()
        self._seqs.update(t // seq_len for t in tokens)
        self.conn.executemany(
            "INSERT INTO samples VALUES (?, ?, ?, ?, ?, ?, ?)",
            ((sae_id, r, t // seq_len, t % seq_len, i, lat.to("cpu", torch.int32).numpy().tobytes(),
              act.to("cpu", torch.float32).numpy().tobytes())
             for r, (t, i, lat, act) in enumerate(zip(tokens, sample.token_id.tolist(), sample.latents,
                                                      sample.acts))),
        )  # fmt: skip

    def add_lens(self, sae_id: int, up_v: Tensor, up_i: Tensor, down_v: Tensor, down_i: Tensor) -> None:  # fmt: skip
        for sign, values, ids in ((1, up_v, up_i), (-1, down_v, down_i)):
            self._token_ids.update(ids.unique().tolist())
            n = values.shape[1]
            idx = torch.arange(len(values))[:, None].expand(-1, n).reshape(-1)
            rank = torch.arange(n).repeat(len(values))
            self.conn.executemany(
                f"INSERT INTO logits VALUES ({sae_id}, ?, {sign}, ?, ?, ?)",
                _rows(idx, rank, ids.reshape(-1), values.reshape(-1)),
            )

    def add_neighbours(self, sae_id: int, relation: str, other_sae: int, cos: Tensor, idx: Tensor) -> None:  # fmt: skip
        n = cos.shape[1]
        lat = torch.arange(len(cos))[:, None].expand(-1, n).reshape(-1)
        rank = torch.arange(n).repeat(len(cos))
        self.conn.executemany(
            f"INSERT INTO neighbours VALUES ({sae_id}, ?, ?, ?, {other_sae}, ?, ?)",
            ((i, relation, r, o, c) for i, r, o, c in _rows(lat, rank, idx.reshape(-1), cos.reshape(-1))),
        )  # fmt: skip

    def finish(self, decode: Callable[[list[int]], list[str]]) -> Path:
        """Drop unreferenced sequences, write the vocabulary, index, compact, publish."""
        c = self.conn
        c.execute("CREATE TEMP TABLE used (id INTEGER PRIMARY KEY)")
        c.executemany("INSERT INTO used VALUES (?)", ((s,) for s in sorted(self._seqs)))
        c.execute("DELETE FROM sequences WHERE id NOT IN (SELECT id FROM used)")
        for (blob,) in c.execute("SELECT tokens FROM sequences"):
            self._token_ids.update(np.unique(np.frombuffer(blob, dtype=np.int32)).tolist())
        ids = sorted(self._token_ids)
        texts = decode(ids)
        c.executemany("INSERT INTO vocab VALUES (?, ?, ?)",
                      ((i, t, normalise_token(t)) for i, t in zip(ids, texts)))  # fmt: skip
        c.executescript(INDEXES)
        c.execute("INSERT OR REPLACE INTO meta VALUES ('format', ?), ('version', ?)", (FORMAT, str(VERSION)))  # fmt: skip
        c.commit()
        c.execute("VACUUM")
        c.close()
        with open(self.tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Close and delete the temp file; the published database (if any) stays as it was."""
        try:
            self.conn.close()
        finally:
            self.tmp.unlink(missing_ok=True)
