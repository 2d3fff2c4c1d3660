"""Cross-layer transcoders in the replacement model: exact on the prompt, every edge equal to the
brute-force removal of its source (a CLT feature writes through all its decoders), decoders into
earlier layers ignored, and a CLT without cross-layer decoders is its per-layer transcoders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmscope.circuits import attribute, build_graph, linearise, load_graph, scores
from lmscope.circuits.check import removal_effects
from lmscope.cli import main
from lmscope.errors import CircuitError
from lmscope.intervene import encode_prompt
from lmscope.model import tiny_model
from lmscope.sae import SAE, SAEConfig, build_sae
from lmscope.sae.multilayer import MultiLayerSAE, save_native
from lmscope.suite import Suite
from tests.circuits.conftest import PROMPT, random_clt, random_transcoders


@pytest.fixture(scope="module", params=["gemma3", "llama", "gemma2"])
def clt_setup(request: pytest.FixtureRequest) -> tuple:
    """A tiny model of each supported family, a random CLT over it (affine on Gemma 3: on the
    tiny Llama a random skip path amplifies the replay's ~3e-6 rounding in mlp_in to ~1e-3 in
    the logits by the last layer, per-layer skip transcoders alike), the prompt's ids."""
    loaded = tiny_model(request.param)
    clt = random_clt(loaded, skip=request.param == "gemma3")
    return loaded, clt, encode_prompt(loaded, PROMPT)


def test_clt_replacement_logits_equal_the_models_on_the_prompt(clt_setup) -> None:
    loaded, clt, ids = clt_setup
    with torch.no_grad():
        ref = loaded.model(ids).logits[0, -1]
        with linearise(loaded, [clt], ids) as lin:
            out = lin.logits(lin.forward())[0]
            zeros = [torch.zeros_like(e) for e in lin.clean.errors]
            no_errors = lin.logits(lin.forward(errors=zeros))[0]
            # layer 3's MLP output: decoders of layers 0-3 into it, its bias, skip and error
            c = lin.clean
            want = sum(c.acts[s] @ clt.w_dec[s, :, 3] for s in range(4)) + clt.b_dec[3]
            if clt.skip is not None:
                want = want + c.mlp_in[3] @ clt.skip[3]
            want = want + c.errors[3]
            got = lin.coders.out(3, c.acts, c.mlp_in[3]) + c.errors[3]
        clean = lin.sites.run(ids, read=["L3.mlp_out"], return_logits=False).acts["L3.mlp_out"]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (no_errors - ref).abs().max() > 1e-2  # the errors make it exact
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(want, clean, rtol=1e-5, atol=1e-5)


def test_every_clt_edge_equals_the_change_when_its_source_is_removed(clt_setup) -> None:
    loaded, clt, ids = clt_setup
    graph = build_graph(loaded, [clt], ids, batch_size=16)
    rows = torch.cat(
        [
            torch.arange(graph.n_features),
            torch.arange(graph.n_nodes - len(graph.logit_ids), graph.n_nodes),
        ]
    )
    n_src = graph.n_nodes - len(graph.logit_ids)
    with torch.no_grad(), linearise(loaded, [clt], ids) as lin:
        expected = removal_effects(lin, graph, range(n_src), rows.tolist())
    got = graph.adjacency[rows][:, :n_src].double()
    scale = float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * scale)
    assert int((got != 0).sum()) > 1000
    assert not graph.adjacency[graph.n_features : n_src].any()  # errors and tokens: no inputs
    f = graph.features
    later = (f[:, None, 0] <= f[None, :, 0]) | (f[:, None, 1] < f[None, :, 1])
    assert not graph.adjacency[: graph.n_features, : graph.n_features][later].any()
    assert graph.transcoders == [f"L{i}.mlp_in" for i in range(4)]


def test_clt_edges_go_through_every_decoder_and_ignore_earlier_ones(tiny_gemma3) -> None:
    clt = random_clt(tiny_gemma3, seed=1)
    ids = encode_prompt(tiny_gemma3, PROMPT)
    base = build_graph(tiny_gemma3, [clt], ids)
    # decoders into earlier layers (l < s) are not part of the replacement model
    acausal = MultiLayerSAE(**{k: getattr(clt, k).clone() for k in ("w_enc", "b_enc", "threshold", "b_dec")},
                            w_dec=clt.w_dec.clone(), model=clt.model)  # fmt: skip
    for s in range(4):
        acausal.w_dec[s, :, :s] = torch.randn_like(acausal.w_dec[s, :, :s])
    torch.testing.assert_close(build_graph(tiny_gemma3, [acausal], ids).adjacency, base.adjacency)
    # without the decoders into later layers, a layer-0 feature loses edges it had only through them
    local = MultiLayerSAE(**{k: getattr(clt, k).clone() for k in ("w_enc", "b_enc", "threshold", "b_dec")},
                          w_dec=clt.w_dec.clone(), model=clt.model)  # fmt: skip
    for s in range(4):
        local.w_dec[s, :, s + 1 :] = 0
    cut = build_graph(tiny_gemma3, [local], ids)
    assert torch.equal(cut.features, base.features)
    l0 = (base.features[:, 0] == 0).nonzero()[:, 0]
    assert (cut.adjacency[:, l0] - base.adjacency[:, l0]).abs().max() > 1e-3


def _diagonal(clt: MultiLayerSAE, layer: int, name: str) -> SAE:
    """Layer ``layer`` of a CLT as a per-layer transcoder (its decoder into its own layer)."""
    d = clt.d_in
    cfg = SAEConfig("jumprelu_transcoder", d_in=d, d_sae=clt.d_sae, d_out=d, skip=clt.skip is not None,
                    site=f"L{layer}.mlp_in", out_site=f"L{layer}.mlp_out", model=name)  # fmt: skip
    tc = build_sae(cfg)
    with torch.no_grad():
        tc.W_enc.copy_(clt.w_enc[layer])
        tc.b_enc.copy_(clt.b_enc[layer])
        tc.threshold.copy_(clt.threshold[layer])
        tc.W_dec.copy_(clt.w_dec[layer, :, layer])
        tc.b_dec.copy_(clt.b_dec[layer])
        if clt.skip is not None:
            tc.W_skip.copy_(clt.skip[layer])
    return tc


def test_a_clt_without_cross_layer_decoders_is_its_per_layer_transcoders(tiny_gemma3) -> None:
    clt = random_clt(tiny_gemma3, skip=True, seed=2)
    for s in range(4):
        clt.w_dec[s, :, s + 1 :] = 0
    ids = encode_prompt(tiny_gemma3, PROMPT)
    per_layer = [_diagonal(clt, i, tiny_gemma3.name) for i in range(4)]
    a, b = build_graph(tiny_gemma3, [clt], ids), build_graph(tiny_gemma3, per_layer, ids)
    assert torch.equal(a.features, b.features)
    torch.testing.assert_close(a.adjacency, b.adjacency, rtol=1e-5, atol=1e-6)


def test_only_a_full_depth_clt_alone_makes_a_replacement_model(tiny_gemma3) -> None:
    clt = random_clt(tiny_gemma3)
    ids = encode_prompt(tiny_gemma3, PROMPT)
    with pytest.raises(CircuitError, match="give it alone"):
        build_graph(tiny_gemma3, [clt, *random_transcoders(tiny_gemma3)], ids)
    cross = MultiLayerSAE(clt.w_enc, clt.b_enc, clt.threshold, clt.w_dec, clt.b_dec, kind="crosscoder")  # fmt: skip
    with pytest.raises(CircuitError, match="cross-layer transcoder"):
        build_graph(tiny_gemma3, [cross], ids)
    short = MultiLayerSAE(clt.w_enc[:3], clt.b_enc[:3], clt.threshold[:3], clt.w_dec[:3, :, :3], clt.b_dec[:3])  # fmt: skip
    with pytest.raises(CircuitError, match="every layer 0-3"):
        build_graph(tiny_gemma3, [short], ids)


def test_attribute_cli_takes_a_suite_whose_transcoder_is_a_clt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    loaded = tiny_model("gemma3")
    clt = random_clt(loaded, skip=True, seed=3)
    suite = Suite.create(tmp_path / "suite", model="tiny-gemma3", seq_len=32)
    suite.register([save_native(clt, suite.path / "clt-L0-3.mlp_in-w64")])
    out = tmp_path / "g.json"
    rc = main(["attribute", "--suite", str(suite.path), PROMPT, "--out", str(out), "--batch-size", "16"])  # fmt: skip
    assert rc == 0 and "replacement score" in capsys.readouterr().out
    doc = load_graph(out)
    replacement, completeness = scores(attribute(loaded, PROMPT, [clt]))
    assert doc["scores"]["replacement"] == pytest.approx(replacement, rel=1e-4)
    assert doc["scores"]["completeness"] == pytest.approx(completeness, rel=1e-4)
    assert any(n["kind"] == "feature" for n in doc["nodes"])
    assert doc["transcoders"] == [f"L{i}.mlp_in" for i in range(4)]
