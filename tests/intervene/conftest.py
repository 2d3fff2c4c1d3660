"""Random SAEs for intervention tests: untrained, but with many active latents, which is all the
algebra under test needs (the trained `tiny_suite` serves the CLI tests)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from lmscope.model import LoadedModel, SiteModel
from lmscope.sae import SAE, SAEConfig, build_sae

PROMPT = "The capital of France is"


def _random_sae(loaded: LoadedModel, site: str, d_sae: int = 32, seed: int = 0) -> SAE:
    """A JumpReLU SAE at `site` whose latents fire on roughly half of the tokens."""
    d = SiteModel(loaded).site_dim(site)
    gen = torch.Generator().manual_seed(seed)
    sae = build_sae(SAEConfig("jumprelu", d_in=d, d_sae=d_sae, site=site), generator=gen)
    with torch.no_grad():
        sae.b_dec.normal_(generator=gen)
        sae.W_enc.mul_(2.0)
    return sae.eval()


@pytest.fixture
def random_sae() -> Callable[..., SAE]:
    """`random_sae(loaded, site, d_sae=32, seed=0)`: an untrained JumpReLU SAE with many active latents."""
    return _random_sae


@pytest.fixture
def ids(tiny: LoadedModel) -> torch.Tensor:
    return tiny.tokenizer(PROMPT, return_tensors="pt").input_ids
