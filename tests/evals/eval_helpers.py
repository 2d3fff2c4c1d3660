"""Eval test helpers: hand-made SAEs whose metrics are known, and packed token blocks."""

from __future__ import annotations

import torch

from lmscope.data import TokenBatches, TokenBlock
from lmscope.model import LoadedModel, SiteModel
from lmscope.sae import SAE, SAEConfig, build_sae

DOCS = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "def add(a, b):\n    return a + b",
    "Sparse autoencoders find directions in the residual stream of a language model.",
    "A fortune: you will write many tests today, and most of them will pass.",
    "import torch\nx = torch.zeros(3)\nprint(x.sum())",
    "Rivers flow to the sea; the sea does not fill up.",
] * 3


def token_blocks(loaded: LoadedModel, seq_len: int = 24, batch_size: int = 3) -> list[TokenBlock]:
    """Every document packed in corpus order; longer than the tiny Gemmas' sliding window (8), the
    last sequence padded."""
    blocks = list(
        TokenBatches(
            DOCS, loaded.tokenizer, seq_len=seq_len, batch_size=batch_size, split="all", seed=None
        )
    )
    assert not blocks[-1].mask[-1, -1], "the last sequence should end in padding"
    return blocks


def identity_sae(loaded: LoadedModel, site: str) -> SAE:
    """A ReLU 'SAE' with x̂ = relu(x) − relu(−x) = x exactly: latents [x⁺, x⁻]."""
    d = SiteModel(loaded).site_dim(site)
    sae = build_sae(
        SAEConfig(
            "relu", d_in=d, d_sae=2 * d, site=site, model=loaded.name, apply_b_dec_to_input=False
        )
    )
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    return sae


def zero_sae(loaded: LoadedModel, site: str) -> SAE:
    """An SAE whose reconstruction is 0 (W_dec = 0, b_dec = 0): splicing it is zero-ablation."""
    sae = random_sae(loaded, site)
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.zero_()
    return sae


def random_sae(loaded: LoadedModel, site: str, width: int = 96, seed: int = 0) -> SAE:
    """A random JumpReLU SAE in its training state (C = the site's RMS norm, b_dec shift), so that
    folding is exercised, with latents 0-7 dead, 8-15 always on and the rest in between."""
    sm = SiteModel(loaded)
    with torch.no_grad():
        block = token_blocks(loaded)[0]
        x = sm.run(block.input_ids, read=[site], return_logits=False).acts[site][block.mask]
    scale = float(x.pow(2).sum(-1).mean().sqrt())
    cfg = SAEConfig(
        "jumprelu",
        d_in=sm.site_dim(site),
        d_sae=width,
        site=site,
        model=loaded.name,
        input_scale=scale,
    )
    sae = build_sae(cfg, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_dec.copy_(0.05 * torch.randn(sae.b_dec.shape, generator=g))
        sae.b_enc.copy_(0.1 * torch.randn(width, generator=g))
        sae.b_enc[:8], sae.b_enc[8:16] = -1.0, 1.0
        sae.threshold.copy_(0.05 + 0.2 * torch.rand(width, generator=g))
    return sae
