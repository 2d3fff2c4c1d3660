"""Command-line entry points of this stage (registered by ``lmscope.cli``): `lmscope interpret`."""

from __future__ import annotations

import argparse
from typing import Any

COMMANDS: tuple[str, ...] = ("interpret", "explain")  # the subcommands register() adds


def _cmd_interpret(args: argparse.Namespace) -> int:
    from lmscope.interp.features import StatsConfig
    from lmscope.interp.pipeline import InterpretConfig, interpret
    from lmscope.interp.query import counts
    from lmscope.suite import Suite

    stats = StatsConfig(k=args.k, window=args.window, bands=args.bands, per_band=args.per_band)
    cfg = InterpretConfig(tokens=args.tokens, batch_size=args.batch_size, split=args.split,
                          seed=args.seed, stats=stats, device=args.device)  # fmt: skip
    suite = Suite.open(args.suite)
    saes = [s for s in args.saes.split(",") if s.strip()] if args.saes else None
    path = interpret(suite, cfg, saes=saes)
    print(f"wrote {path}")
    for name in saes or suite.names:
        c = counts(suite, name)
        print(f"  {suite.resolve(name)}: {c['n']} latents, {c['dead']} dead, {c['dense']} dense")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from lmscope.interp.explain import ExplainError
    from lmscope.interp.explain.run import explain, parse_explainer

    if args.latents == "all":
        latents = None
    elif args.latents.isdigit():
        latents = int(args.latents)
    else:
        raise ExplainError(f"--latents takes a number or 'all', got {args.latents!r}")
    client = parse_explainer(
        args.explainer, args.key_env, timeout=args.timeout, retries=args.retries
    )
    report = explain(args.suite, saes=[s for s in args.saes.split(",") if s.strip()] if args.saes else None,
                     explainer=args.explainer, scorers=[s for s in args.scorers.split(",") if s.strip()],
                     latents=latents, judge=args.judge, concurrency=args.concurrency, client=client,
                     items=args.items)  # fmt: skip
    print(report.summary())
    return 0


def _add_explain(sub: Any) -> None:
    p = sub.add_parser(
        "explain",
        help="label every live latent of a suite and score the labels (detection, fuzzing)",
        description="Writes a label and its scores for every live latent into SUITE/features.db "
        "(made by `lmscope interpret`). Resumable per latent: a rerun asks only for what is missing. "
        "Explainers: `tokens` (built in: the tokens a latent fires on, the context before them and "
        "the tokens it promotes) or openai:<base-url>#<model> (any OpenAI-compatible chat server; "
        "the key comes from the environment variable --key-env). Scorers judge held-out contexts; "
        "the judge is the LLM when one is given, else the built-in simulator.",
    )
    p.add_argument("suite", help="suite folder with a features.db")
    p.add_argument("--saes", help="comma-separated SAE names or sites (default: every SAE)")
    p.add_argument("--explainer", default="tokens",
                   help="tokens or openai:<base-url>#<model> (default: %(default)s)")  # fmt: skip
    p.add_argument(
        "--scorers", default="detection,fuzzing", help="comma-separated (default: %(default)s)"
    )
    p.add_argument("--latents", default="all",
                   help="the first N live latents of each SAE, or all (default: %(default)s)")  # fmt: skip
    p.add_argument("--items", type=int, default=None,
                   help="judge at most N items per scorer and latent, half of them activating, and "
                   "show an LLM explainer at most 2N contexts (default: every held-out context, 12 "
                   "contexts; a few keep a small local model's prompts short)")  # fmt: skip
    p.add_argument("--judge", choices=["simulator", "llm"], default=None,
                   help="who scores: the LLM when an LLM explains, else the simulator")  # fmt: skip
    p.add_argument(
        "--concurrency", type=int, default=4, help="requests in flight (default: %(default)s)"
    )
    p.add_argument("--key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (default: %(default)s)")  # fmt: skip
    p.add_argument(
        "--timeout", type=float, default=120.0, help="seconds per request (default: %(default)s)"
    )
    p.add_argument("--retries", type=int, default=4,
                   help="retries on HTTP 429/5xx and dropped connections (default: %(default)s)")  # fmt: skip
    p.set_defaults(func=_cmd_explain)


def register(sub: Any) -> None:
    """Add `interpret` and `explain` to the `lmscope` parser."""
    p = sub.add_parser(
        "interpret",
        help="record top contexts, densities and logit lenses of every latent of a suite",
        description="One streaming pass over --tokens tokens of the suite's corpus (one model "
        "forward per batch serves every SAE) records per latent its top-k contexts, samples from "
        "activation bands, density and histogram; then its logit lens and nearest latents (within "
        "the SAE and one layer up and down). Writes SUITE/features.db (replaced whole at the end).",
    )
    p.add_argument("suite", help="suite folder (made by `lmscope train`)")
    p.add_argument("--tokens", type=int, default=50_000,
                   help="tokens to read, BOS/EOS/pad excluded (default: %(default)s)")  # fmt: skip
    p.add_argument("--saes", help="comma-separated SAE names or sites (default: every SAE)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="sequences per forward pass (default: %(default)s)")  # fmt: skip
    p.add_argument("--split", default="all", choices=["train", "eval", "all"],
                   help="corpus split (default: %(default)s)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="shuffling and sampling seed (default: %(default)s)")  # fmt: skip
    p.add_argument("--k", type=int, default=20, help="top contexts per latent (default: %(default)s)")  # fmt: skip
    p.add_argument("--window", type=int, default=8,
                   help="context tokens on each side of an example (default: %(default)s)")  # fmt: skip
    p.add_argument("--bands", type=int, default=4,
                   help="activation bands, each half the one above (default: %(default)s)")  # fmt: skip
    p.add_argument("--per-band", type=int, default=5, help="samples per band (default: %(default)s)")  # fmt: skip
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    p.set_defaults(func=_cmd_interpret)
    _add_explain(sub)


__all__ = ["COMMANDS", "register"]
