"""`lmscope eval SUITE_OR_SAE` and `lmscope report SUITE` (registered by ``lmscope.cli``)."""

from __future__ import annotations

import argparse
from typing import Any

COMMANDS: tuple[str, ...] = ("eval", "report")


def _cmd_eval(args: argparse.Namespace) -> int:
    from lmscope.evals.evaluate import EvalConfig
    from lmscope.evals.results import evaluate_path

    cfg = EvalConfig(
        corpus=args.corpus,
        seq_len=args.seq_len,
        tokens=args.tokens,
        recon_tokens=args.recon_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        fast=not args.reference,
    )
    names = [n for n in (args.saes or "").split(",") if n.strip()] or None
    results = evaluate_path(
        args.path,
        cfg,
        names=names,
        model=args.model,
        device=args.device,
        model_dtype=args.model_dtype,
    )
    print(f"{'SAE':<36} {'L0':>7} {'FVU':>7} {'ΔLM':>8} {'KL':>8} {'CE rec':>7} {'dead':>6}")
    for name, r in results.items():
        s = r.scalars
        print(
            f"{name:<36} {s['l0']:7.1f} {s['fvu']:7.3f} {s['delta_lm_loss']:8.4f} "
            f"{s['kl']:8.4f} {s['ce_recovered']:7.3f} {s['dead']:6d}"
        )
    print(
        f"evaluated {len(results)} SAE(s) on {next(iter(results.values())).scalars['tokens']:,} tokens; "
        f"results in each SAE's eval.json"
    )
    return 0


def _holds_a_report(p: Any) -> bool:
    return all(c.name in ("index.html", "plots") for c in p.iterdir())


def _cmd_report(args: argparse.Namespace) -> int:
    from lmscope.evals.report import write_report
    from lmscope.outputs import claim_dir
    from lmscope.suite import Suite

    if args.out is not None:  # the default <suite>/report is the report's own
        claim_dir(args.out, owned=_holds_a_report, command="report", force=args.force)
    index = write_report(Suite.open(args.suite), args.out)
    print(f"wrote {index} (open it in a browser)")
    return 0


def register(sub: Any) -> None:
    """Add `eval` and `report` to the `lmscope` parser."""
    p = sub.add_parser(
        "eval",
        help="measure SAEs on held-out tokens: L0, FVU, ΔLM loss, KL, CE recovered, dead latents",
        description="Evaluate every SAE of a suite (or one SAE folder) on the eval split of the "
        "corpus; writes <sae>/eval.json and the suite manifest's metrics.",
    )
    p.add_argument("path", help="suite folder, or an SAE folder (inside a suite or alone)")
    p.add_argument("--saes", help="only these SAEs or sites, comma-separated (default: all)")
    p.add_argument(
        "--tokens",
        type=int,
        default=8192,
        help="held-out tokens to evaluate on, BOS/EOS/pad excluded (default: %(default)s)",
    )
    p.add_argument(
        "--recon-tokens",
        type=int,
        default=0,
        help="measure L0, FVU, dead and dense over this many eval tokens instead (one forward per "
        "block, no splicing; 'dead' needs many tokens) (default: same as --tokens)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=4,
        help="sequences per forward pass (default: %(default)s)",
    )
    p.add_argument("--corpus", default=None, help="corpus (default: the suite's, else 'default')")
    p.add_argument(
        "--seq-len", type=int, default=None, help="sequence length (default: the suite's, else 128)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="document shuffling seed (default: %(default)s)"
    )
    p.add_argument(
        "--model", default=None, help="a lone SAE folder's model (default: its config's)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    p.add_argument(
        "--model-dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="dtype the model runs in (default: the suite's, else float32)",
    )
    p.add_argument(
        "--reference",
        action="store_true",
        help="slow reference path: one full forward per SAE instead of from its layer",
    )
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "report",
        help="write a static HTML report of a suite's eval results",
        description="Write <suite>/report/index.html with PNG plots (frontiers, metrics across "
        "layers, latent frequencies, by position) and a table of every SAE; opens from disk.",
    )
    p.add_argument("suite", help="suite folder (evaluate it first with `lmscope eval`)")
    p.add_argument("--out", default=None, help="report folder (default: <suite>/report)")
    p.add_argument(
        "--force", action="store_true", help="replace --out even if it holds other files"
    )
    p.set_defaults(func=_cmd_report)


__all__ = ["COMMANDS", "register"]
