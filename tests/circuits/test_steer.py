"""Clamping and ablating transcoder features in the real model."""

from __future__ import annotations

import pytest
import torch

from lmscope.circuits import linearise
from lmscope.circuits.steer import clamp_features
from lmscope.errors import CircuitError
from lmscope.model import SiteModel
from tests.circuits.conftest import PROMPT, random_transcoders


def test_clamping_features_to_their_own_values_changes_nothing(tiny_gemma3) -> None:
    tcs = random_transcoders(tiny_gemma3)
    ids = tiny_gemma3.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad(), linearise(tiny_gemma3, tcs, ids) as lin:
        acts = lin.clean.acts
    active = [
        (layer, int(p), int(i))
        for layer, a in enumerate(acts)
        for p, i in a[0].nonzero().tolist()[:3]
    ]
    same = {f: float(acts[f[0]][0, f[1], f[2]]) for f in active}
    with torch.no_grad():
        ref = tiny_gemma3.model(ids).logits[0, -1]
    torch.testing.assert_close(
        clamp_features(tiny_gemma3, tcs, ids, same), ref, rtol=1e-5, atol=1e-5
    )


def test_ablating_a_feature_removes_its_decoder_vector_from_mlp_out(tiny_gemma3) -> None:
    tcs = random_transcoders(tiny_gemma3)
    ids = tiny_gemma3.tokenizer(PROMPT, return_tensors="pt").input_ids
    sites = SiteModel(tiny_gemma3)
    with torch.no_grad():
        x = sites.run(ids, read=["L2.mlp_in"], return_logits=False).acts["L2.mlp_in"]
        a = tcs[2].encode(x)
        pos = ids.shape[1] - 1  # (an early position may be outside layer 3's sliding window)
        latent = int(a[0, pos].nonzero()[0])
        delta = torch.zeros_like(x)
        delta[0, pos] = a[0, pos, latent] * tcs[2].W_dec[latent]
        want = sites.run(ids, replace={"L2.mlp_out": lambda y: y - delta}).logits
    assert want is not None
    got = clamp_features(tiny_gemma3, tcs, ids, {(2, pos, latent): 0.0})
    torch.testing.assert_close(got, want[0, -1], rtol=1e-5, atol=1e-5)
    assert (got - tiny_gemma3.model(ids).logits[0, -1]).abs().max() > 1e-4


def test_features_out_of_range_are_refused(tiny_gemma3) -> None:
    tcs = random_transcoders(tiny_gemma3)
    ids = tiny_gemma3.tokenizer(PROMPT, return_tensors="pt").input_ids
    with pytest.raises(CircuitError, match="out of range: layers 0-3"):
        clamp_features(tiny_gemma3, tcs, ids, {(4, 1, 0): 0.0})
