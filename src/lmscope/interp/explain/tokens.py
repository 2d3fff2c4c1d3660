"""The `tokens` explainer: a label from what a latent's records hold, with no LLM.

It fits a rule of the simulator's form (`simulator.Rule`) that best separates the latent's
*positives* from the SAE's baseline of ordinary text where the latent is silent, and writes it
with the logit-lens tokens the latent promotes:
`"class", "def", any number; right after "@"; after "import" · promotes "foo", "bar"`.

Positives, all on the explainer's side of the split (`records`): the shown contexts, the extra
firings recorded in their windows, and the baseline tokens where the latent fires. The rule is a
union of *elements*: a token it fires on, a token class, a token just before (`right after`), a
token anywhere in the window before (`after`). Greedily, the element that raises the union's
balanced accuracy on positives against baseline most, less a small cost per element (a class or
a context token costs more than a token), joins while that gain is positive, up to 16. Sets of
contexts are Python ints used as bitmasks (the baseline's per SAE), so a latent costs a few
hundred integer operations.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lmscope.interp.explain.records import Context, Latent, SaeData
from lmscope.interp.explain.simulator import clause, render, token_class, token_key

MAX_ELEMENTS = 16  # tokens, classes and context tokens named in a label
N_CANDIDATES = 24  # context tokens considered (most gain first), each of `right after` and `after`
COST = 0.005  # balanced accuracy given up per token named
CLASS_COST = 0.02  # ... per token class (a class must beat naming its few tokens)
CTX_COST = 0.01  # ... per context token
N_PROMOTES = 3


@dataclass
class _Masks:
    """Bitmasks over a list of contexts: by last token key, last token class, keys before the
    last token, key of the token just before it."""

    n: int
    last: dict[str, int]
    cls: dict[str, int]
    before: dict[str, int]
    prev: dict[str, int]

    @property
    def all(self) -> int:
        return (1 << self.n) - 1


class TokensExplainer:
    """Labels the latents of one SAE; keys, classes and spellings of its vocabulary and the
    baseline's bitmasks are computed once."""

    name = "tokens"

    def __init__(self, data: SaeData, text: Callable[[int], str]) -> None:
        self.text = text
        self._keys: dict[int, str] = {}
        self._classes: dict[str, str | None] = {}  # key -> class of its first spelling seen
        self._baseline_raw = data.baseline
        self.base = self._masks(data.baseline)
        self._fires = data.baseline_fires

    def key(self, token: int) -> str:
        k = self._keys.get(token)
        if k is None:
            t = self.text(token)
            k = self._keys[token] = token_key(t)
            self._classes.setdefault(k, token_class(t))
        return k

    def _masks(self, contexts: Sequence[Context]) -> _Masks:
        last: dict[str, int] = {}
        cls: dict[str, int] = {}
        before: dict[str, int] = {}
        prev: dict[str, int] = {}
        for i, c in enumerate(contexts):
            bit = 1 << i
            ids = c.ids
            k = self.key(ids[-1])
            last[k] = last.get(k, 0) | bit
            cl = token_class(self.text(ids[-1]))
            if cl is not None:
                cls[cl] = cls.get(cl, 0) | bit
            for t in set(ids[:-1]):
                kb = self.key(t)
                before[kb] = before.get(kb, 0) | bit
            if len(ids) > 1:
                kp = self.key(ids[-2])
                prev[kp] = prev.get(kp, 0) | bit
        return _Masks(len(contexts), last, cls, before, prev)

    def explain(self, latent: Latent) -> str:
        fires = self._fires.get(latent.index, 0)
        fired = [self._baseline_raw[i] for i in range(self.base.n) if fires >> i & 1]
        contexts = [*latent.shown, *latent.extra, *fired]
        if not contexts:
            return "no recorded contexts"
        pos = self._masks(contexts)
        silent = self.base.all & ~fires
        n_pos, n_neg = pos.n, silent.bit_count()
        if n_neg == 0:
            return render(None, promotes=self._promotes(latent))
        # elements of the disjunction: (kind, key, positives, negatives, cost)
        elements: list[tuple[str, str, int, int, float]] = []
        for kind, pmap, nmap, cost, limit in (
            ("L", pos.last, self.base.last, COST, None),
            ("C", pos.cls, self.base.cls, CLASS_COST, None),
            ("P", pos.prev, self.base.prev, CTX_COST, N_CANDIDATES),
            ("W", pos.before, self.base.before, CTX_COST, N_CANDIDATES),
        ):
            found = []
            for k, m in pmap.items():
                pc = m.bit_count()
                neg = nmap.get(k, 0) & silent
                g = pc / n_pos - neg.bit_count() / n_neg
                if g / 2 > cost:
                    found.append((g, k, m, neg))
            found.sort(key=lambda x: (-x[0], x[1]))
            elements += [(kind, k, m, neg, cost) for _, k, m, neg in found[:limit]]
        chosen = self._greedy(elements, n_pos, n_neg)
        if not chosen:  # nothing recurs: the most frequent firing token
            top = max(pos.last, key=lambda k: (pos.last[k].bit_count(), k))
            chosen = [("L", top)]
        spell = self._spellings(contexts, {k for _, k in chosen})
        by = {kind: [spell.get(k, k) for kd, k in chosen if kd == kind] for kind in "LCPW"}
        promotes = self._promotes(latent)
        alts = [clause(None, prev=by["P"])] if by["P"] else []
        alts += [clause(None, after=by["W"])] if by["W"] else []
        if by["L"] or by["C"]:
            return render(by["L"], (), promotes, by["C"], (), alts)
        if by["P"]:  # any token right after these (the lead clause), or after those
            return render(None, (), promotes, (), by["P"], alts[1:])
        return render(None, by["W"], promotes)

    @staticmethod
    def _greedy(elements: list[tuple[str, str, int, int, float]], n_pos: int, n_neg: int) -> list[tuple[str, str]]:  # fmt: skip
        """Grow the union of `elements` one at a time, each time the one that raises its balanced
        accuracy (less the element's cost) most, while that gain is positive (lazy evaluation:
        a gain only shrinks as the union grows, nearly always)."""
        p_m = n_m = 0
        chosen: list[tuple[str, str]] = []
        heap = [(-(p.bit_count() / n_pos - n.bit_count() / n_neg) / 2 + c, i) for i, (_, _, p, n, c) in enumerate(elements)]  # fmt: skip
        heapq.heapify(heap)
        while heap and len(chosen) < MAX_ELEMENTS:
            _, i = heapq.heappop(heap)
            kind, k, p, n, c = elements[i]
            gain = ((p_m | p).bit_count() - p_m.bit_count()) / n_pos / 2
            gain -= ((n_m | n).bit_count() - n_m.bit_count()) / n_neg / 2
            gain -= c
            if heap and -gain > heap[0][0] + 1e-12:  # stale: put back with its current gain
                heapq.heappush(heap, (-gain, i))
                continue
            if gain <= 0:
                break
            chosen.append((kind, k))
            p_m |= p
            n_m |= n
        return chosen

    def _spellings(self, contexts: Sequence[Context], keys: set[str]) -> dict[str, str]:
        """Each of `keys`' most common display spelling among the tokens the explainer saw."""
        counts: dict[int, int] = {}
        for c in contexts:
            for t in c.ids:
                counts[t] = counts.get(t, 0) + 1
        seen: dict[str, dict[str, int]] = {}
        for t, n in counts.items():
            k = self.key(t)
            if k in keys:
                raw = self.text(t)
                d = seen.setdefault(k, {})
                sp = raw.strip() or raw
                d[sp] = d.get(sp, 0) + n
        return {k: max(v, key=lambda s: (v[s], s)) for k, v in seen.items()}

    def _promotes(self, latent: Latent) -> list[str]:
        return [t.strip() or t for t in (self.text(p) for p in latent.promotes[:N_PROMOTES])]
