"""The real Gemma 3 270M (slow): splicing with the error term is exact, steering moves generation."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from lmscope.intervene import Splice, Steer, attribute, generate, intervene
from lmscope.model import LoadedModel
from lmscope.sae import SAE

PROMPT = "The capital of France is"


@pytest.mark.slow
def test_gemma_270m_splice_is_exact_and_steering_changes_the_continuation(gemma_270m: LoadedModel, random_sae: Callable[..., SAE]) -> None:  # fmt: skip
    sae = random_sae(gemma_270m, "L6.resid_post", d_sae=256)
    ids = gemma_270m.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        clean = gemma_270m.model(ids).logits
        with intervene(gemma_270m, [Splice(sae)]):
            spliced = gemma_270m.model(ids).logits
    torch.testing.assert_close(spliced, clean, rtol=0, atol=1e-5)
    plain = generate(gemma_270m, PROMPT, max_new_tokens=8)
    assert generate(gemma_270m, PROMPT, [Splice(sae)], max_new_tokens=8) == plain
    steered = generate(gemma_270m, PROMPT, [Steer(sae, 0, 300.0)], max_new_tokens=8)
    assert steered != plain


@pytest.mark.slow
def test_gemma_270m_attribution_sums_per_sae(gemma_270m: LoadedModel, random_sae: Callable[..., SAE]) -> None:  # fmt: skip
    saes = [random_sae(gemma_270m, f"L{i}.resid_post", d_sae=128, seed=i) for i in (5, 6)]
    graph = attribute(gemma_270m, PROMPT, saes, " Paris", top=20)
    for s in graph.saes:
        parts = s["latent_total"] + s["error_total"] + s["bias_total"]
        assert parts == pytest.approx(s["site_total"], rel=1e-3, abs=1e-3)
    assert graph.edges
