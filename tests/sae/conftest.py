"""Helpers for SAE tests: small random SAEs of every architecture, fp64 where exactness matters."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from lmscope.sae import SAE, SAEConfig, build_sae

D_IN, D_SAE, D_OUT = 6, 24, 5

# (id, config kwargs): every architecture, transcoders with and without skip
VARIANTS = [
    ("jumprelu", {"architecture": "jumprelu"}),
    ("topk", {"architecture": "topk", "k": 4}),
    ("batchtopk", {"architecture": "batchtopk", "k": 4}),
    ("relu", {"architecture": "relu"}),
    (
        "transcoder",
        {"architecture": "jumprelu_transcoder", "d_out": D_OUT, "out_site": "L2.mlp_out"},
    ),
    (
        "skip_transcoder",
        {
            "architecture": "jumprelu_transcoder",
            "d_out": D_OUT,
            "skip": True,
            "out_site": "L2.mlp_out",
        },
    ),
]


def _make_sae(dtype: str = "float64", seed: int = 0, **kw: object) -> SAE:
    """A random SAE with non-trivial biases, thresholds and skip, so folding is really tested."""
    base: dict[str, object] = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "site": "L2.resid_post",
        "model": "tiny",
    }
    if str(kw.get("architecture", "")).endswith("transcoder"):
        base["site"] = "L2.mlp_in"
    cfg = SAEConfig(**{**base, "dtype": dtype, **kw})  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed)
    sae = build_sae(cfg, generator=g)
    with torch.no_grad():
        sae.b_enc.copy_(0.3 * torch.randn(sae.b_enc.shape, generator=g))
        sae.b_dec.copy_(torch.randn(sae.b_dec.shape, generator=g))
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(0.05 + 0.3 * torch.rand(D_SAE, generator=g))
        if hasattr(sae, "W_skip"):
            sae.W_skip.copy_(0.2 * torch.randn(sae.W_skip.shape, generator=g))
        if cfg.d_in != cfg.out_dim or cfg.is_transcoder:
            sae.W_enc.mul_(2.0)  # a transcoder's encoder is not tied; make it differ anyway
    return sae


@pytest.fixture
def x() -> torch.Tensor:
    return 2.0 * torch.randn(
        32, D_IN, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )


@pytest.fixture
def make_sae() -> Callable[..., SAE]:
    """Factory: ``make_sae(architecture=..., dtype="float64", seed=0, **cfg)``."""
    return _make_sae


@pytest.fixture(params=VARIANTS, ids=[v[0] for v in VARIANTS])
def variant(request: pytest.FixtureRequest) -> dict[str, object]:
    """Config kwargs of each architecture (transcoders with and without skip)."""
    return dict(request.param[1])
