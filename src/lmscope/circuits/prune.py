"""Influence, pruning and scores of an attribution graph (the definitions circuit-tracer uses).

With ``Â`` the adjacency with absolute values, each row divided by its sum (rows without inputs
stay zero), and ``w`` the logit probabilities on the logit rows (0 elsewhere):

- a node's *influence* is ``Σ_{k≥1} (w Â^k)_node``: the share of the logits' probability mass that
  reaches it through all paths, each edge weighted by its share of its target's input. The graph
  is acyclic (edges go to later layers or logits), so the sum ends after a few terms.
- Conservation: every feature passes on exactly what it receives (its row sums to 1), and errors
  and tokens have no inputs, so the influence of errors plus tokens equals ``Σ w``, the logit
  probability mass covered; a feature's influence equals the flow into it from its consumers,
  ``Σ_t (w_t + influence_t)·Â[t, node]``.
- *replacement score*: token influence / (token + error influence), the share of end-to-end
  influence that reaches the prompt through features rather than ending at an error node;
- *completeness score*: ``Σ_n (1 − Σ_{e∈errors} Â[n, e])·(influence_n + w_n) / Σ_n (influence_n +
  w_n)``: each node's share of non-error input, weighted by its influence.

Pruning keeps the nodes carrying ``node_threshold`` of the total influence (sorted, cumulative;
tokens and logits always kept), then on the graph of those nodes scores each edge by
``Â[t, s]·(influence_t + w_t)`` and keeps the edges carrying ``edge_threshold`` of the total, then
drops, until nothing changes, features and errors with no kept outgoing edge and features with no
kept incoming edge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmscope.circuits.graph import Graph
from lmscope.errors import CircuitError


def normalise(adjacency: Tensor) -> Tensor:
    """``|A|`` with every row divided by its sum; all-zero rows stay zero (one float32 copy:
    a Gemma 3 270M graph's adjacency is ~18k × 18k)."""
    a = adjacency.abs().float()
    a /= a.sum(1, keepdim=True, dtype=torch.float64).clamp_min(1e-30).float()
    return a


def influence(normalised: Tensor, weights: Tensor) -> Tensor:
    """``Σ_{k≥1} weights @ normalised^k``, summed until a term is all zero (acyclic graphs)."""
    total = torch.zeros(weights.shape, dtype=torch.float64)
    term = weights.float()
    for _ in range(normalised.shape[0] + 1):
        term = term @ normalised
        if not bool(term.any()):
            return total.float()
        total += term.double()
    raise CircuitError("influence did not converge: the adjacency matrix has a cycle")


def node_influence(graph: Graph) -> Tensor:
    """[n] every node's influence on the logits."""
    return influence(normalise(graph.adjacency), graph.logit_weights)


def scores(graph: Graph) -> tuple[float, float]:
    """(replacement score, completeness score) of the whole graph."""
    a = normalise(graph.adjacency)
    w = graph.logit_weights
    infl = influence(a, w)
    errors = slice(graph.n_features, graph.n_features + graph.n_errors)
    tokens = slice(errors.stop, errors.stop + graph.n_tokens)
    tok, err = float(infl[tokens].sum()), float(infl[errors].sum())
    replacement = tok / (tok + err) if tok + err > 0 else 0.0
    out = (infl + w).double()
    non_error = 1.0 - a[:, errors].sum(1).double()
    completeness = float((non_error * out).sum() / out.sum())
    return replacement, completeness


def _cut(values: Tensor, share: float) -> float:
    """The smallest value among the top values that together carry ``share`` of the total."""
    positive = values[values > 0]  # zeros never change a cumulative share
    if positive.numel() == 0:
        return 0.0
    ranked = positive.double().sort(descending=True).values
    cum = ranked.cumsum(0) / ranked.sum()
    i = min(int(torch.searchsorted(cum, torch.tensor(share, dtype=cum.dtype))), len(ranked) - 1)
    return float(ranked[i])


@dataclass
class Pruned:
    """Which nodes and edges survive pruning, with every node's influence (unpruned graph)."""

    node_mask: Tensor  # [n] bool
    edge_mask: Tensor  # [n, n] bool, [target, source]
    influence: Tensor  # [n]
    node_threshold: float
    edge_threshold: float


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    """Keep the nodes and edges carrying the given shares of influence on the logits.

    >>> kept = prune(graph, 0.8, 0.98); int(kept.node_mask.sum())
    """
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= v <= 1.0:
            raise CircuitError(f"{name} must be between 0 and 1, got {v}")
    w = graph.logit_weights
    infl = node_influence(graph)
    nodes = infl >= _cut(infl, node_threshold)
    fixed = graph.n_nodes - graph.n_tokens - len(graph.logit_ids)  # features and errors
    nodes[fixed:] = True
    scores_ = graph.adjacency.abs()  # one n × n copy, reused in place for the edge scores
    scores_[~nodes] = 0
    scores_[:, ~nodes] = 0
    scores_ /= scores_.sum(1, keepdim=True, dtype=torch.float64).clamp_min(1e-30).float()
    scores_ *= (influence(scores_, w) + w)[:, None]
    edges = scores_ >= max(_cut(scores_.flatten(), edge_threshold), 1e-30)
    del scores_
    nf = graph.n_features
    while True:
        before = nodes.clone()
        edges[~nodes] = False
        edges[:, ~nodes] = False
        nodes[:fixed] &= edges[:, :fixed].any(0)  # an outgoing edge
        nodes[:nf] &= edges[:nf].any(1)  # features: an incoming edge
        if torch.equal(nodes, before):
            break
    return Pruned(nodes, edges, infl, node_threshold, edge_threshold)


__all__ = ["Pruned", "influence", "node_influence", "normalise", "prune", "scores"]
