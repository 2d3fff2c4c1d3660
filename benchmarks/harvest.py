"""Harvest throughput vs a bare forward pass of the same model over the same tokens.

The bare pass runs the same token blocks through the model, stopping after the deepest harvested
layer, and keeps nothing. The harvest is the real `lmscope.activations.harvest.harvest` call:
tokenization, the forward pass with every site read, masking, dtype conversion, checksums and
shard writes. Both are timed in the same process, interleaved run by run, so a busy spell on a
shared machine hits both alike; the ratio is what to compare.

    .venv/bin/python benchmarks/harvest.py --tokens 16384 --repeats 3 --out results.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info  # noqa: E402

from lmscope.activations.harvest import (  # noqa: E402
    HarvestConfig,
    _retain_freed_memory,
    harvest,
)
from lmscope.data import TokenBatches  # noqa: E402
from lmscope.model import SiteModel, load_model, parse_sites  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--sites", default="all.resid_post,all.mlp_out,all.attn_z")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="write JSON results here")
    args = ap.parse_args()

    loaded = load_model(args.model, device="cpu")
    model = SiteModel(loaded)
    sites = parse_sites(args.sites, model.n_layers)
    last_layer = max(s.layer for s in sites)
    last = f"L{last_layer}.resid_post"
    cfg = HarvestConfig(model=args.model, sites=args.sites, tokens=args.tokens, dtype=args.dtype)
    blocks = list(
        TokenBatches(
            cfg.corpus,
            loaded.tokenizer,
            seq_len=cfg.seq_len,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            max_tokens=cfg.tokens,
        )
    )

    def bare() -> None:
        with torch.inference_mode():
            for b in blocks:
                model.run(
                    b.input_ids, read=[last], stop_after_layer=last_layer, return_logits=False
                )

    def full() -> None:
        root = Path(tempfile.mkdtemp(prefix="lmscope-bench-harvest-"))
        try:
            harvest(cfg, str(root / "store"), loaded=loaded, progress=False)
        finally:
            shutil.rmtree(root)

    # harvest() sets glibc's malloc to keep freed memory; set it first so both passes run alike.
    _retain_freed_memory()
    bare()  # warm-up: first-call allocations, thread pools
    times: dict[str, list[float]] = {"bare": [], "harvest": []}
    for _ in range(args.repeats):
        for name, fn in (("bare", bare), ("harvest", full)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    bare_tps = args.tokens / statistics.median(times["bare"])
    harvest_tps = args.tokens / statistics.median(times["harvest"])
    ratios = [b / h for b, h in zip(times["bare"], times["harvest"], strict=True)]
    result = {
        "benchmark": "harvest",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_info(),
        "command": " ".join(sys.argv),
        "model": args.model,
        "sites": len(sites),
        "tokens": args.tokens,
        "store_dtype": args.dtype,
        "bytes_per_token": sum(model.site_dim(s) for s in sites)
        * (4 if args.dtype == "float32" else 2),
        "times_s": times,
        "bare_tokens_per_s": bare_tps,
        "harvest_tokens_per_s": harvest_tps,
        "ratio_of_medians": harvest_tps / bare_tps,
        "median_of_per_run_ratios": statistics.median(ratios),
    }
    print(
        f"| {args.model} | {len(sites)} sites | {args.tokens} tok | {args.dtype} | "
        f"bare {bare_tps:,.0f} tok/s | harvest {harvest_tps:,.0f} tok/s | "
        f"ratio {harvest_tps / bare_tps:.3f} (per-run median {statistics.median(ratios):.3f}) |"
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
