"""`attribute` on transcoders (as pulled from Gemma Scope 2): totals identity and gradient × activation."""

from __future__ import annotations

import numpy as np
import torch

from lmscope.intervene import attribute
from lmscope.model import SiteModel, tiny_model
from lmscope.sae import SAEConfig, build_sae


def _transcoder(layer: int, seed: int, skip: bool) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    cfg = SAEConfig("jumprelu_transcoder", d_in=64, d_sae=48, d_out=64, site=f"L{layer}.mlp_in",
                    out_site=f"L{layer}.mlp_out", apply_b_dec_to_input=False, skip=skip)  # fmt: skip
    sae = build_sae(cfg, generator=g)
    with torch.no_grad():
        sae.b_enc.normal_(0.0, 0.5, generator=g)
        sae.threshold.fill_(0.05)
        if skip:
            sae.W_skip.normal_(0.0, 0.05, generator=g)
    return sae


def test_attribute_runs_on_transcoders_and_matches_gradient_times_activation() -> None:
    loaded = tiny_model("gemma3")
    tcs = [_transcoder(1, 0, skip=True), _transcoder(2, 1, skip=False)]
    graph = attribute(loaded, "The capital of France is", tcs, " the", top=1000, max_edges=200)
    assert [s["site"] for s in graph.saes] == ["L1.mlp_out", "L2.mlp_out"]
    for s in graph.saes:  # Σ latents + error + bias = Σ_p g·y at the output site, exactly
        total = s["latent_total"] + s["error_total"] + s["bias_total"]
        assert abs(total - s["site_total"]) <= 1e-4 * max(1.0, abs(s["site_total"]))
        assert s["active"] > 0
    # reference: g = ∂logit/∂(L1.mlp_out) from a plain pass, f from the transcoder's own encode
    sites = SiteModel(loaded)
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    tid = loaded.tokenizer(" the", add_special_tokens=False).input_ids[0]
    leaf: dict[str, torch.Tensor] = {}

    def grab(y: torch.Tensor) -> torch.Tensor:
        leaf["y"] = y.detach().requires_grad_()
        return leaf["y"]

    with torch.enable_grad():
        out = sites.run(ids, read=["L1.mlp_in"], replace={"L1.mlp_out": grab})
        assert out.logits is not None
        (g,) = torch.autograd.grad(out.logits[0, -1, tid], [leaf["y"]])
    f = tcs[0].encode(out.acts["L1.mlp_in"]).detach()[0]
    want = (f * (g[0] @ tcs[0].W_dec.detach().T)).numpy()
    got = np.zeros_like(want)
    for n in graph.nodes:
        if n["kind"] == "latent" and n["site"] == "L1.mlp_out":
            got[n["position"], n["latent"]] = n["attribution"]
    keep = f.numpy() != 0
    keep[0] = False  # BOS is not decomposed
    np.testing.assert_allclose(got[keep], want[keep], rtol=1e-4, atol=1e-6)
    assert any(e["target"].startswith("L2.mlp_out") for e in graph.edges)
