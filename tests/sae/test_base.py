"""The SAE contract shared by every architecture: config, init, decoder constraint, folding."""

from __future__ import annotations

import json

import pytest
import torch

from lmscope.errors import SAEError
from lmscope.sae import ARCHITECTURES, SAEConfig, build_sae, check_compatible, sae_class


def test_config_round_trips_through_json() -> None:
    cfg = SAEConfig(
        "jumprelu_transcoder", d_in=8, d_sae=32, d_out=4, site="L3.mlp_in", out_site="L3.mlp_out",
        model="tiny", input_scale=2.5, output_scale=0.5, skip=True, training={"steps": 10, "lam": 1e-3},
    )  # fmt: skip
    assert SAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_unknown_architecture_is_an_error_naming_the_valid_ones() -> None:
    with pytest.raises(
        SAEError,
        match="valid: jumprelu, topk, batchtopk, matryoshka_batchtopk, relu, jumprelu_transcoder",
    ):
        SAEConfig("gated", d_in=4, d_sae=8)
    with pytest.raises(SAEError, match="unknown SAE architecture 'gated'; valid: "):
        sae_class("gated")


def test_every_architecture_is_registered() -> None:
    for arch in ARCHITECTURES:
        assert sae_class(arch).architecture == arch


def test_config_rejects_inconsistent_fields() -> None:
    with pytest.raises(SAEError, match="k"):
        SAEConfig("topk", d_in=4, d_sae=8)
    with pytest.raises(SAEError, match="only transcoders"):
        SAEConfig("jumprelu", d_in=4, d_sae=8, d_out=3)
    with pytest.raises(SAEError, match="unknown SAE config keys"):
        SAEConfig.from_dict({"architecture": "relu", "d_in": 4, "d_sae": 8, "colour": "red"})


def test_init_gives_unit_norm_decoder_rows_tied_encoder_and_zero_biases(variant) -> None:
    cfg = SAEConfig(d_in=16, d_sae=64, **{"d_out": None, **variant, "out_site": None})
    sae = build_sae(cfg, generator=torch.Generator().manual_seed(0))
    assert sae.W_enc.shape == (16, 64) and sae.W_dec.shape == (64, cfg.out_dim)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    if cfg.out_dim == cfg.d_in:
        assert torch.equal(sae.W_enc, sae.W_dec.T)
        assert sae.W_enc.data_ptr() != sae.W_dec.data_ptr()  # untied: a copy
    else:
        torch.testing.assert_close(sae.W_enc.norm(dim=0), torch.ones(64))
    assert not sae.b_enc.any() and not sae.b_dec.any()
    if cfg.architecture in ("jumprelu", "jumprelu_transcoder"):
        torch.testing.assert_close(sae.threshold, torch.full((64,), 0.001))


def test_init_is_deterministic_given_a_generator() -> None:
    cfg = SAEConfig("jumprelu", d_in=8, d_sae=16)
    a = build_sae(cfg, generator=torch.Generator().manual_seed(3))
    b = build_sae(cfg, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.W_dec, b.W_dec)


def test_remove_parallel_grads_leaves_grads_orthogonal_to_rows(make_sae) -> None:
    sae = make_sae(architecture="jumprelu")
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, sae.d_sae)[:, None].double())  # not unit norm
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    before = sae.W_dec.grad.clone()
    sae.remove_parallel_grads()
    dots = (sae.W_dec.grad * sae.W_dec).sum(1)
    torch.testing.assert_close(dots, torch.zeros_like(dots), atol=1e-12, rtol=0)
    # only the parallel part went: the removed piece is a multiple of each row
    removed = before - sae.W_dec.grad
    cos = torch.nn.functional.cosine_similarity(removed, sae.W_dec, dim=1).abs()
    torch.testing.assert_close(cos, torch.ones_like(cos))


def test_renormalise_decoder_makes_rows_unit_norm(make_sae) -> None:
    sae = make_sae(architecture="relu")
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.renormalise_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.d_sae, dtype=torch.float64))


def test_folding_gives_raw_unit_outputs_and_latents_scaled_by_c(make_sae, variant, x) -> None:
    c_in, c_out = 3.7, (0.6 if str(variant["architecture"]).endswith("transcoder") else 3.7)
    sae = make_sae(**variant, input_scale=c_in, output_scale=c_out)
    sae.eval()
    folded = sae.folded()
    assert folded.cfg.is_folded and not folded.cfg.apply_b_dec_to_input
    if c_in == c_out:
        assert torch.equal(folded.W_enc, sae.W_enc) and torch.equal(folded.W_dec, sae.W_dec)
    f_ref = sae.encode(x / c_in)
    assert (f_ref != 0).any() and (f_ref == 0).any()  # the test really exercises the gate
    torch.testing.assert_close(folded.encode(x), c_out * f_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(folded(x), c_out * sae(x / c_in), rtol=1e-12, atol=1e-12)
    # folding a folded SAE changes nothing
    torch.testing.assert_close(folded.folded()(x), folded(x), rtol=0, atol=0)


def test_folding_with_explicit_scalars_matches_the_contract_algebra(make_sae) -> None:
    sae = make_sae(architecture="jumprelu")
    c = 5.0
    f = sae.folded(c)
    torch.testing.assert_close(f.b_enc, c * (sae.b_enc - sae.b_dec @ sae.W_enc))
    torch.testing.assert_close(f.b_dec, c * sae.b_dec)
    torch.testing.assert_close(f.threshold, c * sae.threshold)
    with pytest.raises(SAEError, match="only meaningful for transcoders"):
        sae.folded(2.0, C_out=3.0)


def test_transcoder_folds_distinct_input_and_output_scales(make_sae, x) -> None:
    sae = make_sae(architecture="jumprelu_transcoder", d_out=5, skip=True)
    f = sae.folded(2.0, C_out=8.0)
    torch.testing.assert_close(f(x), 8.0 * sae(x / 2.0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f.W_dec, sae.W_dec)  # decoder rows stay unit-norm


def test_transcoder_requires_a_target(make_sae, x) -> None:
    sae = make_sae(architecture="jumprelu_transcoder", d_out=5)
    with pytest.raises(SAEError, match="target="):
        sae.training_loss(x, sparsity_coeff=1.0)
    out = sae.training_loss(x, sparsity_coeff=1.0, target=torch.randn(32, 5, dtype=torch.float64))
    assert out.x_hat.shape == (32, 5)


def test_a_few_adam_steps_reduce_the_loss_for_every_architecture(make_sae, variant) -> None:
    sae = make_sae(**variant, dtype="float32")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(128, 6, generator=g)
    target = x[:, :5] * 2 if sae.cfg.is_transcoder else None
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2, betas=(0.0, 0.999))
    losses = []
    for _ in range(20):
        out = sae.training_loss(x, sparsity_coeff=1e-3, target=target)
        opt.zero_grad()
        out.loss.backward()
        sae.remove_parallel_grads()
        opt.step()
        sae.after_step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_check_compatible_names_the_site_and_both_widths(make_sae) -> None:
    sae = make_sae(architecture="jumprelu")
    check_compatible(sae, "L2.resid_post", 6)
    with pytest.raises(
        SAEError, match=r"^SAE expects d_in=6 at L6.resid_post but the model's site has 1152$"
    ):
        check_compatible(sae, "L6.resid_post", 1152)
