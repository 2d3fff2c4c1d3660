"""Per-dimension scales fold into the weights exactly (``normalise = "per_dim"`` training)."""

from __future__ import annotations

from typing import Any

import torch

from lmscope.sae.base import fold_dim_scales


def test_folding_dim_scales_then_c_equals_the_training_form(make_sae: Any, variant: dict) -> None:
    sae = make_sae(**variant, input_scale=2.5)
    g = torch.Generator().manual_seed(7)
    d_in, d_out = sae.cfg.d_in, sae.cfg.out_dim
    r_in = 0.5 + torch.rand(d_in, generator=g, dtype=torch.float64)
    r_out = 0.5 + torch.rand(d_out, generator=g, dtype=torch.float64)
    x = 3 * torch.randn(32, d_in, generator=g, dtype=torch.float64)
    c = sae.cfg.input_scale
    c_out = sae.cfg.out_scale
    # training form: the SAE sees x / (C·r_in) and reconstructs target / (C_out·r_out)
    xn = x / c / r_in
    f = sae.encode(xn)
    x_hat = sae.decode(f)
    skip = getattr(sae, "skip_out", None)
    if skip is not None and skip(xn) is not None:
        x_hat = x_hat + skip(xn)
    folded = fold_dim_scales(sae, r_in, r_out).folded()
    assert folded.cfg.is_folded
    f2 = folded.encode(x)
    y = folded.decode(f2)
    if skip is not None and folded.skip_out(x) is not None:
        y = y + folded.skip_out(x)
    torch.testing.assert_close(f2, c_out * f)
    torch.testing.assert_close(y, c_out * r_out * x_hat)
