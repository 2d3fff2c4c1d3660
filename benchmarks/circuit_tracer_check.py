"""Cross-check lmscope's attribution graph against circuit-tracer's on the same transcoders and prompt.

Runs in the circuit-tracer venv (it pins transformers 4.x, so it cannot share lmscope's .venv):

    python3 -m venv .venv-ct && .venv-ct/bin/pip install circuit-tracer==0.5.0 "nnsight>=0.6,<0.7"
    .venv/bin/python benchmarks/circuits.py --suite S --dump runs/tc/graph.safetensors ...
    .venv-ct/bin/python benchmarks/circuit_tracer_check.py --model ~/.cache/lmscope/models/<gemma> \
        --suite S --dump runs/tc/graph.safetensors --json benchmarks/results/circuit_tracer_gemma.json

circuit-tracer's nnsight backend reads the model folder directly; its Gemma 3 mapping's
``mlp.hook_in`` / ``hook_mlp_out`` are lmscope's ``mlp_in`` / ``mlp_out``, so the suite's folded
transcoders load as they are (``W_enc`` transposed). It imports no lmscope code. (nnsight 0.8
moved ``nnsight.intervention.tracing``, which circuit-tracer 0.5.0 imports: pin nnsight < 0.7.)
A tokenizer folder saved by transformers 5 names ``TokenizersBackend``; 4.57 needs
``PreTrainedTokenizerFast`` in its tokenizer_config.json.

The comparison uses ``benchmarks/circuits.py --ct-conventions``: circuit-tracer zeroes the error
nodes at BOS and writes raw embedding rows for token nodes (see ``circuit_tracer_conventions``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


def transcoder_set(suite: Path):  # circuit-tracer types; imported late
    from circuit_tracer.transcoder.activation_functions import JumpReLU
    from circuit_tracer.transcoder.single_layer_transcoder import (
        SingleLayerTranscoder,
        TranscoderSet,
    )

    manifest = json.loads((suite / "manifest.json").read_text())
    entries = [e for e in manifest["saes"] if e.get("out_site") and e["site"].endswith(".mlp_in")]
    by_layer = {}
    for e in sorted(entries, key=lambda e: (e["layer"], e["d_sae"])):
        if e["layer"] in by_layer:
            continue
        cfg = json.loads((suite / e["name"] / "config.json").read_text())
        assert cfg["input_scale"] == 1.0 and cfg.get("output_scale") in (None, 1.0), "not folded"
        w = load_file(str(suite / e["name"] / "weights.safetensors"))
        tc = SingleLayerTranscoder(
            cfg["d_in"],
            cfg["d_sae"],
            JumpReLU(w["threshold"].float(), 0.1),
            e["layer"],
            skip_connection="W_skip" in w,
            device=torch.device("cpu"),
            dtype=torch.float32,
        )
        with torch.no_grad():
            tc.W_enc.copy_(w["W_enc"].T)
            tc.W_dec.copy_(w["W_dec"])
            tc.b_enc.copy_(w["b_enc"])
            tc.b_dec.copy_(w["b_dec"])
            if "W_skip" in w:
                tc.W_skip.copy_(w["W_skip"].T)
        by_layer[e["layer"]] = tc
    return TranscoderSet(
        by_layer, feature_input_hook="mlp.hook_in", feature_output_hook="hook_mlp_out"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the model folder (config + safetensors)")
    ap.add_argument("--suite", required=True, type=Path)
    ap.add_argument(
        "--dump", required=True, help="lmscope's graph from benchmarks/circuits.py --dump"
    )
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from circuit_tracer import attribute
    from circuit_tracer.graph import compute_graph_scores, compute_node_influence
    from circuit_tracer.replacement_model.replacement_model_nnsight import NNSightReplacementModel

    ours = load_file(args.dump)
    model = NNSightReplacementModel.from_pretrained_and_transcoders(
        args.model, transcoder_set(args.suite), device="cpu", dtype=torch.float32
    )
    start = time.perf_counter()
    g = attribute(
        ours["token_ids"],
        model,
        max_n_logits=10,
        desired_logit_prob=0.95,
        batch_size=args.batch_size,
        max_feature_nodes=None,
    )
    seconds = time.perf_counter() - start
    ct_feats = g.active_features[g.selected_features].tolist()
    our_feats = {tuple(f): i for i, f in enumerate(ours["features"].tolist())}
    n_f = len(our_feats)
    assert len(ct_feats) == n_f and all(tuple(f) in our_feats for f in ct_feats), (
        "feature sets differ"
    )
    assert g.logit_token_ids.tolist() == ours["logit_ids"].tolist(), "logit nodes differ"
    # circuit-tracer's node order → lmscope's
    perm = torch.tensor(
        [our_feats[tuple(f)] for f in ct_feats] + list(range(n_f, ours["adjacency"].shape[0]))
    )
    a_ct = torch.zeros_like(ours["adjacency"])
    a_ct[perm[:, None], perm[None, :]] = g.adjacency_matrix.float().cpu()
    a = ours["adjacency"]
    scale = float(a.abs().max())
    big = a.abs() > 1e-3 * scale
    rel = (a_ct - a).abs()[big] / a.abs()[big]
    w = torch.zeros(a.shape[0])
    w[-len(ours["logit_ids"]) :] = g.logit_probabilities.float().cpu()
    infl_ct = torch.zeros(a.shape[0])
    infl_ct[perm] = compute_node_influence(
        g.adjacency_matrix.float().cpu(), w[torch.argsort(perm)]
    ).float()
    infl = ours["influence"]
    inner = torch.arange(n_f + 0)  # features
    top_ours = set(inner[infl[:n_f].argsort(descending=True)[:50]].tolist())
    top_ct = set(inner[infl_ct[:n_f].argsort(descending=True)[:50]].tolist())
    r_ct, c_ct = compute_graph_scores(g)
    out = {
        "circuit_tracer_seconds": seconds,
        "features": n_f,
        "edge_max_abs_diff_over_max": float((a_ct - a).abs().max()) / scale,
        "edge_rel_diff_max_over_edges_above_1e-3_of_max": float(rel.max()),
        "edge_rel_diff_median": float(rel.median()),
        "influence_max_rel_diff": float(
            ((infl_ct - infl).abs() / infl.abs().clamp_min(1e-12))[infl > 1e-6].max()
        ),
        "top50_features_identical": top_ours == top_ct,
        "top50_overlap": len(top_ours & top_ct),
        "replacement": {"lmscope": float(ours["scores"][0]), "circuit_tracer": r_ct},
        "completeness": {"lmscope": float(ours["scores"][1]), "circuit_tracer": c_ct},
    }
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
