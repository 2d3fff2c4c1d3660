"""What explainers and scorers read about each latent, split so that no context scored is one
an explainer saw.

Per latent, from `features.db`:
- *shown* (the explainer's): the top contexts and the band samples of even rank (bands are
  ordered strongest first, so even ranks span each band);
- *held* (the scorers' activating contexts): the band samples of odd rank and the random tokens
  (`samples`) where the latent fires, less any token also shown; when that leaves none, the
  top contexts of odd rank move from shown to held;
- the SAE's random tokens are split by rank too: even ones are the explainer's baseline of
  ordinary text, odd ones the scorers' pool of non-activating contexts;
- *extra* (the explainer's too): the other tokens where the latent fires inside the windows
  recorded around its shown contexts (interpret keeps `window` activations on each side), less
  every token a scorer asks about: the held-out tokens, the left windows of held-out band contexts
  (fuzzing highlights them) and the pool's tokens.

A context is the token with the `window` tokens before it (what a causal model saw), and the
latent's activations there when interpret recorded them (top and band samples).
"""

from __future__ import annotations

import json
import random
import sqlite3
from dataclasses import dataclass, field

import numpy as np

from lmscope.interp.explain import ExplainError


@dataclass(frozen=True)
class Context:
    """Token ids ending at the token asked about (`ids[-1]`), the latent's activation there, and
    its activations over `ids` when known (empty for random tokens)."""

    ids: tuple[int, ...]
    act: float
    acts: tuple[float, ...] = ()
    where: tuple[int, int] = (-1, -1)  # (sequence, position) of the last token


@dataclass
class Latent:
    sae: int  # id in the database
    index: int
    density: float
    max_act: float
    shown: list[Context] = field(default_factory=list)
    held: list[Context] = field(default_factory=list)
    promotes: list[int] = field(default_factory=list)  # logit-lens tokens it raises most
    extra: list[Context] = field(default_factory=list)  # more firings near the shown contexts


@dataclass
class SaeData:
    """One SAE's live latents and its random tokens (baseline for explainers, pool for scorers)."""

    sae: int
    name: str
    latents: list[Latent]
    baseline: list[Context]  # even-rank random tokens
    baseline_latents: list[np.ndarray]  # per baseline token: the latents firing there
    pool: list[Context]  # odd-rank random tokens
    pool_latents: list[np.ndarray]
    pool_fires: dict[int, set[int]] = field(
        default_factory=dict
    )  # latent -> pool tokens it fires on
    baseline_fires: dict[int, int] = field(default_factory=dict)  # latent -> bitmask over baseline

    def __post_init__(self) -> None:
        for k, lat in enumerate(self.pool_latents):
            for j in lat.tolist():
                self.pool_fires.setdefault(j, set()).add(k)
        for k, lat in enumerate(self.baseline_latents):
            for j in lat.tolist():
                self.baseline_fires[j] = self.baseline_fires.get(j, 0) | (1 << k)


class Corpus:
    """The database's sequences and vocabulary, loaded once."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.seqs = {
            s: np.frombuffer(b, dtype=np.int32)
            for s, b in conn.execute("SELECT id, tokens FROM sequences")
        }
        self.vocab: dict[int, str] = dict(conn.execute("SELECT id, text FROM vocab").fetchall())
        cfg = json.loads(conn.execute("SELECT value FROM meta WHERE key = 'config'").fetchone()[0])
        self.window = int(cfg["stats"]["window"])

    def left(self, seq: int, pos: int) -> tuple[int, ...]:
        ids = self.seqs[seq]
        lo = pos - self.window
        return tuple(ids[lo if lo > 0 else 0 : pos + 1])

    def text(self, token: int) -> str:
        return self.vocab.get(token, f"<{token}>")


def _context(corpus: Corpus, act: float, seq: int, pos: int, blob: bytes) -> tuple[Context, np.ndarray]:  # fmt: skip
    """The context, and the latent's activations over the whole recorded window."""
    ids = corpus.left(seq, pos)
    window = np.frombuffer(blob, dtype=np.float32)
    w = (len(window) - 1) // 2
    acts = tuple(window[w - len(ids) + 1 : w + 1].tolist()) if len(window) else ()
    return Context(ids, act, acts, (seq, pos)), window


def load_sae(conn: sqlite3.Connection, corpus: Corpus, sae: int, name: str, latents: list[int] | None = None) -> SaeData:  # fmt: skip
    """The live latents of SAE `sae` (all, or those in `latents`), with their contexts split."""
    try:
        samples = conn.execute(
            "SELECT rank, seq, pos, latents, acts FROM samples WHERE sae = ? ORDER BY rank", (sae,)
        ).fetchall()
    except sqlite3.OperationalError as e:
        raise ExplainError(
            "this feature database predates the random-token samples explain needs; rerun `lmscope interpret`"
        ) from e
    baseline: list[Context] = []
    pool: list[Context] = []
    base_lat: list[np.ndarray] = []
    pool_lat: list[np.ndarray] = []
    fires: dict[int, list[tuple[int, Context]]] = {}  # latent -> (rank, context) of random tokens
    for rank, seq, pos, lat_blob, act_blob in samples:
        lat = np.frombuffer(lat_blob, dtype=np.int32)
        acts = np.frombuffer(act_blob, dtype=np.float32)
        ctx = Context(corpus.left(seq, pos), 0.0, (), (seq, pos))
        (baseline if rank % 2 == 0 else pool).append(ctx)
        (base_lat if rank % 2 == 0 else pool_lat).append(lat)
        if rank % 2:
            for j, a in zip(lat.tolist(), acts.tolist()):
                fires.setdefault(j, []).append((rank, Context(ctx.ids, a, (), (seq, pos))))
    rows = conn.execute(
        "SELECT idx, density, max_act FROM features WHERE sae = ? AND n_fire > 0 ORDER BY idx",
        (sae,),
    ).fetchall()
    wanted = None if latents is None else set(latents)
    out = {i: Latent(sae, i, d, m) for i, d, m in rows if wanted is None or i in wanted}
    examples: dict[int, list[tuple[int, int, Context]]] = {}
    windows: dict[tuple[int, int, int], np.ndarray] = {}  # (latent, seq, pos) -> recorded window
    for idx, band, rank, act, seq, pos, blob in conn.execute(
        "SELECT idx, band, rank, act, seq, pos, acts FROM examples WHERE sae = ? AND band >= -1 "
        "ORDER BY idx, band, rank",
        (sae,),
    ):
        if idx in out:
            ctx, windows[idx, seq, pos] = _context(corpus, act, seq, pos, blob)
            examples.setdefault(idx, []).append((band, rank, ctx))
    for idx, token in conn.execute(
        "SELECT idx, token FROM logits WHERE sae = ? AND sign = 1 AND rank < 5 ORDER BY idx, rank",
        (sae,),
    ):
        if idx in out:
            out[idx].promotes.append(token)
    pool_at = {c.where for c in pool}
    for idx, latent in out.items():
        _split(latent, examples.get(idx, []), [c for _, c in fires.get(idx, [])])
        latent.extra = _extra(corpus, latent, windows, pool_at)
    return SaeData(sae, name, list(out.values()), baseline, base_lat, pool, pool_lat)


MAX_EXTRA = 64  # extra contexts per latent (a deterministic sample when there are more)


def _extra(corpus: Corpus, lat: Latent, windows: dict[tuple[int, int, int], np.ndarray],
           pool_at: set[tuple[int, int]]) -> list[Context]:  # fmt: skip
    """Tokens where `lat` fires in the windows of its shown contexts that no scorer asks about."""
    asked = set(pool_at)
    for c in lat.held:
        seq, pos = c.where
        if c.acts:  # a band context: fuzzing highlights any of its tokens
            asked.update((seq, p) for p in range(pos - len(c.ids) + 1, pos + 1))
        asked.add(c.where)
    seen = {c.where for c in lat.shown}
    found: list[tuple[int, int, float]] = []
    for c in lat.shown:
        seq, pos = c.where
        window = windows.get((lat.index, seq, pos))
        if window is None or not len(window):
            continue
        w = (len(window) - 1) // 2
        n = len(corpus.seqs[seq])
        for o in np.flatnonzero(window > 0).tolist():
            where = (seq, pos + o - w)
            if 0 <= where[1] < n and where not in seen and where not in asked:
                seen.add(where)
                found.append((*where, float(window[o])))
    if len(found) > MAX_EXTRA:
        found = sorted(random.Random(f"{lat.sae}:{lat.index}:extra").sample(found, MAX_EXTRA))
    return [Context(corpus.left(s, p), a, (), (s, p)) for s, p, a in found]


def _split(
    lat: Latent, examples: list[tuple[int, int, Context]], random_fires: list[Context]
) -> None:
    top = [c for band, _, c in examples if band == -1]
    shown = top + [c for band, rank, c in examples if band >= 0 and rank % 2 == 0]
    seen = {c.where for c in shown}
    held: list[Context] = []
    for c in [c for band, rank, c in examples if band >= 0 and rank % 2 == 1] + random_fires:
        if c.where not in seen:
            seen.add(c.where)
            held.append(c)
    if not held and len(top) > 1:  # a rare latent: every firing it had is among the top contexts
        held = top[1::2]
        moved = {c.where for c in held}
        shown = [c for c in shown if c.where not in moved]
    lat.shown, lat.held = _unique(shown), held


def _unique(contexts: list[Context]) -> list[Context]:
    seen: set[tuple[int, int]] = set()
    out = []
    for c in contexts:
        if c.where not in seen:
            seen.add(c.where)
            out.append(c)
    return out
