"""`lmscope steer` and `lmscope attribute`: the intervene stage's commands (see docs/intervene.md)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmscope.sae import SAE
    from lmscope.suite import Suite

COMMANDS: tuple[str, ...] = ("steer", "attribute")


class _SAEs:
    """SAEs of a suite by site or name, each loaded once, on the model's device."""

    def __init__(self, suite: Suite, device: Any):
        self.suite, self.device = suite, device
        self._loaded: dict[str, SAE] = {}

    def get(self, key: str) -> SAE:
        name = self.suite.resolve(key)
        if name not in self._loaded:
            self._loaded[name] = self.suite.load_sae(name, device=self.device)
        return self._loaded[name]


def _feature(spec: str) -> tuple[str, int]:
    from lmscope.errors import InterventionError

    key, _, idx = spec.strip().rpartition(":")
    if not key or not idx.strip().lstrip("-").isdigit():
        raise InterventionError(
            f"cannot parse feature {spec!r}; write SITE:INDEX (or SAE_NAME:INDEX), e.g. L6.resid_post:123"
        )
    return key, int(idx)


def _clamp_value(spec: str) -> float | None:
    try:
        return float(spec.partition("=")[2])
    except ValueError:
        return None  # _interventions names the bad spec


def _interventions(args: argparse.Namespace, saes: _SAEs) -> list[Any]:
    from lmscope.errors import InterventionError
    from lmscope.intervene import Ablate, Clamp, Splice, Steer

    pos = [int(p) for p in args.positions.split(",")] if args.positions else None
    items: list[Any] = []
    for key in args.splice or ():
        items.append(Splice(saes.get(key), error=False))
    for spec in args.feature or ():
        if args.coeff is None:
            raise InterventionError(
                "--feature needs --coeff, the steering strength (e.g. --coeff 8)"
            )
        key, idx = _feature(spec)
        items.append(Steer(saes.get(key), idx, args.coeff, positions=pos))
    for spec in args.clamp or ():
        feat, _, value = spec.partition("=")
        key, idx = _feature(feat)
        try:
            v = float(value)
        except ValueError:
            raise InterventionError(f"cannot parse --clamp {spec!r}; write SITE:INDEX=VALUE, e.g. L6.resid_post:123=40") from None  # fmt: skip
        items.append(Clamp(saes.get(key), idx, v, positions=pos))
    for spec in args.ablate or ():
        key, idx = _feature(spec)
        items.append(Ablate(saes.get(key), [idx], positions=pos))
    if not items:
        raise InterventionError("nothing to do: give --feature SITE:INDEX --coeff C, --clamp or --ablate")  # fmt: skip
    return items


def _check_numbers(args: argparse.Namespace, rules: dict[str, tuple[float, str]]) -> None:
    """InterventionError for the first flag out of range: {dest: (lowest, what it is)}; NaN and ±inf
    are out of range for every flag (``--coeff nan`` gave NaN probabilities)."""
    import math

    from lmscope.errors import InterventionError

    for dest, (low, what) in rules.items():
        v = getattr(args, dest)
        if v is not None and (not math.isfinite(v) or v < low):
            flag = "--" + dest.replace("_", "-")
            raise InterventionError(f"{flag} must be a finite number >= {low:g} ({what}), got {v}")


def _is_graph_file(p: Any) -> bool:
    """`owned` for attribute --out: a graph an earlier `lmscope attribute` wrote."""
    import json

    try:
        return str(json.loads(p.read_text()).get("format", "")).startswith("lmscope")
    except (OSError, ValueError, AttributeError):
        return False


def _cmd_steer(args: argparse.Namespace) -> int:
    from lmscope.intervene import compare, generate
    from lmscope.suite import Suite

    _check_numbers(args, {"coeff": (float("-inf"), "the steering strength"),
                          "max_new_tokens": (1, "tokens to generate"),
                          "temperature": (0, "0 is greedy"), "top": (0, "0 shows none")})  # fmt: skip
    for spec in args.clamp or ():
        _check_numbers(argparse.Namespace(clamp=_clamp_value(spec)), {"clamp": (float("-inf"), "SITE:INDEX=VALUE")})  # fmt: skip
    suite = Suite.open(args.suite)
    loaded = suite.load_model(device=args.device)
    items = _interventions(args, _SAEs(suite, loaded.device))
    opts = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "seed": args.seed,
    }
    clean = generate(loaded, args.prompt, (), **opts)
    steered = generate(loaded, args.prompt, items, **opts)
    print(f"prompt:      {args.prompt!r}")
    print(f"clean:       {clean!r}")
    print(f"intervened:  {steered!r}")
    if args.top > 0:
        cmp = compare(loaded, args.prompt, items, top=args.top)
        print(f"\nnext token (KL clean‖intervened = {cmp['kl']:.4g} nats):")
        for (a, pa), (b, pb) in zip(cmp["clean"], cmp["intervened"]):
            print(f"  {a!r:>16} {pa:6.3f}    {b!r:>16} {pb:6.3f}")
    return 0


def _cmd_attribute(args: argparse.Namespace) -> int:
    from lmscope.errors import InterventionError
    from lmscope.outputs import claim_file
    from lmscope.suite import Suite

    _check_numbers(args, {"top": (1, "latent nodes kept"), "max_edges": (-1, "-1 keeps all"),
                          "show": (0, "nodes and edges printed"), "batch_size": (1, "targets per pass"),
                          "max_logits": (1, "logit nodes")})  # fmt: skip
    claim_file(args.out, owned=_is_graph_file, command="attribute", force=args.force)
    suite = Suite.open(args.suite)
    suite.require_saes()
    mode = args.mode or ("graph" if args.target is None else "sae")
    if mode == "graph":
        if args.target is not None or args.contrast is not None:
            raise InterventionError("--target and --contrast belong to --mode sae; a graph attributes the top logits")  # fmt: skip
        return _attribute_graph(args, suite)
    if args.target is None:
        raise InterventionError("--mode sae needs --target, the token to attribute (e.g. ' Paris')")
    return _attribute_saes(args, suite)


def _attribute_graph(args: argparse.Namespace, suite: Suite) -> int:
    from lmscope.circuits import attribute, graph_json, prune, save_graph, suite_transcoders

    loaded = suite.load_model(device=args.device)
    keys = [k.strip() for k in args.saes.split(",") if k.strip()] if args.saes else None
    transcoders = suite_transcoders(suite, keys, device=loaded.device)
    graph = attribute(loaded, args.prompt, transcoders, max_logits=args.max_logits,
                      logit_prob=args.logit_prob, batch_size=args.batch_size)  # fmt: skip
    doc = graph_json(
        graph, prune(graph, args.node_threshold, args.edge_threshold), model=suite.model
    )
    path = save_graph(args.out, doc)
    print(_graph_summary(doc, args.show))
    print(f"\nwrote {len(doc['nodes'])} nodes and {len(doc['edges'])} edges to {path}")
    return 0


def _graph_summary(doc: dict[str, Any], n: int) -> str:
    s, p = doc["scores"], doc["pruning"]
    lines = [f"prompt {doc['prompt']!r}: {len(doc['tokens'])} tokens, graph built in {doc['build_seconds']:.1f} s",
             "logits: " + ", ".join(f"{x['token']!r} {x['probability']:.3f}" for x in doc["logits"]),
             f"replacement score {s['replacement']:.4f}, completeness score {s['completeness']:.4f}",
             f"kept {len(doc['nodes'])} of {p['nodes_total']} nodes (node threshold {p['node_threshold']}), "
             f"{len(doc['edges'])} of {p['edges_total']} edges (edge threshold {p['edge_threshold']})",
             "", f"top {n} nodes by influence:"]  # fmt: skip
    inner = [x for x in doc["nodes"] if x["kind"] in ("feature", "error")]
    for x in sorted(inner, key=lambda x: -x["influence"])[:n]:
        lines.append(f"  {x['id']:<16}{x['influence']:>9.4f}  @{x['position']} {x['token']!r}")
    return "\n".join(lines)


def _attribute_saes(args: argparse.Namespace, suite: Suite) -> int:
    from lmscope.intervene import attribute

    loaded = suite.load_model(device=args.device)
    saes = _SAEs(suite, loaded.device)
    if args.saes:
        keys = [k.strip() for k in args.saes.split(",") if k.strip()]
    else:  # every site's canonical SAE (transcoders span two sites: not here)
        keys = [s for s in suite.sites if not any(e["site"] == s and e.get("out_site") for e in suite.entries)]  # fmt: skip
    target = args.target if args.contrast is None else (args.target, args.contrast)
    max_edges = None if args.max_edges < 0 else args.max_edges
    graph = attribute(loaded, args.prompt, [saes.get(k) for k in keys], target,
                      top=args.top, max_edges=max_edges)  # fmt: skip
    print(graph.summary(args.show))
    path = graph.save(args.out)
    print(f"\nwrote {len(graph.nodes)} nodes and {len(graph.edges)} edges to {path}")
    return 0


def register(sub: Any) -> None:
    """Add `steer` and `attribute` to the `lmscope` parser."""
    p = sub.add_parser(
        "steer",
        help="generate with SAE latents steered, clamped or ablated, next to the clean model",
        description="Print the model's continuation of PROMPT without and with the interventions, "
        "and the next-token distributions (top tokens, KL). A feature is SITE:INDEX (the site's "
        "canonical SAE) or SAE_NAME:INDEX.",
    )
    p.add_argument("prompt", help="text to continue")
    p.add_argument("--suite", required=True, help="suite folder")
    p.add_argument("--feature", action="append", metavar="SITE:INDEX",
                   help="steer: add COEFF × the latent's decoder direction (repeatable)")  # fmt: skip
    p.add_argument("--coeff", type=float, default=None, help="steering coefficient, in activation units")  # fmt: skip
    p.add_argument("--clamp", action="append", metavar="SITE:INDEX=VALUE", help="set a latent to VALUE (repeatable)")  # fmt: skip
    p.add_argument("--ablate", action="append", metavar="SITE:INDEX", help="zero a latent (repeatable)")  # fmt: skip
    p.add_argument("--splice", action="append", metavar="SITE",
                   help="replace SITE by its SAE's reconstruction, no error term (repeatable)")  # fmt: skip
    p.add_argument("--positions", help="absolute token positions to act on, e.g. 3,4 (default: every token but BOS)")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=32, help="(default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--top", type=int, default=5, help="next tokens to show; 0: none (default: %(default)s)")  # fmt: skip
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    p.set_defaults(func=_cmd_steer)

    p = sub.add_parser(
        "attribute",
        help="an attribution graph of PROMPT's next token (JSON): transcoder circuits, or SAE latents",
        description="--mode graph (the default without --target): the replacement model of the suite's mlp_in → mlp_out "
        "transcoders (one per layer) with attention and norms frozen; direct effects between every "
        "feature, error, token and top-logit node, pruned by influence on the logits, with "
        "replacement and completeness scores (docs/circuits.md). --mode sae: gradient × activation "
        "of every active latent of the suite's SAEs for the logit of --target (minus --contrast's), "
        "edges between consecutive SAEs (docs/intervene.md).",
    )
    p.add_argument("prompt", help="text whose next token is attributed")
    p.add_argument("--suite", required=True, help="suite folder")
    p.add_argument(
        "--mode",
        choices=("graph", "sae"),
        default=None,
        help="(default: sae with --target, else graph)",
    )
    p.add_argument("--target", help="sae mode: one token, e.g. ' Paris' (mind the space)")
    p.add_argument("--contrast", help="sae mode: a second token: attribute logit(target) − logit(contrast)")  # fmt: skip
    p.add_argument("--saes", help="comma-separated sites or SAE names (default: every site's canonical "
                   "SAE; graph mode: each layer's mlp_in transcoder)")  # fmt: skip
    p.add_argument("--node-threshold", type=float, default=0.8, help="graph: share of influence the kept nodes carry (default: %(default)s)")  # fmt: skip
    p.add_argument("--edge-threshold", type=float, default=0.98, help="graph: share of influence the kept edges carry (default: %(default)s)")  # fmt: skip
    p.add_argument("--max-logits", type=int, default=10, help="graph: logit nodes at most (default: %(default)s)")  # fmt: skip
    p.add_argument("--logit-prob", type=float, default=0.95, help="graph: logit nodes until their probabilities sum to this (default: %(default)s)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=64, help="graph: target nodes per backward pass (default: %(default)s)")  # fmt: skip
    p.add_argument(
        "--top", type=int, default=50, help="sae: latent nodes kept (default: %(default)s)"
    )
    p.add_argument("--max-edges", type=int, default=1000, help="sae: edges kept; -1: all (default: %(default)s)")  # fmt: skip
    p.add_argument("--show", type=int, default=10, help="nodes and edges printed (default: %(default)s)")  # fmt: skip
    p.add_argument("--out", default="attribution.json", help="graph JSON to write (default: %(default)s)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace --out even if `attribute` did not write it")  # fmt: skip
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    p.set_defaults(func=_cmd_attribute)


__all__ = ["COMMANDS", "register"]
