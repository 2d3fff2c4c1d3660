"""A pruned attribution graph as JSON (format ``lmscope.graph``, documented in docs/formats.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmscope.atomic import write_json_atomic
from lmscope.circuits.graph import Graph
from lmscope.circuits.prune import Pruned, prune, scores
from lmscope.errors import CircuitError

FORMAT, VERSION = "lmscope.graph", 1


def graph_json(graph: Graph, pruned: Pruned | None = None, *, model: str = "") -> dict[str, Any]:
    """The kept nodes (with influence) and edges (raw direct effects) of ``graph`` as a dict."""
    pruned = prune(graph) if pruned is None else pruned
    replacement, completeness = scores(graph)
    keep = pruned.node_mask.nonzero()[:, 0].tolist()
    nodes = []
    for i in keep:
        node = graph.describe(i)
        node["influence"] = float(pruned.influence[i])
        if node["kind"] != "logit":
            node["token"] = graph.tokens[node["position"]]
        nodes.append(node)
    ids = {i: nodes[k]["id"] for k, i in enumerate(keep)}
    targets, sources = pruned.edge_mask.nonzero(as_tuple=True)
    edges = [
        {"source": ids[s], "target": ids[t], "weight": float(graph.adjacency[t, s])}
        for t, s in zip(targets.tolist(), sources.tolist())
        if s in ids and t in ids
    ]
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": model,
        "prompt": graph.prompt,
        "tokens": graph.tokens,
        "token_ids": graph.token_ids,
        "n_layers": graph.n_layers,
        "transcoders": graph.transcoders,
        "logits": [
            {"token_id": t, "token": s, "probability": float(p)}
            for t, s, p in zip(graph.logit_ids, graph.logit_tokens, graph.logit_probs.tolist())
        ],
        "scores": {"replacement": replacement, "completeness": completeness},
        "pruning": {
            "node_threshold": pruned.node_threshold,
            "edge_threshold": pruned.edge_threshold,
            "nodes_total": graph.n_nodes,
            "edges_total": int((graph.adjacency != 0).sum()),
        },
        "build_seconds": graph.seconds,
        "nodes": nodes,
        "edges": edges,
        "annotations": {},
    }


def save_graph(path: str | Path, doc: dict[str, Any]) -> Path:
    """Write a graph document (from ``graph_json``) atomically."""
    p = Path(path)
    if p.parent != Path(""):
        p.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(p, doc)
    return p


def load_graph(path: str | Path) -> dict[str, Any]:
    """Read a graph document, refusing files of another format or a newer version."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CircuitError(f"cannot read graph {path}: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CircuitError(f"{path} is not an lmscope graph (format {FORMAT!r})")
    if doc.get("version", 0) > VERSION:
        raise CircuitError(
            f"{path} is graph version {doc['version']}; this lmscope reads {VERSION}"
        )
    return doc


__all__ = ["FORMAT", "VERSION", "graph_json", "load_graph", "save_graph"]
