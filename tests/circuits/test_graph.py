"""Every edge of a graph equals the brute-force change in its target's input when its source goes."""

from __future__ import annotations

import pytest
import torch

from lmscope.circuits import build_graph, linearise, select_logits
from lmscope.circuits.check import removal_effects
from lmscope.errors import CircuitError


def test_every_edge_equals_the_change_when_its_source_is_removed(tiny_setup) -> None:
    loaded, tcs, ids = tiny_setup
    graph = build_graph(loaded, tcs, ids, batch_size=16)
    rows = torch.cat(
        [
            torch.arange(graph.n_features),
            torch.arange(graph.n_nodes - len(graph.logit_ids), graph.n_nodes),
        ]
    )
    n_src = graph.n_nodes - len(graph.logit_ids)
    with torch.no_grad(), linearise(loaded, tcs, ids) as lin:
        expected = removal_effects(lin, graph, range(n_src), rows.tolist())
    got = graph.adjacency[rows][:, :n_src].double()
    scale = float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * scale)
    assert int((got != 0).sum()) > 1000  # a real graph, not an empty one
    # rows without inputs: errors and tokens; no edge from a later position or layer
    assert not graph.adjacency[graph.n_features : n_src].any()
    f = graph.features
    later = (f[:, None, 0] <= f[None, :, 0]) | (f[:, None, 1] < f[None, :, 1])
    assert not graph.adjacency[: graph.n_features, : graph.n_features][later].any()


def test_batch_size_does_not_change_the_graph(tiny_gemma3) -> None:
    from tests.circuits.conftest import PROMPT, random_transcoders

    tcs = random_transcoders(tiny_gemma3)
    ids = tiny_gemma3.tokenizer(PROMPT, return_tensors="pt").input_ids
    a = build_graph(tiny_gemma3, tcs, ids, batch_size=1)
    b = build_graph(tiny_gemma3, tcs, ids, batch_size=100)
    assert torch.equal(a.features, b.features)
    torch.testing.assert_close(a.adjacency, b.adjacency, rtol=1e-5, atol=1e-6)


def test_graph_nodes_are_the_active_latents_and_top_logits(tiny_setup) -> None:
    loaded, tcs, ids = tiny_setup
    graph = build_graph(loaded, tcs, ids, max_logits=3, logit_prob=0.99)
    assert graph.n_nodes == graph.adjacency.shape[0] == graph.n_features + 5 * graph.n_tokens + 3
    assert (graph.activations > 0).all() and (graph.features[:, 1] > 0).all()
    with torch.no_grad():
        probs = torch.softmax(loaded.model(ids).logits[0, -1], -1)
    top = probs.topk(3)
    assert graph.logit_ids == top.indices.tolist()
    torch.testing.assert_close(graph.logit_probs, top.values, rtol=1e-4, atol=1e-6)
    assert graph.describe(graph.error_index(2, 3))["id"] == "E2.3"
    assert graph.describe(graph.token_index(1))["kind"] == "token"


def test_select_logits_stops_at_the_probability_mass() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    ids, probs = select_logits(logits, max_logits=10, logit_prob=0.8)
    assert ids.tolist() == [0, 1] and probs.sum() == pytest.approx(0.8)
    assert select_logits(logits, max_logits=1, logit_prob=0.99)[0].tolist() == [0]
    assert select_logits(logits, max_logits=10, logit_prob=0.81)[0].tolist() == [0, 1, 2]
    with pytest.raises(CircuitError, match="max_logits"):
        select_logits(logits, max_logits=0)
