"""The built-in judge: reads a label as a rule over tokens and predicts from it whether a latent
fires on the last token of a context.

A label's head (before `·`) says what the latent fires on, then optionally the context before it:

- quoted strings (JSON string syntax) are tokens; `any <class>` names a class of tokens
  (`CLASSES`: punctuation, number, capitalised word, word piece, line break, space); `any token`
  means every token;
- `after` followed by quoted tokens: one of them must occur among the preceding tokens;
  `right after`: one of them must be the token just before;
- `;` separates alternatives (clauses of that form, any one of which makes it fire); a clause that
  starts with `after` or `right after` fires on any token with that context.

What follows `·` (`promotes ...`) describes the output side and is not used. A label without
quotes or classes (an LLM's prose) counts every word in it as a firing token.

>>> rule = parse_label('"class", "def", any number after ":"; right after "@" · promotes "foo"')
>>> rule.fires(["x", ":", " class"]), rule.fires([":", " 42"]), rule.fires(["@", "x"])
(True, True, True)
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
WORD = re.compile(r"\w+")
STOP = frozenset(
    "the a an of on in to and or is it its this that fires token tokens word words".split()
)
CLASSES = ("punctuation", "number", "capitalised word", "word piece", "line break", "space")
CLAUSE = re.compile(r'"(?:[^"\\]|\\.)*"|;')
SPLIT = re.compile(r'"(?:[^"\\]|\\.)*"| (right )?after ')
CLASS_RE = re.compile(r"\bany (" + "|".join(CLASSES) + r")\b")


@lru_cache(maxsize=1 << 18)
def token_key(text: str) -> str:
    """How the simulator compares tokens: surrounding whitespace dropped and case folded; a
    whitespace-only token stays as it is (a newline is not a space)."""
    return text.strip().casefold() or text


@lru_cache(maxsize=1 << 18)
def token_class(text: str) -> str | None:
    """The class of a token's text (`CLASSES`), or None: a line break holds a newline, a space is
    other whitespace only, a number is digits, punctuation is punctuation or symbol characters, a
    capitalised word is letters starting upper case, a word piece is lower-case letters with no
    space before them (the middle or end of a word)."""
    if "\n" in text:
        return "line break"
    s = text.strip()
    if not s:
        return "space"
    if s.isdigit():
        return "number"
    if all(unicodedata.category(ch)[0] in "PS" for ch in s):
        return "punctuation"
    if s.isalpha():
        if s[0].isupper():
            return "capitalised word"
        if text == s and s.islower():
            return "word piece"
    return None


@dataclass(frozen=True)
class Rule:
    """Fires on a token whose key is in `tokens` or whose class is in `classes` (`tokens` None:
    any token), when one of the preceding tokens' keys is in `after` and the token just before
    has its key in `prev` (each: empty for no condition)."""

    tokens: frozenset[str] | None
    after: frozenset[str] = frozenset()
    classes: frozenset[str] = frozenset()
    prev: frozenset[str] = frozenset()
    alternatives: tuple[Rule, ...] = ()  # further clauses: it fires when any one does

    def fires(self, texts: Sequence[str]) -> bool:
        """`texts`: the context's token texts, the token asked about last."""
        return self._fires(texts) or any(r._fires(texts) for r in self.alternatives)

    def _fires(self, texts: Sequence[str]) -> bool:
        if not texts:
            return False
        last = texts[-1]
        if self.tokens is not None and token_key(last) not in self.tokens:
            if not self.classes or token_class(last) not in self.classes:
                return False
        if self.prev and (len(texts) < 2 or token_key(texts[-2]) not in self.prev):
            return False
        return not self.after or any(token_key(t) in self.after for t in texts[:-1])

    def fires_at(self, texts: Sequence[str], i: int) -> bool:
        return self.fires(texts[: i + 1])


def quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def render(tokens: Sequence[str] | None, after: Sequence[str] = (), promotes: Sequence[str] = (),
           classes: Sequence[str] = (), prev: Sequence[str] = (),
           alternatives: Sequence[str] = ()) -> str:  # fmt: skip
    """A label in the form `parse_label` reads: `tokens` it fires on (None: any token) and token
    `classes`, the `after` context or the `prev` token, further clauses (`alternatives`, rendered
    by `clause`), the logit-lens tokens it `promotes`; each a display spelling, most common first."""
    # an alternative of any token with a context reads as `after "x"`
    alts = [a.removeprefix("any token ") for a in alternatives]
    head = "; ".join([clause(tokens, after, classes, prev), *alts])
    if promotes:
        head += " · promotes " + ", ".join(quote(p) for p in promotes)
    return head


def clause(tokens: Sequence[str] | None, after: Sequence[str] = (), classes: Sequence[str] = (),
           prev: Sequence[str] = ()) -> str:  # fmt: skip
    """One clause: `"a", "b", any number after "x"`, or `any token right after "y"`."""
    parts = [quote(t) for t in tokens or ()] + [f"any {c}" for c in classes]
    head = "any token" if tokens is None else ", ".join(parts)
    if prev:
        head += " right after " + ", ".join(quote(t) for t in prev)
    elif after:
        head += " after " + ", ".join(quote(t) for t in after)
    return head


def _keys(part: str) -> frozenset[str]:
    out = set()
    for q in QUOTED.findall(part):
        try:
            out.add(token_key(json.loads(q)))
        except json.JSONDecodeError:
            out.add(token_key(q[1:-1]))
    return frozenset(out)


@lru_cache(maxsize=1 << 16)
def parse_label(label: str) -> Rule:
    """The rule a label states (see the module docstring)."""
    head = label.split("·", 1)[0]
    clauses, start = [], 0
    for m in CLAUSE.finditer(head):  # split at `;` outside quotes
        if m.group(0) == ";":
            clauses.append(head[start : m.start()])
            start = m.end()
    clauses.append(head[start:])
    rules = [_clause(c.strip()) for c in clauses if c.strip()]
    if not rules:
        return Rule(frozenset())
    return replace(rules[0], alternatives=tuple(rules[1:])) if len(rules) > 1 else rules[0]


def _clause(head: str) -> Rule:
    if head.startswith(("after ", "right after ")):
        head = "any token " + head
    bare = QUOTED.sub('""', head)  # class names and "after" count outside quotes only
    classes = frozenset(CLASS_RE.findall(bare.split(" after ", 1)[0]))
    if not QUOTED.search(head) and not classes and "any token" not in bare:
        words = [w.casefold() for w in WORD.findall(head) if w.casefold() not in STOP]
        return Rule(frozenset(words) if words else frozenset())
    fire_part, ctx_part, right = head, "", False
    for m in SPLIT.finditer(head):  # the first " after " outside quotes
        if not m.group(0).startswith('"'):
            fire_part, ctx_part, right = head[: m.start()], head[m.end() :], bool(m.group(1))
            break
    bare_fire = QUOTED.sub('""', fire_part)
    any_token = "any token" in bare_fire and not QUOTED.search(fire_part) and not classes
    tokens = None if any_token else _keys(fire_part)
    ctx = _keys(ctx_part)
    return Rule(tokens, frozenset() if right else ctx, classes, ctx if right else frozenset())
