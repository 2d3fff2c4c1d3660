"""The built-in judge: reads a label as a rule over tokens and predicts from it whether a latent
fires on the last token of a context.

A label's quoted strings (JSON string syntax) before `·` are its tokens: those before the word
`after` are what it fires on (`any token` means every token), those after it the context that must
occur among the preceding tokens. What follows `·` (`promotes ...`) describes the output side and
is not used. A label without quotes (an LLM's prose) counts every word in it as a firing token.

>>> rule = parse_label('"class", "def" after ":" · promotes "foo"')
>>> rule.fires(["x", ":", " class"])
True
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
WORD = re.compile(r"\w+")
STOP = frozenset(
    "the a an of on in to and or is it its this that fires token tokens word words".split()
)


def token_key(text: str) -> str:
    """How the simulator compares tokens: surrounding whitespace dropped and case folded; a
    whitespace-only token stays as it is (a newline is not a space)."""
    return text.strip().casefold() or text


@dataclass(frozen=True)
class Rule:
    """Fires on a token whose key is in `tokens` (None: any token), when one of the preceding
    tokens' keys is in `after` (empty: no condition)."""

    tokens: frozenset[str] | None
    after: frozenset[str] = frozenset()

    def fires(self, texts: Sequence[str]) -> bool:
        """`texts`: the context's token texts, the token asked about last."""
        if not texts:
            return False
        if self.tokens is not None and token_key(texts[-1]) not in self.tokens:
            return False
        return not self.after or any(token_key(t) in self.after for t in texts[:-1])

    def fires_at(self, texts: Sequence[str], i: int) -> bool:
        return self.fires(texts[: i + 1])


def quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def render(
    tokens: Sequence[str] | None, after: Sequence[str] = (), promotes: Sequence[str] = ()
) -> str:
    """A label in the form `parse_label` reads: `tokens` it fires on (None: any token), the `after`
    context, the logit-lens tokens it `promotes`; each a display spelling, most common first."""
    head = "any token" if tokens is None else ", ".join(quote(t) for t in tokens)
    if after:
        head += " after " + ", ".join(quote(t) for t in after)
    if promotes:
        head += " · promotes " + ", ".join(quote(p) for p in promotes)
    return head


def parse_label(label: str) -> Rule:
    """The rule a label states (see the module docstring)."""
    head = label.split("·", 1)[0]
    if not QUOTED.search(head):
        words = [w.casefold() for w in WORD.findall(head) if w.casefold() not in STOP]
        return Rule(frozenset(words) if words else frozenset())
    fire_part, _, after_part = head.partition(" after ")

    def keys(part: str) -> frozenset[str]:
        out = set()
        for q in QUOTED.findall(part):
            try:
                out.add(token_key(json.loads(q)))
            except json.JSONDecodeError:
                out.add(token_key(q[1:-1]))
        return frozenset(out)

    tokens = None if "any token" in fire_part and not QUOTED.search(fire_part) else keys(fire_part)
    return Rule(tokens, keys(after_part))
