"""Interpretation throughput: the streaming pass of `lmscope interpret` over a suite, against a bare
forward pass and a forward + encode of the same tokens.

Three contenders run the same token blocks, interleaved run by run so that a busy spell on a shared
machine hits all alike:
- *bare*: the model forward, stopping after the deepest site of the suite;
- *encode*: that forward plus every SAE's `encode` (what any interpretation must pay);
- *interpret*: the real streaming pass (`lmscope.interp.pipeline.collect`): forward, encode, and
  every latent's top-k, band samples, density and histogram.
Then one full `interpret()` call (corpus check, pass, logit lens, neighbours, database) writes the
suite's features.db and is timed by phase.

    .venv/bin/python benchmarks/interpret.py runs/bench/suite18 --tokens 4096 --repeats 3
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
from common import machine_info  # noqa: E402

from lmscope.activations.harvest import read_sites  # noqa: E402
from lmscope.interp.features import LatentStats  # noqa: E402
from lmscope.interp.pipeline import InterpretConfig, collect, interpret, token_blocks  # noqa: E402
from lmscope.model import SiteModel  # noqa: E402
from lmscope.suite import Suite  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("suite", type=Path, help="a trained suite (e.g. 18 SAEs × 4096 latents)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--full-tokens", type=int, default=None,
                    help="tokens for the one full interpret() run (default: --tokens)")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-full", action="store_true", help="time the pass only")
    ap.add_argument("--out", type=Path, default=None, help="write JSON results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    suite = Suite.open(args.suite)
    suite.require_saes()
    loaded = suite.load_model(device="cpu")
    model = SiteModel(loaded)
    entries = suite.entries
    modules = {e["name"]: suite.load_sae(e["name"]).eval() for e in entries}
    sites = list(dict.fromkeys(e["site"] for e in entries))
    cfg = InterpretConfig(tokens=args.tokens)
    blocks = list(token_blocks(suite, loaded.tokenizer, cfg))

    def bare() -> None:
        for b in blocks:
            read_sites(model, b.input_ids, sites)

    def encode() -> None:
        with torch.inference_mode():
            for b in blocks:
                acts = read_sites(model, b.input_ids, sites)
                for e in entries:
                    x = acts[e["site"]]
                    modules[e["name"]].encode(x.reshape(-1, x.shape[-1]))

    def full_pass() -> None:
        stats = {e["name"]: LatentStats(e["d_sae"], cfg.stats) for e in entries}
        collect(model, modules, entries, blocks, stats)

    result: dict[str, object] = {
        "benchmark": "interpret",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_info(),
        "command": " ".join(sys.argv),
        "model": suite.model,
        "saes": len(entries),
        "latents": sum(e["d_sae"] for e in entries),
        "tokens": args.tokens,
    }
    if args.repeats > 0:
        contenders = {"bare": bare, "encode": encode, "interpret": full_pass}
        bare()  # warm-up
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(args.repeats):
            for name, fn in contenders.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        tps = {name: args.tokens / statistics.median(t) for name, t in times.items()}
        result |= {"times_s": times, "tokens_per_s": tps,
                   "interpret_over_bare": tps["interpret"] / tps["bare"],
                   "interpret_over_encode": tps["interpret"] / tps["encode"]}  # fmt: skip
        print(f"| {suite.model} | {len(entries)} SAEs × {entries[0]['d_sae']} | {args.tokens} tok | "
              + " | ".join(f"{k} {v:,.0f} tok/s" for k, v in tps.items())
              + f" | interpret/encode {tps['interpret'] / tps['encode']:.3f} |")  # fmt: skip
    if not args.skip_full:
        result["full"] = time_full_run(suite, loaded, args.full_tokens or args.tokens)
        print(f"full interpret(): {result['full']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


def time_full_run(suite: Suite, loaded: object, tokens: int) -> dict[str, float]:
    """One real `interpret()` call, split into its streaming pass and the rest (corpus check,
    logit lens, neighbours, database)."""
    import lmscope.interp.pipeline as pipeline

    phases: dict[str, float] = {}
    real_collect = pipeline.collect

    def timed_collect(*args: object, **kwargs: object) -> None:
        t0 = time.perf_counter()
        real_collect(*args, **kwargs)  # type: ignore[arg-type]
        phases["pass_s"] = time.perf_counter() - t0

    pipeline.collect = timed_collect  # type: ignore[assignment]
    try:
        t0 = time.perf_counter()
        path = interpret(suite, InterpretConfig(tokens=tokens), loaded=loaded)  # type: ignore[arg-type]
        wall = time.perf_counter() - t0
    finally:
        pipeline.collect = real_collect
    return {"tokens": tokens, "wall_s": wall, **phases, "rest_s": wall - phases["pass_s"],
            "pass_tokens_per_s": tokens / phases["pass_s"], "db_bytes": path.stat().st_size}  # fmt: skip


if __name__ == "__main__":
    main()
