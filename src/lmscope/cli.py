"""The `lmscope` command line: one subcommand per pipeline stage.

Each subcommand parses its flags here and calls the stage's Python API; errors lmscope raises on
purpose (`LmscopeError`) print as one line, and `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from lmscope.errors import LmscopeError

Command = Callable[[argparse.Namespace], int]

# Each module defines ``register(subparsers)``, adding its commands; imports inside the commands
# keep `lmscope --help` fast.
STAGE_CLIS = (
    "lmscope.evals.cli",
    "lmscope.interp.cli",
    "lmscope.intervene.cli",
    "lmscope.serve.cli",
    "lmscope.releases.cli",
)


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


def _add_force_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true",
                   help="replace --out even if it holds files this command did not write")  # fmt: skip


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
    from lmscope.activations.harvest import HarvestConfig
    from lmscope.activations.store import ActivationStore
    from lmscope.distributed import harvest_parts, session
    from lmscope.outputs import claim_dir

    claim_dir(args.out, owned=lambda p: ActivationStore.exists(str(p)), command="harvest",
              can_force=False)  # fmt: skip
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
    with session() as ranks:  # under torchrun the ranks split the blocks; else one process
        store = harvest_parts(cfg, args.out, ranks, resume=not args.restart)
    if ranks.leader:
        print(f"harvested {store.rows:,} tokens × {len(store.sites)} sites into {args.out}")
    return 0


def _csv(text: str, kind: type = str) -> list:  # type: ignore[type-arg]
    return [kind(v) for v in text.split(",") if v.strip()]


def _train_specs(args: argparse.Namespace, site_names: list[str], n_layers: int) -> list:  # type: ignore[type-arg]
    """SAESpecs from the command-line flags (one group: sites × widths × sparsities)."""
    from lmscope.errors import ConfigError
    from lmscope.model import parse_sites
    from lmscope.train import expand_group

    if not args.sites:
        raise ConfigError("name the sites to train on with --sites (or give --config SUITE.toml)")
    group: dict[str, object] = {
        "sites": [str(s) for s in parse_sites(args.sites, n_layers)],
        "widths": _csv(args.widths),
        "architecture": args.arch,
    }
    sparsity = {"target_l0": args.l0, "sparsity_coeff": args.lam, "k": args.k}
    given = {k: v for k, v in sparsity.items() if v}
    if len(given) != 1:
        raise ConfigError("give exactly one of --l0, --lam or --k")
    ((key, value),) = given.items()
    group[key] = _csv(value, int if key != "sparsity_coeff" else float)
    if args.out_site:
        group["out_site"] = args.out_site
    specs = expand_group(group)
    missing = sorted({site for s in specs for site in s.sites} - set(site_names))
    if missing:
        raise ConfigError(
            f"sites {missing} are not in the data; available: {', '.join(site_names)}"
        )
    return specs


def _holds_a_suite(p: Any) -> bool:
    return bool((p / "manifest.json").is_file() or all(c.is_dir() for c in p.iterdir()))


def _cmd_train(args: argparse.Namespace) -> int:
    from lmscope.distributed import session

    with session() as ranks:  # under torchrun the ranks split the suite's SAEs (or DDP one)
        return _train(args, ranks)


def _train(args: argparse.Namespace, ranks: Any) -> int:
    from dataclasses import replace

    from lmscope.activations.store import ActivationStore
    from lmscope.activations.stream import stream_batches
    from lmscope.distributed import publish_suite, train_parts
    from lmscope.distributed.remote import is_remote, work_dir_for
    from lmscope.errors import ConfigError, SiteError
    from lmscope.model import SiteModel, load_model, parse_sites
    from lmscope.outputs import claim_dir
    from lmscope.suite import record_training
    from lmscope.train import DataFactory, TrainConfig, load_suite, store_data

    specs, cfg = load_suite(args.config) if args.config else ([], TrainConfig())
    overrides = {
        "total_tokens": args.tokens,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "checkpoint_every": args.checkpoint_every,
        "fast": False if args.no_fast else None,
    }
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if not is_remote(args.out):  # a suite to resume, SAE folders of an interrupted run, or new
        claim_dir(args.out, owned=_holds_a_suite, command="train", can_force=False)
    if (args.store is None) == (args.stream_model is None):
        raise ConfigError(
            "give the data as --store URL (a harvested store) or --model NAME (stream)"
        )
    if args.store is not None:
        store = ActivationStore(args.store)
        # The store names its sites, not the model's depth: enough layers to parse every name.
        n_layers = 1 + max(s.layer for s in parse_sites(store.sites, 1 << 30))
        available = store.sites
    else:
        device = ranks.device(args.device)  # one GPU per rank under torchrun
        loaded = load_model(args.stream_model, device=device, dtype=args.model_dtype)
        n_layers = SiteModel(loaded).n_layers
        available = [str(s) for s in parse_sites("all.*", n_layers)]
    if not specs:
        try:
            specs = _train_specs(args, available, n_layers)
        except SiteError as e:  # the layers known are the store's, not the model's
            if args.store is None:
                raise
            raise SiteError(str(e).replace("this model has", f"the store at {args.store} holds")) from None  # fmt: skip
    if args.store is not None:
        meta = store.meta
        model, corpus = store.model_name, str(meta.get("corpus", "default"))
        seq_len, model_dtype = int(meta.get("seq_len", 128)), str(meta.get("model_dtype", "float32"))  # fmt: skip
    else:
        model, corpus, seq_len, model_dtype = args.stream_model, args.corpus, args.seq_len, args.model_dtype  # fmt: skip
    specs = [s if s.model else replace(s, model=model) for s in specs]

    def data_for(sites: list[str]) -> DataFactory:  # each rank reads only its SAEs' sites
        if args.store is not None:
            return store_data(store, sites, cfg.batch_size, seed=cfg.seed)
        return stream_batches(loaded, sites, cfg.batch_size, corpus=args.corpus,
                              seq_len=args.seq_len, seed=cfg.seed)  # fmt: skip

    out = work_dir_for(args.out, args.work_dir)  # a remote suite trains locally, then publishes
    folders = train_parts(specs, data_for, cfg, out, ranks, resume=args.resume,
                          ranks_per_sae=args.ranks_per_sae)  # fmt: skip
    if not ranks.leader:
        return 0
    if cfg.kl_tokens > 0:  # the KL phase ([train] kl_tokens): the SAEs spliced into the model
        from lmscope.train.finetune import finetune_suite

        kl_model = loaded if args.store is None else load_model(model, dtype=model_dtype)
        finetune_suite(kl_model, folders, cfg, corpus=corpus, seq_len=seq_len, resume=True)
    record_training(out, folders, model=model, corpus=corpus, seq_len=seq_len, model_dtype=model_dtype)  # fmt: skip
    if is_remote(args.out):  # a local --out is trained in place (work_dir_for made it absolute)
        publish_suite(out, args.out)
        print(f"published the suite in {out} to {args.out}")
    for f in folders:
        print(f)
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from lmscope.build import build

    suite = build(args.config, args.out)
    if args.serve:  # the same as running `lmscope serve SUITE --port PORT` next
        served = build_parser().parse_args(["serve", str(suite.path), "--port", str(args.port)])
        return int(served.func(served))
    return 0


# What an SAE writer (export, import) may find in its --out and overwrite: one SAE's files in any
# format lmscope writes, nothing else (a suite, or an SAE's train_log.jsonl/eval.json, is refused).
SAE_FILES = ("config.json", "weights.safetensors", "cfg.json", "sae_weights.safetensors",
             "params.npz", "params.safetensors", "lmscope.json")  # fmt: skip


def _cmd_export(args: argparse.Namespace) -> int:
    from lmscope.outputs import claim_dir, holds_only
    from lmscope.sae import export_sae, load_sae

    claim_dir(args.out, owned=holds_only(SAE_FILES), command="export", force=args.force)
    path = export_sae(load_sae(args.sae), args.out, args.format)
    print(f"wrote {args.format} SAE to {path}")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from zipfile import BadZipFile

    from safetensors import SafetensorError

    from lmscope.errors import SAEError
    from lmscope.outputs import claim_dir, holds_only
    from lmscope.sae import import_sae, save_sae

    claim_dir(args.out, owned=holds_only(SAE_FILES), command="import", force=args.force)
    try:
        sae = import_sae(args.source)
    except (ValueError, KeyError, TypeError, OSError, EOFError, SafetensorError, BadZipFile) as e:
        # files that are not what their names say: garbage params.npz, cfg.json, safetensors
        raise SAEError(f"cannot import {args.source}: {type(e).__name__}: {e}") from None
    path = save_sae(sae, args.out)
    print(f"imported {args.source} as a native lmscope SAE in {path}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like lmscope's own (its default prints the usage too);
    subcommand parsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"lmscope: error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lmscope",
        description="Build a scope for a language model: SAEs at every layer and sublayer.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice; 1 is often faster on a busy shared machine)",
    )
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

    p = sub.add_parser(
        "train",
        help="train a suite of SAEs in one pass over the data",
        description="Train every SAE of a suite (sites × widths × sparsities) from one pass over a "
        "harvested store (--store) or activations streamed from the model (--model). "
        "Checkpoints on SIGINT/SIGTERM and every --checkpoint-every steps; --resume continues.",
    )
    p.add_argument(
        "--config", help="suite TOML ([train] + [[sae]] groups); flags below override [train]"
    )
    p.add_argument("--store", help="activation store folder or fsspec URL")
    p.add_argument("--model", dest="stream_model", default=None,
                   help="stream activations from this model instead of a store")  # fmt: skip
    p.add_argument("--device", default=None, help="device for a streamed model (default: best)")
    p.add_argument("--model-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--corpus", default="default", help="corpus for a streamed model (default: %(default)s)"
    )
    p.add_argument(
        "--seq-len", type=int, default=128, help="streamed sequence length (default: %(default)s)"
    )
    p.add_argument("--sites", help="sites to train on, e.g. L6.resid_post or L0-17.resid_post")
    p.add_argument("--arch", default="jumprelu",
                   choices=["jumprelu", "topk", "batchtopk", "matryoshka_batchtopk", "relu",
                            "jumprelu_transcoder"],
                   help="SAE architecture (default: %(default)s)")  # fmt: skip
    p.add_argument(
        "--widths",
        default="16384",
        help="comma-separated widths, e.g. 4096,16k (default: %(default)s)",
    )
    p.add_argument("--l0", help="target L0s, comma-separated (JumpReLU, ReLU, transcoders)")
    p.add_argument("--lam", help="fixed sparsity coefficients λ, comma-separated")
    p.add_argument("--k", help="k for topk/batchtopk, comma-separated")
    p.add_argument("--out-site", help="transcoders: output site kind, e.g. mlp_out")
    p.add_argument(
        "--tokens", type=int, default=None, help="training tokens (default: config or 100M)"
    )
    p.add_argument("--batch-size", type=int, default=None, help="rows per step (default: 4096)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: 7e-5)")
    p.add_argument(
        "--seed", type=int, default=None, help="seed for init and data order (default: 0)"
    )
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints")
    p.add_argument(
        "--no-fast", action="store_true", help="plain autograd instead of the sparse kernel"
    )
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--out", required=True,
                   help="suite folder, or an fsspec URL (s3://, gs://) to publish it to")  # fmt: skip
    p.add_argument("--work-dir", default=None,
                   help="local folder to train in when --out is a URL (default: under the cache)")  # fmt: skip
    p.add_argument("--ranks-per-sae", type=int, default=None,
                   help="under torchrun: ranks training each SAE data-parallel (default: 1, or "
                   "enough that no rank is idle)")  # fmt: skip
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("build", help="harvest, train, eval, interpret and report a whole suite",
                       description="Run harvest → train → eval → interpret → report as one "
                       "resumable job (rerun the same command after a crash or Ctrl-C to continue). "
                       "Presets: quick (the README's main job, ~20 min on 2 CPU cores), standard, "
                       "gemma-scope; or a TOML config (see docs/build.md).")  # fmt: skip
    p.add_argument("config", help="preset name (quick, standard, gemma-scope) or a TOML file")
    p.add_argument("--out", required=True, help="suite folder to build (or resume)")
    p.add_argument("--serve", action="store_true", help="serve the suite when the build is done")
    p.add_argument("--port", type=int, default=8000, help="port for --serve (default: %(default)s)")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("export", help="write an SAE in another format",
                       description="Write a native lmscope SAE folder as SAELens or Gemma Scope files.")  # fmt: skip
    p.add_argument("sae", help="native SAE folder (config.json + weights.safetensors)")
    p.add_argument(
        "--format", required=True, choices=["native", "saelens", "gemmascope", "gemmascope2"]
    )
    p.add_argument("--out", required=True, help="folder to write")
    _add_force_flag(p)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("import", help="read a Gemma Scope or SAELens SAE into lmscope's format",
                       description="Import a local folder (Gemma Scope 1 params.npz, Gemma Scope 2, "
                       "SAELens) or a Hugging Face path such as "
                       "google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71.")  # fmt: skip
    p.add_argument("source", help="local folder or Hugging Face repo path")
    p.add_argument("--out", required=True, help="native SAE folder to write")
    _add_force_flag(p)
    p.set_defaults(func=_cmd_import)
    for stage in STAGE_CLIS:  # later stages add their own subcommands
        importlib.import_module(stage).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None:
        import torch

        torch.set_num_threads(max(1, args.threads))
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
