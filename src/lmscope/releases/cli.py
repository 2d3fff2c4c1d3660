"""`lmscope releases`, `lmscope pull` and `lmscope export-features`."""

from __future__ import annotations

import argparse
from typing import Any

COMMANDS: tuple[str, ...] = (
    "releases",
    "pull",
    "export-features",
)  # the subcommands register() adds


def _cmd_releases(args: argparse.Namespace) -> int:
    from lmscope.releases.registry import WIDTHS, releases

    rows = releases(model=args.model)
    if not rows:
        print(f"no registered release for model {args.model!r}; `lmscope releases` lists all")
        return 0
    print(f"{'release':<40}{'repo':<36}{'model':<24}{'sites':<22}{'widths':<24}l0")
    for r in rows:
        items = r.items()
        kinds = sorted({it.kind + (f"→{it.out_kind}" if it.out_kind else "") for it in items})
        widths = sorted({it.width for it in items}, key=lambda w: WIDTHS.get(w, 0))
        l0s = sorted({it.l0 for it in items}, key=lambda v: (v.isdigit(), int(v) if v.isdigit() else v))  # fmt: skip
        l0 = ",".join(l0s) if len(l0s) <= 4 else f"{len(l0s)} values ({l0s[0]}–{l0s[-1]})"
        print(f"{r.name:<40}{r.repo:<36}{r.lmscope_model:<24}{','.join(kinds):<22}"
              f"{','.join(widths):<24}{l0}")  # fmt: skip
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    from lmscope.releases.pull import parse_layers, pull

    def csv(text: str | None) -> list[str] | None:
        return [v.strip() for v in text.split(",") if v.strip()] if text else None

    suite = pull(args.release, args.out, layers=parse_layers(args.layers), widths=csv(args.widths),
                 l0s=csv(args.l0), affine={"yes": True, "no": False}.get(args.affine or ""),
                 model=args.model, source=args.source,
                 cache_dir=args.cache_dir, revision=args.revision)  # fmt: skip
    n = len(suite.names) + len(suite.multilayer_names)
    print(f"suite {suite.path} holds {n} SAEs (model {suite.model}) after pulling "
          f"{args.release}; next: lmscope eval {suite.path}")  # fmt: skip
    return 0


def _cmd_export_features(args: argparse.Namespace) -> int:
    from lmscope.releases.neuronpedia import export_neuronpedia
    from lmscope.suite import Suite

    suite = Suite.open(args.suite)
    out = export_neuronpedia(suite, args.out, model_id=args.model_id, source_set=args.source_set,
                             saes=args.saes.split(",") if args.saes else None,
                             limit=args.limit)  # fmt: skip
    print(f"wrote Neuronpedia export of {out['features']} features "
          f"({out['activations']} activations) to {out['path']}")  # fmt: skip
    if args.check:
        from lmscope.errors import ConfigError
        from lmscope.releases.neuronpedia import validate_export

        n, errors = validate_export(out["path"])
        print(f"checked {n} features against Neuronpedia's schema: {len(errors)} schema errors")
        if errors:
            raise ConfigError(f"the export breaks Neuronpedia's schema, first: {errors[0]}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("releases", help="list the published SAE suites lmscope can pull",
                       description="List the registered releases (Gemma Scope 1 and 2 and their "
                       "SAELens names): repo, model, sites, widths and L0s.")  # fmt: skip
    p.add_argument("--model", help="only this model's releases, e.g. gemma-3-270m or gemma-2-2b")
    p.set_defaults(func=_cmd_releases)

    p = sub.add_parser("pull", help="download a published release as an lmscope suite",
                       description="Download the chosen folders of RELEASE (see `lmscope "
                       "releases`) and write them as a suite that eval, interpret, serve and "
                       "attribute read. Resumable; HF_HUB_OFFLINE=1 reads the local cache only.")  # fmt: skip
    p.add_argument("release", help="release name, e.g. gemma-scope-2-270m-pt-res-all")
    p.add_argument("--layers", help="layers, e.g. 0-3,7 (default: all the release has)")
    p.add_argument("--widths", help="widths, e.g. 16k,65k (default: all)")
    p.add_argument("--l0", help="L0s, e.g. small or 71 (default: all)")
    p.add_argument("--affine", choices=["yes", "no"],
                   help="transcoders: only those with (yes) or without (no) the affine skip (default: both)")  # fmt: skip
    p.add_argument("--out", required=True, help="suite folder to write (or extend)")
    p.add_argument("--model", help="model to check and run the SAEs on (default: the release's)")
    p.add_argument("--source", help="a local copy of the repo instead of the Hub")
    p.add_argument("--cache-dir", help="Hugging Face cache folder (default: HF_HUB_CACHE)")
    p.add_argument("--revision", help="repo revision (default: main)")
    p.set_defaults(func=_cmd_pull)

    p = sub.add_parser("export-features", help="write a suite's features for Neuronpedia",
                       description="Write the features of a suite's interpreted SAEs (features.db) "
                       "as a Neuronpedia export: per SAE a source folder with features, "
                       "activations and explanations as gzipped JSONL batches.")  # fmt: skip
    p.add_argument("suite", help="suite folder (after lmscope interpret)")
    p.add_argument("--format", default="neuronpedia", choices=["neuronpedia"])
    p.add_argument("--out", required=True, help="export folder")
    p.add_argument("--model-id", help="Neuronpedia model id (default: from the suite's model)")
    p.add_argument("--source-set", default="lmscope", help="source set name (default: %(default)s)")
    p.add_argument("--saes", help="comma-separated SAE names or sites (default: all interpreted)")
    p.add_argument("--limit", type=int, default=None, help="at most this many features per SAE")
    p.add_argument("--check", action="store_true", help="validate the export against the schema")
    p.set_defaults(func=_cmd_export_features)


__all__ = ["COMMANDS", "register"]
