"""Random per-layer transcoders and cross-layer transcoders for the tiny models, and a prompt."""

from __future__ import annotations

import pytest
import torch

from lmscope.intervene import encode_prompt
from lmscope.model import LoadedModel, tiny_model
from lmscope.sae import SAE, SAEConfig, build_sae
from lmscope.sae.multilayer import MultiLayerSAE

PROMPT = "The quick brown fox jumps over"


def random_transcoders(
    loaded: LoadedModel, width: int = 24, skip: bool = False, seed: int = 0
) -> list[SAE]:
    """One folded JumpReLU transcoder per layer, mlp_in → mlp_out, with random biases and
    thresholds so that about a third of the latents fire."""
    g = torch.Generator().manual_seed(seed)
    d = int(loaded.model.config.get_text_config().hidden_size)
    n = int(loaded.model.config.get_text_config().num_hidden_layers)
    out = []
    for layer in range(n):
        cfg = SAEConfig(
            "jumprelu_transcoder",
            d_in=d,
            d_sae=width,
            d_out=d,
            skip=skip,
            site=f"L{layer}.mlp_in",
            out_site=f"L{layer}.mlp_out",
            model=loaded.name,
        )
        tc = build_sae(cfg, generator=g)
        with torch.no_grad():
            tc.threshold.copy_(torch.rand(width, generator=g) * 0.6)
            tc.b_enc.normal_(0, 0.1, generator=g)
            tc.b_dec.normal_(0, 0.1, generator=g)
            if skip:
                tc.W_skip.normal_(0, 0.05, generator=g)
        out.append(tc)
    return out


@pytest.fixture(scope="module", params=["gemma3", "llama", "gemma2"])
def tiny_setup(request: pytest.FixtureRequest) -> tuple[LoadedModel, list[SAE], torch.Tensor]:
    """A tiny model of each supported family, its transcoders and the prompt's ids."""
    loaded = tiny_model(request.param)
    return loaded, random_transcoders(loaded), encode_prompt(loaded, PROMPT)


def random_clt(loaded: LoadedModel, width: int = 16, skip: bool = False, seed: int = 0) -> MultiLayerSAE:  # fmt: skip
    """A random cross-layer transcoder over every layer (mlp_in → mlp_out), about a third of its
    latents firing. Its decoders into *earlier* layers are random too, as in published files:
    the replacement model must ignore them."""
    g = torch.Generator().manual_seed(seed)
    cfg = loaded.model.config.get_text_config()
    d, n = int(cfg.hidden_size), int(cfg.num_hidden_layers)

    def normal(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    return MultiLayerSAE(
        w_enc=normal(n, d, width, scale=d**-0.5),
        b_enc=normal(n, width, scale=0.1),
        threshold=torch.rand(n, width, generator=g) * 0.6,
        w_dec=normal(n, width, n, d, scale=(width * n) ** -0.5),
        b_dec=normal(n, d, scale=0.1),
        skip=normal(n, d, d, scale=0.05) if skip else None,
        kind="clt",
        model=loaded.name,
    )
