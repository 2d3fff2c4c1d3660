"""Attribution graph of one prompt on a suite's per-layer transcoders: build time, scores, and a
brute-force check of a sample of edges (issue 19).

    python benchmarks/circuits.py --suite runs/tc/suite --json benchmarks/results/circuits_gemma.json \
        --graph runs/tc/graph.json

Prints the replacement model's logit error on the prompt, the graph's size, build seconds,
replacement and completeness scores, the pruned size at 0.8 / 0.98, and for ``--check`` edges
(the largest feature→feature and →logit edges plus a seeded random sample over every source
kind) the batched-backward weight against the removal effect of ``lmscope.circuits.check``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_info  # noqa: E402

PROMPT = "The Eiffel Tower is in Paris and the Colosseum is in the city of"  # 16 tokens with BOS


def _sample_edges(
    adjacency: torch.Tensor, n_src: int, n_feat: int, k: int, seed: int
) -> list[tuple[int, int]]:
    rows = torch.cat([torch.arange(n_feat), torch.arange(n_src, adjacency.shape[0])])
    sub = adjacency[rows][:, :n_src].abs()
    top = sub.flatten().topk(k // 2).indices
    nz = sub.flatten().nonzero()[:, 0]
    g = torch.Generator().manual_seed(seed)
    rand = nz[torch.randperm(len(nz), generator=g)[: k - len(top)]]
    picks = torch.cat([top, rand]).tolist()
    return [(int(rows[i // n_src]), i % n_src) for i in picks]


def circuit_tracer_conventions(graph: Any, loaded: Any) -> Any:
    """The graph as circuit-tracer 0.5 (nnsight backend) draws it: error nodes at position 0
    (BOS) zeroed, and token nodes that write the raw embedding row ``W_E[token]`` rather than the
    embedding module's output (for Gemma, that output is ``√d_model · W_E[token]``, so
    circuit-tracer's token edges are √d_model too small; lmscope's equal the removal effect)."""
    adj = graph.adjacency.clone()
    for layer in range(graph.n_layers):
        adj[:, graph.error_index(layer, 0)] = 0
    scale = float(getattr(loaded.model.get_input_embeddings(), "embed_scale", 1.0))
    tokens = slice(graph.token_index(0), graph.token_index(0) + graph.n_tokens)
    adj[:, tokens] /= scale
    return dataclasses.replace(graph, adjacency=adj)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", required=True)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--check", type=int, default=20, help="edges checked by removal")
    ap.add_argument("--model", help="model name (default: the suite's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the numbers here")
    ap.add_argument("--graph", help="write the pruned graph JSON here")
    ap.add_argument("--dump", help="write the full graph (safetensors) for circuit_tracer_check.py")
    ap.add_argument(
        "--ct-conventions",
        action="store_true",
        help="dump with circuit-tracer 0.5's conventions (see circuit_tracer_conventions)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from lmscope.circuits import (
        build_graph,
        graph_json,
        linearise,
        prune,
        save_graph,
        scores,
        suite_transcoders,
    )
    from lmscope.circuits.check import removal_effects
    from lmscope.intervene import encode_prompt
    from lmscope.model import load_model
    from lmscope.suite import Suite

    suite = Suite.open(args.suite)
    loaded = load_model(args.model, device="cpu") if args.model else suite.load_model(device="cpu")
    tcs = suite_transcoders(suite, device="cpu")
    ids = encode_prompt(loaded, args.prompt)
    with torch.no_grad():
        ref = loaded.model(ids).logits[0, -1]
    graph = build_graph(loaded, tcs, ids, prompt=args.prompt, batch_size=args.batch_size)
    replacement, completeness = scores(graph)
    kept = prune(graph, 0.8, 0.98)
    n_src = graph.n_features + graph.n_errors + graph.n_tokens
    edges = _sample_edges(graph.adjacency, n_src, graph.n_features, args.check, seed=0)
    start = time.perf_counter()
    with torch.no_grad(), linearise(loaded, tcs, ids) as lin:
        logit_err = float((lin.logits(lin.forward())[0] - ref).abs().max())
        sources = sorted({s for _, s in edges})
        targets = sorted({t for t, _ in edges})
        effects = removal_effects(lin, graph, sources, targets, batch=16)
    check_s = time.perf_counter() - start
    checked = []
    for t, s in edges:
        want = float(effects[targets.index(t), sources.index(s)])
        got = float(graph.adjacency[t, s])
        checked.append(
            {
                "target": graph.describe(t)["id"],
                "source": graph.describe(s)["id"],
                "graph": got,
                "removal": want,
                "rel_err": abs(got - want) / max(abs(want), 1e-12),
            }
        )
    l0 = graph.n_features / max(1, int(graph.n_tokens - 1)) / graph.n_layers
    out = {
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d"),
        "prompt": args.prompt,
        "tokens": graph.n_tokens,
        "transcoders": [tc.cfg.site for tc in tcs],
        "width": tcs[0].cfg.d_sae,
        "replacement_logit_max_abs_err": logit_err,
        "features": graph.n_features,
        "mean_l0_per_layer_position": l0,
        "nodes": graph.n_nodes,
        "nonzero_edges": int((graph.adjacency != 0).sum()),
        "build_seconds": graph.seconds,
        "batch_size": args.batch_size,
        "replacement_score": replacement,
        "completeness_score": completeness,
        "pruned_nodes": int(kept.node_mask.sum()),
        "pruned_edges": int(kept.edge_mask.sum()),
        "logits": list(zip(graph.logit_tokens, graph.logit_probs.tolist())),
        "check_seconds": check_s,
        "max_rel_err": max(c["rel_err"] for c in checked),
        "checked": checked,
    }
    summary = {k: v for k, v in out.items() if k not in ("checked", "machine", "transcoders")}
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    if args.graph:
        save_graph(args.graph, graph_json(graph, kept, model=suite.model))
    if args.dump:
        from safetensors.torch import save_file

        from lmscope.circuits import node_influence

        if args.ct_conventions:
            graph = circuit_tracer_conventions(graph, loaded)
            replacement, completeness = scores(graph)

        save_file(
            {
                "adjacency": graph.adjacency.contiguous(),
                "features": graph.features.contiguous(),
                "token_ids": torch.tensor(graph.token_ids),
                "logit_ids": torch.tensor(graph.logit_ids),
                "logit_probs": graph.logit_probs,
                "influence": node_influence(graph),
                "scores": torch.tensor([replacement, completeness], dtype=torch.float64),
            },
            args.dump,
        )


if __name__ == "__main__":
    main()
