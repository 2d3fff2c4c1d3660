"""Circuits: attribution graphs over a replacement model made of transcoders (per-layer or a CLT).

``linearise`` (replacement.py) freezes the model on a prompt and swaps each MLP for its
transcoder (or a cross-layer transcoder's decoders into that layer) plus an error term; ``build_graph`` (graph.py) computes the direct effect between every
pair of nodes in batched backward passes; ``prune`` and ``scores`` (prune.py) keep the influential
part and measure how much of it the features explain; ``graph_json`` (export.py) writes it out.
Guide: docs/circuits.md; JSON format: docs/formats.md, "Attribution graph".

>>> graph = build_graph(loaded, transcoders, ids, prompt=text)
>>> kept = prune(graph, 0.8, 0.98); replacement, completeness = scores(graph)
"""

from lmscope.circuits.export import graph_json, load_graph, save_graph
from lmscope.circuits.frozen import Frozen
from lmscope.circuits.graph import Graph, attribute, build_graph, select_logits
from lmscope.circuits.prune import Pruned, influence, node_influence, normalise, prune, scores
from lmscope.circuits.replacement import (
    Linearised,
    Transcoder,
    check_clt,
    check_transcoders,
    linearise,
    suite_transcoders,
)
from lmscope.circuits.steer import clamp_features

__all__ = [
    "Frozen",
    "Graph",
    "Linearised",
    "Pruned",
    "Transcoder",
    "attribute",
    "build_graph",
    "check_clt",
    "check_transcoders",
    "clamp_features",
    "graph_json",
    "influence",
    "linearise",
    "load_graph",
    "node_influence",
    "normalise",
    "prune",
    "save_graph",
    "scores",
    "select_logits",
    "suite_transcoders",
]
