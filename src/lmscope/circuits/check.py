"""Edges by brute force: remove a source, rerun the frozen replacement model, see its targets move.

The reference the batched-backward graph (``build_graph``) is held to: ``adjacency[t, s]`` must
equal ``input_t(clean) − input_t(s removed)`` with attention patterns and norm scales frozen.
One replay per removed source (batched), so use it for tests and spot checks, not whole graphs
of real models.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lmscope.circuits.graph import Graph
from lmscope.circuits.replacement import Linearised, Pass
from lmscope.errors import CircuitError


def target_inputs(lin: Linearised, p: Pass, graph: Graph, targets: Sequence[int]) -> Tensor:
    """[B, len(targets)] float64: each target node's input in pass ``p`` (features: ``mlp_in ·
    W_enc[:, i]``; logits: the de-meaned logit)."""
    n_logit0 = graph.n_nodes - len(graph.logit_ids)
    w_u = lin.sites.unembedding
    cols = []
    for t in targets:
        if t < graph.n_features:
            layer, pos, latent = (int(v) for v in graph.features[t])
            w_enc = lin.coders.W_enc(layer)[:, latent]
            cols.append(p.mlp_in[layer][:, pos].to(w_enc.dtype) @ w_enc)
        elif t >= n_logit0:
            tok = graph.logit_ids[t - n_logit0]
            cols.append(p.final @ (w_u[:, tok] - w_u.mean(1)))
        else:
            raise CircuitError(f"node {t} is an error or token node: those have no inputs")
    return torch.stack(cols, 1).double()


def removal_effects(
    lin: Linearised, graph: Graph, sources: Sequence[int], targets: Sequence[int], batch: int = 64
) -> Tensor:
    """[len(targets), len(sources)]: how much each target's input drops when each source alone is
    zeroed (a feature's activation, an error vector, a token's embedding), everything else clean."""
    c, t = lin.clean, graph.n_tokens
    n_src = graph.n_features + graph.n_errors + graph.n_tokens
    if any(not 0 <= s < n_src for s in sources):
        raise CircuitError(f"sources must be feature, error or token nodes (0-{n_src - 1})")
    with torch.no_grad():
        base = target_inputs(lin, lin.forward(), graph, targets)[0]
        columns = []
        for lo in range(0, len(sources), batch):
            chunk = sources[lo : lo + batch]
            b = len(chunk)
            embed = c.embed.expand(b, -1, -1).clone()
            acts = [a.expand(b, -1, -1).clone() for a in c.acts]
            errors = [e.expand(b, -1, -1).clone() for e in c.errors]
            for row, s in enumerate(chunk):
                if s < graph.n_features:
                    layer, pos, latent = (int(v) for v in graph.features[s])
                    acts[layer][row, pos, latent] = 0
                elif s < graph.n_features + graph.n_errors:
                    layer, pos = divmod(s - graph.n_features, t)
                    errors[layer][row, pos] = 0
                else:
                    embed[row, s - graph.n_features - graph.n_errors] = 0
            p = lin.forward(rows=b, embed=embed, acts=acts, errors=errors)
            columns.append((base - target_inputs(lin, p, graph, targets)).T)
    return torch.cat(columns, 1).cpu()


__all__ = ["removal_effects", "target_inputs"]
