"""The `lmscope` command line: one subcommand per pipeline stage.

Each subcommand parses its flags here and calls the stage's Python API; errors lmscope raises on
purpose (`LmscopeError`) print as one line, and `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from lmscope.errors import LmscopeError

Command = Callable[[argparse.Namespace], int]


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="gemma-3-270m",
        help="gemma-3-270m (embedded default), tiny-<gemma3|gemma2|llama|gpt2>, a Hugging Face id "
        "or a local folder (default: %(default)s)",
    )
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)"
    )
    p.add_argument(
        "--model-dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="dtype the model runs in (default: %(default)s)",
    )


def _add_corpus_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--corpus",
        default="default",
        help="'default' (Debian fortunes + python3-doc), a .txt/.jsonl/.parquet file or folder, "
        "or hf:<dataset>[:<config>][:<split>] (default: %(default)s)",
    )
    p.add_argument(
        "--seq-len", type=int, default=128, help="tokens per packed sequence (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="shuffling seed (default: %(default)s)")


def _cmd_harvest(args: argparse.Namespace) -> int:
    from lmscope.activations.harvest import HarvestConfig, harvest

    cfg = HarvestConfig(
        model=args.model,
        sites=args.sites,
        corpus=args.corpus,
        tokens=args.tokens,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        split=args.split,
        seed=args.seed,
        dtype=args.dtype,
        model_dtype=args.model_dtype,
        device=args.device,
        shard_rows=args.shard_rows,
    )
    store = harvest(cfg, args.out, resume=not args.restart)
    print(f"harvested {store.rows:,} tokens × {len(store.sites)} sites into {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmscope",
        description="Build a scope for a language model: SAEs at every layer and sublayer.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "harvest",
        help="run the model over a corpus and store site activations",
        description="Run the model once per batch and write every requested site to a sharded, "
        "resumable activation store.",
    )
    _add_model_flags(p)
    _add_corpus_flags(p)
    p.add_argument(
        "--sites",
        default="all.resid_post,all.mlp_out,all.attn_z",
        help="comma-separated sites, e.g. L6.resid_post, L0-17.mlp_out, all.attn_z (default: %(default)s)",
    )
    p.add_argument(
        "--tokens",
        type=int,
        default=20_000,
        help="tokens to store, BOS/EOS/pad excluded (default: %(default)s)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="sequences per forward pass (default: %(default)s)",
    )
    p.add_argument(
        "--split",
        default="train",
        choices=["train", "eval"],
        help="corpus split (default: %(default)s)",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="store dtype (default: %(default)s)",
    )
    p.add_argument(
        "--shard-rows", type=int, default=8192, help="rows per shard (default: %(default)s)"
    )
    p.add_argument("--out", required=True, help="store folder or fsspec URL (memory://, s3://, …)")
    p.add_argument(
        "--restart",
        action="store_true",
        help="refuse to resume: fail if --out already holds a store",
    )
    p.set_defaults(func=_cmd_harvest)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except LmscopeError as e:
        if args.debug:
            raise
        print(f"lmscope: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmscope: interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130
