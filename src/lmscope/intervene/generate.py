"""Text generation and next-token comparison with interventions active.

>>> generate(loaded, "The weather today is", [Steer(sae, 123, 8.0)], max_new_tokens=20)
>>> compare(loaded, "The capital of France is", [Ablate(sae, [123])])["kl"]
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lmscope.errors import InterventionError
from lmscope.intervene.hooks import Intervention, intervene
from lmscope.model import LoadedModel


def encode_prompt(loaded: LoadedModel, prompt: str) -> Tensor:
    """The prompt's token ids ``[1, T]`` as the model sees them (with BOS where the tokenizer adds it)."""
    ids = loaded.tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise InterventionError("the prompt is empty; give some text")
    return ids.to(loaded.device)


def _stop_ids(loaded: LoadedModel) -> set[int]:
    ids = {loaded.tokenizer.eos_token_id}
    eos = getattr(loaded.model.generation_config, "eos_token_id", None)
    ids |= set(eos) if isinstance(eos, list) else {eos}
    return {int(i) for i in ids if i is not None}


@torch.no_grad()
def generate_ids(
    loaded: LoadedModel,
    ids: Tensor,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    seed: int = 0,
) -> Tensor:
    """Continue ``ids`` ``[1, T]`` token by token with a KV cache; returns the new ids ``[n]``.

    Greedy when ``temperature == 0``, else sampled from ``softmax(logits / temperature)`` (full
    vocabulary, no top-k/top-p) with a generator seeded by ``seed``. Stops at EOS (not returned).
    Interventions act when called inside `intervene`; positions count from the prompt's first token.
    """
    if temperature < 0:
        raise InterventionError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if max_new_tokens < 0:
        raise InterventionError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    model, stop = loaded.model, _stop_ids(loaded)
    # transformers 5 renamed `past_key_values` to `cache`; older versions only know the first
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    gen = torch.Generator(device=ids.device).manual_seed(seed)
    out: list[int] = []
    step, cache, t = ids, None, ids.shape[1]
    pos = torch.arange(t, device=ids.device)[None]
    for _ in range(max_new_tokens):
        res = model(input_ids=step, position_ids=pos, use_cache=True, **{key: cache})
        cache = res[key]
        logits = res.logits[0, -1].float()
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        if nxt in stop:
            break
        out.append(nxt)
        step = torch.tensor([[nxt]], device=ids.device)
        pos = torch.tensor([[t]], device=ids.device)
        t += 1
    return torch.tensor(out, dtype=torch.long)


def generate(
    loaded: LoadedModel,
    prompt: str,
    interventions: Sequence[Intervention] = (),
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    seed: int = 0,
) -> str:
    """The continuation of ``prompt`` (without the prompt) with ``interventions`` active.

    >>> generate(loaded, "I think that", [Steer(sae, 123, 8.0)], temperature=0.7, seed=1)
    """
    ids = encode_prompt(loaded, prompt)
    with intervene(loaded, interventions):
        new = generate_ids(
            loaded, ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
        )
    return str(loaded.tokenizer.decode(new.tolist(), skip_special_tokens=True))


@torch.no_grad()
def next_token_logits(
    loaded: LoadedModel, prompt: str, interventions: Sequence[Intervention] = ()
) -> Tensor:
    """Logits of the token after ``prompt`` ``[vocab]`` (float32), with ``interventions`` active."""
    ids = encode_prompt(loaded, prompt)
    with intervene(loaded, interventions):
        logits = loaded.model(input_ids=ids, use_cache=False).logits
    return logits[0, -1].float()


def _top(loaded: LoadedModel, logp: Tensor, n: int) -> list[tuple[str, float]]:
    vals, idx = logp.topk(min(n, logp.numel()))
    return [
        (str(loaded.tokenizer.decode([int(i)])), float(p))
        for p, i in zip(vals.exp().tolist(), idx.tolist())
    ]


def compare(
    loaded: LoadedModel, prompt: str, interventions: Sequence[Intervention], *, top: int = 10
) -> dict[str, Any]:
    """Next-token distributions after ``prompt`` without and with ``interventions``.

    Returns ``{"clean": [(token, prob)], "intervened": [(token, prob)], "kl": KL(clean ‖ intervened)}``
    (nats), the top ``top`` tokens of each.
    """
    clean = torch.log_softmax(next_token_logits(loaded, prompt), -1)
    changed = torch.log_softmax(next_token_logits(loaded, prompt, interventions), -1)
    kl = float((clean.exp() * (clean - changed)).sum())
    return {
        "clean": _top(loaded, clean, top),
        "intervened": _top(loaded, changed, top),
        "kl": max(kl, 0.0),
    }
