"""Influence conservation, scores and pruning, on a tiny model's graph."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmscope.circuits import Graph, build_graph, node_influence, normalise, prune, scores
from lmscope.errors import CircuitError
from tests.circuits.conftest import PROMPT, random_transcoders


@pytest.fixture(scope="module")
def graph(tiny_gemma3) -> Graph:
    tcs = random_transcoders(tiny_gemma3)
    return build_graph(
        tiny_gemma3, tcs, tiny_gemma3.tokenizer(PROMPT, return_tensors="pt").input_ids
    )


def test_influence_ends_at_errors_and_tokens_and_sums_to_the_logit_mass(graph: Graph) -> None:
    infl = node_influence(graph).double()
    nf, ne, nt = graph.n_features, graph.n_errors, graph.n_tokens
    assert float(infl[nf : nf + ne + nt].sum()) == pytest.approx(
        float(graph.logit_probs.sum()), rel=1e-5
    )
    # each feature passes on what flows into it from its consumers
    w = graph.logit_weights.double()
    inflow = (w + infl) @ normalise(graph.adjacency).double()
    torch.testing.assert_close(infl, inflow, rtol=1e-5, atol=1e-9)
    assert (infl[:nf] > 0).any() and not infl[-len(graph.logit_ids) :].any()


def test_scores_are_one_without_errors_and_lower_with_them(graph: Graph) -> None:
    replacement, completeness = scores(graph)
    assert 0 < replacement < 1 and 0 < completeness < 1
    no_err = graph.adjacency.clone()
    no_err[:, graph.n_features : graph.n_features + graph.n_errors] = 0
    r, c = scores(dataclasses.replace(graph, adjacency=no_err))
    assert r == pytest.approx(1.0) and c == pytest.approx(1.0)
    # completeness by hand: influence-weighted share of non-error input
    a = normalise(graph.adjacency)
    out = node_influence(graph) + graph.logit_weights
    share = 1 - a[:, graph.n_features : graph.n_features + graph.n_errors].sum(1)
    assert completeness == pytest.approx(float((share * out).sum() / out.sum()), rel=1e-5)


def test_pruning_keeps_more_with_higher_thresholds(graph: Graph) -> None:
    counts = [int(prune(graph, t, 0.98).node_mask.sum()) for t in (0.3, 0.6, 0.8, 0.95)]
    assert counts == sorted(counts) and counts[0] < counts[-1]
    edges = [int(prune(graph, 0.8, t).edge_mask.sum()) for t in (0.5, 0.9, 0.99)]
    assert edges == sorted(edges) and edges[0] < edges[-1]


def test_pruned_graph_is_connected_and_keeps_tokens_and_logits(graph: Graph) -> None:
    kept = prune(graph, 0.8, 0.98)
    nodes, edges = kept.node_mask, kept.edge_mask
    tail = graph.n_tokens + len(graph.logit_ids)
    assert nodes[-tail:].all()
    assert not edges[~nodes].any() and not edges[:, ~nodes].any()
    assert (graph.adjacency[edges] != 0).all()
    body = nodes[:-tail].nonzero()[:, 0]
    assert edges[:, body].any(0).all()  # every kept feature and error feeds a kept edge
    feats = nodes[: graph.n_features].nonzero()[:, 0]
    assert edges[feats].any(1).all()  # every kept feature is fed by a kept edge
    assert int(nodes[: graph.n_features].sum()) < graph.n_features


def test_thresholds_outside_zero_one_are_refused(graph: Graph) -> None:
    with pytest.raises(CircuitError, match="node_threshold must be between 0 and 1"):
        prune(graph, 1.5)
