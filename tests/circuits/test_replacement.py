"""The linearised replacement model: exact on the prompt, affine in its sources, restores the model."""

from __future__ import annotations

import pytest
import torch

from lmscope.circuits import check_transcoders, linearise
from lmscope.errors import CircuitError
from lmscope.model import SiteModel, tiny_model
from tests.circuits.conftest import PROMPT, random_transcoders


def test_replacement_logits_equal_the_models_on_the_prompt(tiny_setup) -> None:
    loaded, tcs, ids = tiny_setup
    with torch.no_grad():
        ref = loaded.model(ids).logits[0, -1]
        with linearise(loaded, tcs, ids) as lin:
            out = lin.logits(lin.forward())[0]
            no_errors = lin.logits(
                lin.forward(errors=[torch.zeros_like(e) for e in lin.clean.errors])
            )[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin.clean.logits, ref, rtol=1e-5, atol=1e-5)
    # the error nodes are what makes it exact: without them the logits move
    assert (no_errors - ref).abs().max() > 1e-2


def test_skip_transcoders_are_exact_too(tiny_gemma3) -> None:
    tcs = random_transcoders(tiny_gemma3, skip=True)
    ids = tiny_gemma3.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad(), linearise(tiny_gemma3, tcs, ids) as lin:
        torch.testing.assert_close(
            lin.logits(lin.forward())[0], tiny_gemma3.model(ids).logits[0, -1], rtol=1e-5, atol=1e-5
        )


def test_frozen_model_is_affine_in_its_sources(tiny_setup) -> None:
    # f(2s) − 2 f(s) + f(0) = 0 for an affine f: patterns and norm scales no longer depend on s
    loaded, tcs, ids = tiny_setup
    with torch.no_grad(), linearise(loaded, tcs, ids) as lin:
        c = lin.clean

        def final(k: float) -> torch.Tensor:
            return lin.forward(
                embed=k * c.embed, acts=[k * a for a in c.acts], errors=[k * e for e in c.errors]
            ).final

        f0, f1, f2 = final(0.0), final(1.0), final(2.0)
    torch.testing.assert_close(
        f2 - 2 * f1 + f0, torch.zeros_like(f0), rtol=0, atol=1e-4 * float(f1.abs().max())
    )
    assert (f2 - f1).abs().max() > 1e-2  # and it is not constant


def test_model_is_restored_after_linearising(tiny_gemma3) -> None:
    tcs = random_transcoders(tiny_gemma3)
    ids = tiny_gemma3.tokenizer(PROMPT, return_tensors="pt").input_ids
    impl = tiny_gemma3.model.config._attn_implementation
    with torch.no_grad():
        before = tiny_gemma3.model(ids).logits
        with linearise(tiny_gemma3, tcs, ids):
            pass
        after = tiny_gemma3.model(ids).logits
    assert torch.equal(before, after)
    assert tiny_gemma3.model.config._attn_implementation == impl
    assert not any("forward" in m.__dict__ for m in tiny_gemma3.model.modules())


def test_features_never_fire_at_bos(tiny_setup) -> None:
    loaded, tcs, ids = tiny_setup
    with torch.no_grad(), linearise(loaded, tcs, ids) as lin:
        assert not lin.clean.ordinary[0] and lin.clean.ordinary[1:].all()
        assert all(not a[0, 0].any() for a in lin.clean.acts)
        assert sum(int((a != 0).sum()) for a in lin.clean.acts) > 50


def test_transcoders_must_cover_every_layer_once() -> None:
    loaded = tiny_model("llama")
    sites = SiteModel(loaded)
    tcs = random_transcoders(loaded)
    with pytest.raises(CircuitError, match="no transcoder at layers 2"):
        check_transcoders(sites, tcs[:2] + tcs[3:])
    with pytest.raises(CircuitError, match="two transcoders at layer 1"):
        check_transcoders(sites, tcs + [tcs[1]])
    wrong = random_transcoders(loaded)[0]
    wrong.cfg.out_site = "L1.mlp_out"
    with pytest.raises(CircuitError, match="same layer"):
        check_transcoders(sites, [wrong] + tcs[1:])
    with pytest.raises(CircuitError, match="gemma3"):
        check_transcoders(SiteModel(tiny_model("gpt2")), tcs)
