"""Explanations of latents and their scores, stored in the suite's `features.db`.

An *explainer* turns a latent's recorded contexts into a label: `tokens` (built in, no LLM) or
`openai:<base-url>#<model>` (any OpenAI-compatible chat-completions server). *Scorers*
(`detection`, `fuzzing`) measure how well the label predicts where the latent fires, on contexts
the explainer never saw; the judge is the LLM when one is given, else the built-in simulator.

>>> from lmscope.interp.explain import explain
>>> explain("runs/quick")                       # tokens labels + simulator scores, every live latent
>>> explain("runs/quick", explainer="openai:http://127.0.0.1:8080/v1#gemma", latents=20)
"""

from __future__ import annotations

from lmscope.interp import InterpError


class ExplainError(InterpError):
    """An explainer or scorer cannot run: bad choice, unreachable server, unusable reply."""


def __getattr__(name: str) -> object:  # the runner imports torch-free but heavier modules lazily
    if name in ("explain", "ExplainReport"):
        from lmscope.interp.explain import run

        return getattr(run, name)
    raise AttributeError(name)


__all__ = ["ExplainError", "ExplainReport", "explain"]
