"""The replacement model and its edges on the real Gemma 3 270M (slow): sdpa swapped for frozen
eager attention, sliding and global layers, Gemma's four norms per layer."""

from __future__ import annotations

import pytest
import torch

from lmscope.circuits import build_graph, linearise
from lmscope.circuits.check import removal_effects
from lmscope.intervene import encode_prompt
from lmscope.model import LoadedModel, SiteModel
from lmscope.sae import SAE, SAEConfig, build_sae

pytestmark = pytest.mark.slow


def sparse_transcoders(loaded: LoadedModel, ids: torch.Tensor, width: int = 256) -> list[SAE]:
    """Random transcoders whose thresholds let about 2% of latents fire on this prompt."""
    sites = SiteModel(loaded)
    with torch.no_grad():
        acts = sites.run(
            ids, read=[f"L{i}.mlp_in" for i in range(sites.n_layers)], return_logits=False
        ).acts
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(sites.n_layers):
        cfg = SAEConfig(
            "jumprelu_transcoder",
            d_in=640,
            d_sae=width,
            d_out=640,
            site=f"L{i}.mlp_in",
            out_site=f"L{i}.mlp_out",
        )
        tc = build_sae(cfg, generator=g)
        with torch.no_grad():
            z = acts[f"L{i}.mlp_in"][0, 1:] @ tc.W_enc
            tc.threshold.copy_(z.quantile(0.98, dim=0).clamp_min(1e-3))
        out.append(tc)
    return out


def test_gemma_replacement_is_exact_and_edges_match_removal(gemma_270m: LoadedModel) -> None:
    ids = encode_prompt(gemma_270m, "The Eiffel Tower is in the city of")
    tcs = sparse_transcoders(gemma_270m, ids)
    with torch.no_grad():
        ref = gemma_270m.model(ids).logits[0, -1]
        with linearise(gemma_270m, tcs, ids) as lin:
            out = lin.logits(lin.forward())[0]
    assert float((out - ref).abs().max()) < 1e-3 * float(ref.abs().max())
    graph = build_graph(gemma_270m, tcs, ids, batch_size=64)
    assert graph.n_features > 20
    n_src = graph.n_features + graph.n_errors + graph.n_tokens
    rows = list(range(graph.n_features)) + list(range(n_src, graph.n_nodes))
    sub = graph.adjacency[rows][:, :n_src].abs()
    picks = sub.flatten().topk(12).indices.tolist()
    edges = [(rows[i // n_src], i % n_src) for i in picks]
    sources, targets = sorted({s for _, s in edges}), sorted({t for t, _ in edges})
    with torch.no_grad(), linearise(gemma_270m, tcs, ids) as lin:
        effects = removal_effects(lin, graph, sources, targets)
    for t, s in edges:
        want = float(effects[targets.index(t), sources.index(s)])
        assert float(graph.adjacency[t, s]) == pytest.approx(
            want, rel=1e-3, abs=1e-4 * abs(want) + 1e-6
        )
