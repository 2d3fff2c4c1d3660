"""Scorers: how well a label predicts where its latent fires, on contexts its explainer never saw.

- *detection*: the latent's held-out activating contexts (odd-rank band samples and random tokens
  where it fires) and as many of the SAE's held-out random tokens where it is silent; the judge
  says for each whether the latent fires on its last token. Balanced accuracy.
- *fuzzing*: each held-out band context twice, once with the tokens where the latent fires
  highlighted and once with as many tokens highlighted at random; the judge says which
  highlightings are right. Balanced accuracy.

A judge is the simulator (`SimulatorJudge`) or an LLM (`lmscope.interp.explain.llm.LLMJudge`). The
contexts a latent is scored on are drawn with a random generator seeded by the SAE and latent, so
scores repeat exactly.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from lmscope.interp.explain import ExplainError
from lmscope.interp.explain.records import Latent, SaeData
from lmscope.interp.explain.simulator import parse_label

SCORERS = ("detection", "fuzzing")


class JudgeFailure(ExplainError):
    """The judge (an LLM) did not answer the judgements asked for: recorded as the score's
    `error` (value NULL), never a reason to stop the run."""


@dataclass
class Item:
    """One question to a judge: `texts` (token texts, the token asked about last for detection),
    `marked` (highlighted positions, fuzzing only) and the true answer."""

    texts: list[str]
    truth: bool
    marked: tuple[int, ...] = ()


class Judge(Protocol):
    """Says for each item whether it is true; None where it gave no answer. `latent` is what the
    items are about (for request tags), when known."""

    name: str

    def detect(self, label: str, items: Sequence[Item], latent: Latent | None = None) -> Sequence[bool | None]: ...  # fmt: skip

    def fuzz(self, label: str, items: Sequence[Item], latent: Latent | None = None) -> Sequence[bool | None]: ...  # fmt: skip


class SimulatorJudge:
    """Predicts from the label's rule (`simulator.parse_label`): a context fires when the rule
    holds on its last token; a highlighting is right when the rule holds on at least half of it."""

    name = "simulator"

    def detect(self, label: str, items: Sequence[Item], latent: Latent | None = None) -> list[bool | None]:  # fmt: skip
        rule = parse_label(label)
        return [rule.fires(it.texts) for it in items]

    def fuzz(self, label: str, items: Sequence[Item], latent: Latent | None = None) -> list[bool | None]:  # fmt: skip
        rule = parse_label(label)
        return [
            2 * sum(rule.fires_at(it.texts, i) for i in it.marked) >= len(it.marked) for it in items
        ]


def balanced_accuracy(truth: Sequence[bool], said: Sequence[bool]) -> float | None:
    """Mean of the hit rates on true and on false items; None without both kinds."""
    pos = [s for t, s in zip(truth, said, strict=True) if t]
    neg = [not s for t, s in zip(truth, said, strict=True) if not t]
    if not pos or not neg:
        return None
    return (sum(pos) / len(pos) + sum(neg) / len(neg)) / 2


def _rng(latent: Latent, what: str) -> random.Random:
    return random.Random(f"{latent.sae}:{latent.index}:{what}")


def detection_items(latent: Latent, data: SaeData, text: Callable[[int], str], limit: int | None = None) -> list[Item]:  # fmt: skip
    """`limit`: at most that many items, half of them activating (drawn from the held-out ones)."""
    rng = _rng(latent, "detection")
    fires = data.pool_fires.get(latent.index, set())
    silent = [c for k, c in enumerate(data.pool) if k not in fires]
    held = latent.held
    if limit is not None and len(held) > max(1, limit // 2):
        held = rng.sample(held, max(1, limit // 2))
    negatives = rng.sample(silent, min(len(silent), len(held)))
    items = [Item([text(t) for t in c.ids], True) for c in held]
    items += [Item([text(t) for t in c.ids], False) for c in negatives]
    rng.shuffle(items)
    return items


def fuzzing_items(latent: Latent, text: Callable[[int], str], limit: int | None = None) -> list[Item]:  # fmt: skip
    """`limit`: at most that many items (pairs of the first held-out band contexts)."""
    rng = _rng(latent, "fuzzing")
    items: list[Item] = []
    for c in latent.held:
        if limit is not None and len(items) >= max(2, limit):
            break
        if len(c.acts) != len(c.ids):
            continue  # a random token: its neighbours' activations were not recorded
        right = tuple(i for i, a in enumerate(c.acts) if a > 0)
        if not right or len(right) == len(c.ids):
            continue  # nothing to tell apart
        wrong = right
        while wrong == right:
            wrong = tuple(sorted(rng.sample(range(len(c.ids)), len(right))))
        texts = [text(t) for t in c.ids]
        items += [Item(texts, True, right), Item(texts, False, wrong)]
    rng.shuffle(items)
    return items


def score(scorer: str, judge: Judge, label: str, items: Sequence[Item], latent: Latent | None = None) -> float | None:  # fmt: skip
    """One scorer's balanced accuracy for `label` on `items` (None when they lack a kind). Items
    the judge left unanswered do not count; `JudgeFailure` when too few were answered to score."""
    if not any(it.truth for it in items) or all(it.truth for it in items):
        return None
    said = (judge.detect if scorer == "detection" else judge.fuzz)(label, items, latent)
    pairs = [(it.truth, s) for it, s in zip(items, said, strict=True) if s is not None]
    value = balanced_accuracy([t for t, _ in pairs], [s for _, s in pairs])
    if value is None:
        raise JudgeFailure(f"the judge answered {len(pairs)} of {len(items)} {scorer} items, too few to score")  # fmt: skip
    return value


def items_for(scorer: str, latent: Latent, data: SaeData, text: Callable[[int], str], limit: int | None = None) -> list[Item]:  # fmt: skip
    return (
        detection_items(latent, data, text, limit)
        if scorer == "detection"
        else fuzzing_items(latent, text, limit)
    )
