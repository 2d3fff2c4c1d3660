"""An LLM as explainer and judge, through an OpenAI-compatible chat server (`client.ChatClient`).

Prompts follow Neuronpedia's and Delphi's: excerpts of text with the tokens where the latent fires
marked `<<like this>>` and their activations, strongest first, plus the tokens its decoder
promotes. The judge gets numbered excerpts and answers a JSON list of 0/1, asked for through the
server's structured output where it has one; a reply that still is not such a list is asked
again once with a reminder. Small models often answer nonsense: what they never answer is a
recorded failure (`JudgeFailure`, `NoLabel`: the score's `error`), not a reason to stop the run.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from lmscope.interp.explain import ExplainError
from lmscope.interp.explain.client import ChatClient
from lmscope.interp.explain.records import Context, Latent
from lmscope.interp.explain.scorers import Item, JudgeFailure

N_SHOWN = 12  # contexts in an explanation prompt
ANSWER = re.compile(r"\b(0|1|yes|no|true|false)\b", re.IGNORECASE)
NUMBERING = re.compile(r"(?m)^\s*\d+\s*[.):]")  # "1. yes" numbers the answer, is not one

EXPLAIN_SYSTEM = (
    "You label features of a language model. Each excerpt shows text where the feature fires; the "
    "tokens it fires on are marked <<like this>> with the activation after them. Reply with one "
    "short phrase (at most 12 words) saying what the feature fires on, quoting key tokens in "
    "double quotes. No preamble."
)
DETECT_PROMPT = (
    "Feature: {label}\n\nFor each numbered excerpt, answer 1 if the feature fires on its final token "
    '(marked <<like this>>), else 0.\n\n{items}\n\nReply with JSON: {{"answers": [{n} numbers, 0 or 1]}}'
)
FUZZ_PROMPT = (
    "Feature: {label}\n\nIn each numbered excerpt some tokens are marked <<like this>>. Answer 1 if the "
    "marked tokens are where the feature fires, 0 if they were marked at random.\n\n{items}\n\n"
    'Reply with JSON: {{"answers": [{n} numbers, 0 or 1]}}'
)


ANSWER_AGAIN = (
    'Reply with the JSON object only: {{"answers": [...]}} with {n} numbers, each 0 or 1.'
)
LABEL_AGAIN = "Reply with the label only: one short phrase saying what the feature fires on."
LABEL_TOKENS = 24
LABEL_PREFIX = re.compile(r"^(?:\*\*)?(?:label|feature|answer)\s*:\s*", re.IGNORECASE)
WORD = re.compile(r"\w")


def _mark(texts: Sequence[str], marked: Sequence[int], acts: Sequence[float] = ()) -> str:
    out = []
    for i, t in enumerate(texts):
        if i in marked:
            out.append(f"<<{t}>>" + (f"({acts[i]:.2g})" if acts else ""))
        else:
            out.append(t)
    return "".join(out).replace("\n", "\\n")


def explain_prompt(latent: Latent, text: Callable[[int], str], n_shown: int = N_SHOWN) -> list[dict[str, str]]:  # fmt: skip
    shown: list[Context] = sorted(latent.shown, key=lambda c: -c.act)[:n_shown]
    lines = []
    for k, c in enumerate(shown, 1):
        texts = [text(t) for t in c.ids]
        acts = c.acts if len(c.acts) == len(c.ids) else ()
        marked = [i for i, a in enumerate(acts) if a > 0] if acts else [len(texts) - 1]
        lines.append(f"{k}. {_mark(texts, marked, acts or [0.0] * (len(texts) - 1) + [c.act])}")
    promotes = ", ".join(
        json.dumps(text(p).strip() or text(p), ensure_ascii=False) for p in latent.promotes
    )
    user = (
        "Excerpts:\n"
        + "\n".join(lines)
        + (f"\n\nTokens it makes more likely next: {promotes}" if promotes else "")
    )
    return [{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": user}]


def parse_answers(reply: str, n: int) -> list[bool] | None:
    """n yes/no answers from a reply: a JSON object's `answers`, a JSON list, or n bare 0/1 words."""
    candidates: list[Any] = []
    try:
        data = json.loads(reply)
        candidates.append(data.get("answers") if isinstance(data, dict) else data)
    except ValueError:
        pass
    candidates += [json.loads(m) for m in re.findall(r"\[[^\[\]]*\]", reply) if _is_json(m)]
    for c in candidates:
        if isinstance(c, list) and len(c) == n and all(str(x).lower() in ("0", "1", "true", "false", "yes", "no") for x in c):  # fmt: skip
            return [str(x).lower() in ("1", "true", "yes") for x in c]
    words = ANSWER.findall(NUMBERING.sub("", reply))
    if len(words) == n:
        return [w.lower() in ("1", "true", "yes") for w in words]
    return None


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def _schema(n: int) -> dict[str, Any]:
    answers = {
        "type": "array",
        "items": {"type": "integer", "enum": [0, 1]},
        "minItems": n,
        "maxItems": n,
    }
    return {"type": "object", "properties": {"answers": answers}, "required": ["answers"]}


class NoLabel(ExplainError):
    """The LLM answered no usable label: recorded as the latent's scores' `error`."""


def clean_label(reply: str) -> str:
    """The label in a reply: its first non-empty line, without a `Label:` prefix or wrapping
    quotes, whitespace collapsed, at most 300 characters."""
    for line in reply.strip().splitlines():
        line = LABEL_PREFIX.sub("", line.strip()).strip().strip("`*").strip()
        if len(line) >= 2 and line[0] == line[-1] == '"' and '"' not in line[1:-1]:
            line = line[1:-1]
        line = " ".join(line.split())[:300]
        if WORD.search(line):
            return line
    return ""


def _tag(latent: Latent | None, what: str) -> str | None:
    return None if latent is None else f"{latent.sae}:{latent.index}:{what}"


class LLMExplainer:
    """`n_shown`: the strongest contexts in the prompt."""

    def __init__(self, client: ChatClient, text: Callable[[int], str], n_shown: int = N_SHOWN) -> None:  # fmt: skip
        self.client, self.text, self.n_shown = client, text, n_shown
        self.name = f"openai:{client.model}"

    def explain(self, latent: Latent) -> str:
        """The label, asked once more (with the first reply and a reminder) when the first reply
        holds none; `NoLabel` when neither does."""
        messages = explain_prompt(latent, self.text, self.n_shown)
        reply = ""
        for _ in range(2):
            reply = self.client.chat(messages, max_tokens=LABEL_TOKENS, tag=_tag(latent, "explain"))
            label = clean_label(reply)
            if label:
                return label
            messages = [*messages, {"role": "assistant", "content": reply},
                        {"role": "user", "content": LABEL_AGAIN}]  # fmt: skip
        raise NoLabel(
            f"no label in the explainer's replies (last: {' '.join(reply.split())[:80]!r})"
        )


class LLMJudge:
    """Asks for all items of a scorer in one request (a JSON list), once more with the reply and
    a reminder when it is not such a list; then gives up (`JudgeFailure`: `run` records it)."""

    def __init__(self, client: ChatClient) -> None:
        self.client = client
        self.name = f"openai:{client.model}"

    def _ask(self, prompt: str, n: int, tag: str | None) -> list[bool | None]:
        messages = [{"role": "user", "content": prompt}]
        for _ in range(2):
            reply = self.client.chat(messages, max_tokens=8 + 3 * n, schema=_schema(n), tag=tag)
            answers = parse_answers(reply, n)
            if answers is not None:
                return list(answers)
            messages = [*messages, {"role": "assistant", "content": reply},
                        {"role": "user", "content": ANSWER_AGAIN.format(n=n)}]  # fmt: skip
        raise JudgeFailure(f"no list of {n} yes/no answers in the judge's replies (last: {' '.join(reply.split())[:80]!r})")  # fmt: skip

    def detect(self, label: str, items: Sequence[Item], latent: Latent | None = None) -> list[bool | None]:  # fmt: skip
        body = "\n".join(f"{k}. {_mark(it.texts, [len(it.texts) - 1])}" for k, it in enumerate(items, 1))  # fmt: skip
        prompt = DETECT_PROMPT.format(label=label, items=body, n=len(items))
        return self._ask(prompt, len(items), _tag(latent, "detection"))

    def fuzz(self, label: str, items: Sequence[Item], latent: Latent | None = None) -> list[bool | None]:  # fmt: skip
        body = "\n".join(f"{k}. {_mark(it.texts, it.marked)}" for k, it in enumerate(items, 1))
        prompt = FUZZ_PROMPT.format(label=label, items=body, n=len(items))
        return self._ask(prompt, len(items), _tag(latent, "fuzzing"))
