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


def _cmd_steer(args: argparse.Namespace) -> int:
    from lmscope.intervene import compare, generate
    from lmscope.suite import Suite

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
    from lmscope.intervene import attribute
    from lmscope.suite import Suite

    suite = Suite.open(args.suite)
    suite.require_saes()
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
        help="attribute a target logit to every active latent: an attribution graph (JSON)",
        description="Gradient × activation of every active latent and error term of the suite's "
        "SAEs for the logit of --target (minus --contrast's) after PROMPT, with latent-to-latent "
        "edges between consecutive SAEs; prints the top nodes and edges and writes the graph.",
    )
    p.add_argument("prompt", help="text whose next token is the target")
    p.add_argument("--suite", required=True, help="suite folder")
    p.add_argument("--target", required=True, help="one token, e.g. ' Paris' (mind the space)")
    p.add_argument("--contrast", help="a second token: attribute logit(target) − logit(contrast)")
    p.add_argument("--saes", help="comma-separated sites or SAE names (default: every site's canonical SAE)")  # fmt: skip
    p.add_argument("--top", type=int, default=50, help="latent nodes kept (default: %(default)s)")
    p.add_argument("--max-edges", type=int, default=1000, help="edges kept; -1: all (default: %(default)s)")  # fmt: skip
    p.add_argument("--show", type=int, default=10, help="nodes and edges printed (default: %(default)s)")  # fmt: skip
    p.add_argument("--out", default="attribution.json", help="graph JSON to write (default: %(default)s)")  # fmt: skip
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    p.set_defaults(func=_cmd_attribute)


__all__ = ["COMMANDS", "register"]
