"""Matryoshka BatchTopK: prefix losses against a brute-force sum, inference = training form."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmscope.errors import SAEError
from lmscope.sae import SAEConfig, build_sae, export_sae, import_sae, load_sae, save_sae
from lmscope.sae.matryoshka import MatryoshkaBatchTopKSAE, default_prefixes


def _sae(**kw: object) -> MatryoshkaBatchTopKSAE:
    cfg = SAEConfig("matryoshka_batchtopk", d_in=6, d_sae=16, k=3, dtype="float64",
                    prefixes=[2, 5, 9, 16], **kw)  # type: ignore[arg-type]  # fmt: skip
    sae = build_sae(cfg, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_dec.normal_(generator=torch.Generator().manual_seed(1))
        sae.b_enc.normal_(generator=torch.Generator().manual_seed(2))
    assert isinstance(sae, MatryoshkaBatchTopKSAE)
    return sae


def test_loss_is_the_mean_of_each_prefixs_own_reconstruction_error() -> None:
    sae = _sae()
    x = torch.randn(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = sae.training_loss(x)
    # brute force: the batch's top k·B activations, then each prefix decoded from scratch
    z = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).relu()
    keep = z.reshape(-1).topk(3 * 8).indices
    f = torch.zeros(8 * 16, dtype=torch.float64)
    f[keep] = z.reshape(-1)[keep]
    f = f.reshape(8, 16)
    errs = []
    for m in (2, 5, 9, 16):
        x_hat = f[:, :m] @ sae.W_dec[:m] + sae.b_dec
        errs.append(float(((x - x_hat) ** 2).sum(1).mean()))
    assert float(out.loss) == pytest.approx(sum(errs) / 4, rel=1e-12)
    assert float(out.mse) == pytest.approx(errs[-1], rel=1e-12)
    torch.testing.assert_close(out.f, f)


def test_prefix_gradients_weigh_early_latents_more() -> None:
    """Latent j's decoder row is in every prefix containing j: early rows get more loss terms."""
    sae = _sae()
    x = torch.randn(64, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    sae.training_loss(x).loss.backward()
    assert sae.W_dec.grad is not None
    f = sae._train_acts(sae.pre_acts(x)).detach()
    # for a latent in group g, ∂loss/∂W_dec[j] = (2/B)/n · Σ_{prefixes ∋ j} f_jᵀ (x̂_m − x)
    recons = [f[:, :m] @ sae.W_dec[:m].detach() + sae.b_dec.detach() for m in sae.sizes]
    n, B = len(sae.sizes), len(x)
    for j in (0, 3, 7, 12):
        grad = sum(
            (2 / B / n) * f[:, j] @ (r - x) for m, r in zip(sae.sizes, recons, strict=True) if j < m
        )
        torch.testing.assert_close(sae.W_dec.grad[j], grad)


def test_inference_form_is_the_training_selection_at_the_learned_threshold() -> None:
    sae = _sae().train()
    x = torch.randn(32, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    f_train = sae._train_acts(sae.pre_acts(x)).detach()
    # a threshold at the smallest kept activation of this batch selects the same entries
    with torch.no_grad():
        sae.threshold.fill_(float(f_train[f_train > 0].min()) - 1e-12)
    jr = sae.to_jumprelu()
    assert jr.cfg.architecture == "jumprelu" and jr.cfg.prefixes is None
    assert jr.cfg.training["converted_from"] == "matryoshka_batchtopk"
    assert jr.cfg.training["prefixes"] == [2, 5, 9, 16]
    torch.testing.assert_close(jr.encode(x), f_train)
    torch.testing.assert_close(sae.eval().encode(x), jr.encode(x))


@pytest.mark.parametrize("fmt", ["native", "saelens", "gemmascope", "gemmascope2"])
def test_every_format_exports_the_inference_form(fmt: str, tmp_path: Path) -> None:
    sae = _sae(site="L1.resid_post").float().eval()
    sae.cfg.dtype = "float32"
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():  # a threshold no activation sits on, so rounding cannot flip one
        sae.threshold.fill_(0.3)
    path = export_sae(sae.to_jumprelu() if fmt == "native" else sae, tmp_path / fmt, fmt)
    back = load_sae(path) if fmt == "native" else import_sae(path)
    torch.testing.assert_close(back(x.to(back.W_enc.dtype)), sae(x).to(back.W_enc.dtype))


def test_native_round_trip_keeps_the_prefixes(tmp_path: Path) -> None:
    sae = _sae()
    back = load_sae(save_sae(sae, tmp_path / "m"))
    assert isinstance(back, MatryoshkaBatchTopKSAE) and back.sizes == [2, 5, 9, 16]


def test_prefixes_default_and_validation() -> None:
    assert default_prefixes(1024) == [64, 128, 256, 512, 1024]
    with pytest.raises(SAEError, match="prefixes must increase"):
        _sae_bad = SAEConfig("matryoshka_batchtopk", d_in=6, d_sae=16, k=3, prefixes=[4, 4, 16])
        build_sae(_sae_bad)
