"""Suite eval time: the fast path (clean stream cached once, each SAE run from its layer on) vs the
naive one (a full forward per SAE), same SAEs, same tokens, same metrics.

Both are the real `lmscope.evals.evaluate_saes` (`EvalConfig(fast=True)` / `fast=False`). Per token
block both run one clean forward; then per SAE the naive path runs two full forwards (the SAE
spliced in, and its site zero-ablated for CE recovered), while the fast path runs only the layers
after the site, twice (and the zero ablation once per site). A plain full forward (with logits) of
the same blocks is timed too, so each path's cost can be read in full forwards per SAE. Contenders
are interleaved run by run; the metrics of the two paths are compared at the end.

    .venv/bin/python benchmarks/eval.py --suite runs/bench/suite18 --tokens 254 --repeats 3 \\
        --threads 1 --out benchmarks/results/eval_suite18.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, summarise, time_interleaved  # noqa: E402

from lmscope.evals import EvalConfig, eval_blocks, evaluate_saes  # noqa: E402
from lmscope.model import SiteModel  # noqa: E402
from lmscope.suite import Suite  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="runs/bench/suite18")
    ap.add_argument("--tokens", type=int, default=254, help="eval tokens (BOS/EOS/pad excluded)")
    ap.add_argument("--batch-size", type=int, default=2, help="sequences per forward pass")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None, help="write JSON results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    suite = Suite.open(args.suite)
    loaded = suite.load_model(device=args.device)
    saes = {name: suite.load_sae(name, device=loaded.device) for name in suite.names}
    cfg = EvalConfig(
        corpus=suite.corpus, seq_len=suite.seq_len, tokens=args.tokens, batch_size=args.batch_size
    )
    blocks = eval_blocks(loaded, cfg)
    sm = SiteModel(loaded)
    out: dict[str, dict] = {}

    def full_forward() -> None:
        with torch.inference_mode():
            for b in blocks:
                sm.run(b.input_ids)

    def run(fast: bool) -> None:
        out["fast" if fast else "naive"] = evaluate_saes(
            loaded, saes, blocks, EvalConfig(fast=fast)
        )

    # Warm-up on one SAE (first-call allocations), then the whole suite, interleaved.
    first = dict(list(saes.items())[:1])
    for fast in (True, False):
        evaluate_saes(loaded, first, blocks, EvalConfig(fast=fast))
    fns = {"full_forward": full_forward, "fast": lambda: run(True), "naive": lambda: run(False)}
    times = time_interleaved(fns, repeats=args.repeats, warmup=0)

    n = len(saes)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = [nv / fv for nv, fv in zip(times["naive"], times["fast"], strict=True)]
    keys = ("l0", "fvu", "delta_lm_loss", "kl", "ce_recovered")
    diffs = {
        k: max(abs(out["fast"][s].scalars[k] - out["naive"][s].scalars[k]) for s in saes)
        for k in keys
    }
    result = {
        "benchmark": "eval",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {**machine_info(), "device": str(loaded.device)},
        "command": " ".join(sys.argv),
        "model": suite.model,
        "saes": n,
        "sites": sorted({s.site for s in out["fast"].values()}),
        "d_sae": sorted({e["d_sae"] for e in suite.entries}),
        "tokens": sum(b.n_tokens for b in blocks),
        "sequences": sum(len(b.input_ids) for b in blocks),
        "times_s": times,
        "summary": {k: summarise(v) for k, v in times.items()},
        "speedup_ratio_of_medians": med["naive"] / med["fast"],
        "speedup_median_of_per_run_ratios": statistics.median(ratios),
        "full_forwards_per_sae": {
            "fast": (med["fast"] - med["full_forward"]) / med["full_forward"] / n,
            "naive": (med["naive"] - med["full_forward"]) / med["full_forward"] / n,
        },
        "max_abs_metric_difference_fast_vs_naive": diffs,
        "delta_lm_loss": {s: r.scalars["delta_lm_loss"] for s, r in out["fast"].items()},
    }
    print(
        f"| {suite.model} | {n} SAEs | {result['tokens']} tok | full forward {med['full_forward']:.2f} s | "
        f"naive {med['naive']:.1f} s | fast {med['fast']:.1f} s | speedup {med['naive'] / med['fast']:.2f}x "
        f"(per-run median {statistics.median(ratios):.2f}x) |"
    )
    print(
        "full forwards per SAE:",
        {k: round(v, 2) for k, v in result["full_forwards_per_sae"].items()},
    )
    print("max |fast - naive|:", diffs)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
