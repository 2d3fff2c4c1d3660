"""The `tokens` explainer: a label from what a latent's records hold, with no LLM.

It fits the simplest rule of the simulator's form (`simulator.Rule`: fires on these tokens, after
that context) that best separates the latent's shown contexts from the SAE's baseline random
tokens where the latent is silent, then writes it with the logit-lens tokens the latent promotes:
`"class", "def" after ":" · promotes "foo", "bar"`.

Candidates: the n most frequent firing tokens (n = 1, 2, 3, 4, 6, 8), optionally with the one or two
preceding tokens that recur most in the shown contexts beyond their rate in ordinary text, and
"any token" after such context. Each is scored by balanced accuracy on the explainer's own data
(minus a small cost per token named, so that a shorter rule wins a tie). Sets of contexts are
Python ints used as bitmasks, so a candidate costs a few integer operations and the whole quick
scope (55k latents) takes seconds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lmscope.interp.explain.records import Context, Latent, SaeData
from lmscope.interp.explain.simulator import render, token_key

TOKEN_COUNTS = (1, 2, 3, 4, 6, 8)
MAX_AFTER = 2
MIN_AFTER_COVER = 0.3  # a context token must precede at least this share of the shown contexts
COST = 0.01  # balanced accuracy given up per token named
ANY_COST = 0.05  # ... and for "any token", which says less than naming a few
N_PROMOTES = 3


@dataclass
class Masks:
    """Bitmasks over a list of contexts: which end in each token key, which hold it before the end."""

    n: int
    last: dict[str, int]
    before: dict[str, int]

    @classmethod
    def of(cls, contexts: Sequence[Context], key: Callable[[int], str]) -> Masks:
        last: dict[str, int] = {}
        before: dict[str, int] = {}
        for i, c in enumerate(contexts):
            bit = 1 << i
            k = key(c.ids[-1])
            last[k] = last.get(k, 0) | bit
            for t in set(c.ids[:-1]):
                kb = key(t)
                before[kb] = before.get(kb, 0) | bit
        return cls(len(contexts), last, before)

    def match(self, tokens: Sequence[str] | None, after: Sequence[str]) -> int:
        m = (1 << self.n) - 1
        if tokens is not None:
            m = 0
            for k in tokens:
                m |= self.last.get(k, 0)
        if after:
            a = 0
            for k in after:
                a |= self.before.get(k, 0)
            m &= a
        return m


class TokensExplainer:
    """Labels the latents of one SAE; keys and spellings of its vocabulary are cached."""

    name = "tokens"

    def __init__(self, data: SaeData, text: Callable[[int], str]) -> None:
        self.text = text
        self._keys: dict[int, str] = {}
        self.baseline = Masks.of(data.baseline, self.key)
        self._fires = data.baseline_fires
        self._all = (1 << len(data.baseline)) - 1

    def key(self, token: int) -> str:
        k = self._keys.get(token)
        if k is None:
            k = self._keys[token] = token_key(self.text(token))
        return k

    def explain(self, latent: Latent) -> str:
        pos = Masks.of(latent.shown, self.key)
        if pos.n == 0:
            return "no recorded contexts"
        silent = self._all & ~self._fires.get(latent.index, 0)
        n_neg = silent.bit_count()
        spelled: dict[str, Counter[str]] = {}
        for c in latent.shown:
            raw = self.text(c.ids[-1])
            spelled.setdefault(self.key(c.ids[-1]), Counter())[raw.strip() or raw] += 1
        ranked = sorted(spelled, key=lambda k: -sum(spelled[k].values()))
        after = self._context_keys(latent, pos, silent, n_neg)

        def score(tokens: Sequence[str] | None, ctx: Sequence[str]) -> float:
            tpr = pos.match(tokens, ctx).bit_count() / pos.n
            tnr = 1.0 - (
                (self.baseline.match(tokens, ctx) & silent).bit_count() / n_neg if n_neg else 0.0
            )
            return (
                (tpr + tnr) / 2
                - COST * (len(tokens or ()) + len(ctx))
                - (ANY_COST if tokens is None else 0.0)
            )

        best: tuple[float, Sequence[str] | None, Sequence[str]] = (-1.0, ranked[:1], ())
        for ctx in [(), *(after[:m] for m in range(1, min(MAX_AFTER, len(after)) + 1))]:
            options: list[Sequence[str] | None] = [
                ranked[:n] for n in TOKEN_COUNTS if n <= len(ranked)
            ]
            options += (
                [ranked]
                if len(ranked) not in TOKEN_COUNTS and len(ranked) < max(TOKEN_COUNTS)
                else []
            )
            options += [None] if ctx else []
            for tokens in options:
                s = score(tokens, ctx)
                if s > best[0]:
                    best = (s, tokens, ctx)
        _, tokens, ctx = best
        shown_tokens = None if tokens is None else [spelled[k].most_common(1)[0][0] for k in tokens]
        shown_ctx = [self._spelling(latent, k) for k in ctx]
        promotes = [t.strip() or t for t in (self.text(p) for p in latent.promotes[:N_PROMOTES])]
        return render(shown_tokens, shown_ctx, promotes)

    def _context_keys(self, latent: Latent, pos: Masks, silent: int, n_neg: int) -> list[str]:
        """Keys that precede many shown contexts and more of them than of ordinary text."""
        lift = []
        for k, m in pos.before.items():
            cover = m.bit_count() / pos.n
            if cover < MIN_AFTER_COVER:
                continue
            base = (self.baseline.before.get(k, 0) & silent).bit_count() / n_neg if n_neg else 0.0
            if cover > base:
                lift.append((cover - base, k))
        lift.sort(key=lambda x: (-x[0], x[1]))
        return [k for _, k in lift[:MAX_AFTER]]

    def _spelling(self, latent: Latent, k: str) -> str:
        seen: Counter[str] = Counter()
        for c in latent.shown:
            for t in c.ids[:-1]:
                if self.key(t) == k:
                    raw = self.text(t)
                    seen[raw.strip() or raw] += 1
        return seen.most_common(1)[0][0] if seen else k
