"""Attribution graphs: which SAE latents (and error terms) make the model predict a target token.

>>> graph = attribute(loaded, "The capital of France is", saes, " Paris")
>>> graph.top_nodes(10); graph.save("paris.json")

Every SAE is spliced in with its error term as a *tap*: the site keeps its exact value, but the
latents ``f`` and the error ``ε = x − decode(f)`` become leaves that gradients reach. With ``m`` the
target (a logit at the last position, or a difference of two logits) and ``g = ∂m/∂x`` the clean
model's gradient at the site (every later layer live, nothing frozen):

- a latent node's attribution is ``f_i · (g · W_dec[i])`` (gradient × activation, total effect);
- the SAE's error node at a position is ``ε · g``, its bias ``b_dec · g`` (kept as a per-SAE total);
- per SAE, summed over ordinary positions (not BOS/EOS/pad, which SAEs never see and which are
  not decomposed): ``Σ latents + error + bias = Σ_p g·x`` (``site_total``), exactly.

A transcoder (``L6.mlp_in`` → ``L6.mlp_out``) is tapped at its output site: its latents are
computed from its input, and its error is the output minus ``decode(f)`` (the affine skip path
included), so the same identity holds there, with ``g`` the gradient at the output site.

Edges join each SAE to the next one in forward order (one SAE per site). For an upstream node u
and a downstream latent d with pre-activation ``z_d``:

- ``direct = u · ∂z_d/∂u``: the first-order change of ``z_d`` when u is removed, exact when the
  path between the two sites is linear (e.g. ``L3.resid_post`` → ``L4.resid_pre``);
- ``weight = direct · ∂m/∂f_d``: the part of u's attribution that flows through d. Edges into a
  downstream error node are ``u · ∂(ε·g)/∂u``. When every path from u to the target crosses the
  next SAE's site (resid_post SAEs at consecutive layers), u's outgoing weights over all nodes of
  the next SAE (latents and errors) sum to u's attribution.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmscope.errors import InterventionError
from lmscope.intervene.generate import encode_prompt
from lmscope.intervene.hooks import validate_sae
from lmscope.model import KINDS, LoadedModel, SiteModel
from lmscope.model.sites import ReplaceFn, Site
from lmscope.sae import SAE, check_compatible

Target = str | tuple[str, str]


@dataclass
class AttributionGraph:
    """Nodes (latents and error terms, by position), edges between consecutive SAEs, and totals."""

    prompt: str
    tokens: list[str]
    target: dict[str, Any]  # {"tokens": [...], "ids": [...], "value": m}
    saes: list[dict[str, Any]]  # per SAE: site, width, latent/error/bias/site totals
    nodes: list[dict[str, Any]] = field(default_factory=list)
    edges: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"format": "lmscope.attribution", "version": 1, **asdict(self)}

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return p

    @classmethod
    def load(cls, path: str | Path) -> AttributionGraph:
        d = json.loads(Path(path).read_text())
        if d.get("format") != "lmscope.attribution":
            raise InterventionError(f"{path} is not an lmscope attribution graph")
        return cls(d["prompt"], d["tokens"], d["target"], d["saes"], d["nodes"], d["edges"])

    def top_nodes(self, n: int = 10, *, kind: str | None = None) -> list[dict[str, Any]]:
        """The ``n`` nodes of largest |attribution| (``kind``: "latent" or "error" only)."""
        nodes = [x for x in self.nodes if kind is None or x["kind"] == kind]
        return sorted(nodes, key=lambda x: -abs(x["attribution"]))[:n]

    def top_edges(self, n: int = 10) -> list[dict[str, Any]]:
        """The ``n`` edges of largest |weight|."""
        return sorted(self.edges, key=lambda e: -abs(e["weight"]))[:n]

    def summary(self, n: int = 10) -> str:
        """A printable report: the target, per-SAE totals, the top nodes and edges."""
        tgt = " − ".join(repr(t) for t in self.target["tokens"])
        lines = [f"target {tgt} = {self.target['value']:.4g} after {self.prompt!r}", "",
                 f"{'site':<16}{'latents':>10}{'error':>10}{'bias':>10}{'g·x':>10}"]  # fmt: skip
        for s in self.saes:
            lines.append(f"{s['site']:<16}{s['latent_total']:>10.3g}{s['error_total']:>10.3g}"
                         f"{s['bias_total']:>10.3g}{s['site_total']:>10.3g}")  # fmt: skip
        lines += ["", f"top {n} nodes (attribution, activation, position token):"]
        for x in self.top_nodes(n):
            lines.append(f"  {x['id']:<28}{x['attribution']:>+10.4g}{x['activation']:>10.3g}"
                         f"  @{x['position']} {x['token']!r}")  # fmt: skip
        lines += ["", f"top {n} edges (weight, direct):"]
        for e in self.top_edges(n):
            direct = "" if e["direct"] is None else f"{e['direct']:>10.3g}"
            lines.append(f"  {e['source']:<28} → {e['target']:<28}{e['weight']:>+10.4g}{direct}")
        return "\n".join(lines)


def target_ids(loaded: LoadedModel, target: Target) -> tuple[list[str], list[int]]:
    """The target's one-token strings and ids; a string that is not exactly one token is an error."""
    texts = [target] if isinstance(target, str) else list(target)
    if len(texts) not in (1, 2):
        raise InterventionError(
            "a target is one token string, or a pair (a, b) for the logit difference a − b"
        )
    ids = []
    for text in texts:
        pieces = loaded.tokenizer(text, add_special_tokens=False).input_ids
        if len(pieces) != 1:
            shown = [loaded.tokenizer.decode([i]) for i in pieces]
            raise InterventionError(
                f"target {text!r} is {len(pieces)} tokens {shown}, not one; "
                + (f"choose one of them, e.g. {shown[0]!r}" if shown else "give a non-empty token")
            )
        ids.append(int(pieces[0]))
    return texts, ids


class _Tap:
    """A site replacement that keeps the value but exposes latents and error as gradient leaves.

    A transcoder's tap sits at its output site; ``record`` (an identity replacement at its input
    site, earlier in the same pass) keeps the input it encodes, live. Its error is everything the
    latents and ``b_dec`` leave of the output, the affine skip path included.
    """

    def __init__(self, sae: SAE):
        self.sae = sae
        self.x_in: Tensor | None = None

    def record(self, x: Tensor) -> Tensor:
        self.x_in = x
        return x

    def __call__(self, x: Tensor) -> Tensor:
        sae, w = self.sae, self.sae.W_dec
        xs = x.to(w.dtype)
        src = xs if self.x_in is None else self.x_in.to(w.dtype)
        self.z = sae.pre_acts(src)  # live: edges differentiate these w.r.t. upstream taps
        f_live = sae.encode(src)
        self.err_live = xs - sae.decode(f_live)
        self.x = xs.detach()
        self.f = f_live.detach().requires_grad_()
        self.err = self.err_live.detach().requires_grad_()
        # adds exact zeros: same value, but ∂/∂f = W_dec and ∂/∂ε = I reach the rest of the model
        return (xs + (self.f - self.f.detach()) @ w + (self.err - self.err.detach())).to(x.dtype)


def _validate(sites: SiteModel, sae: SAE) -> str:
    """Where the SAE's tap sits: its site, or a transcoder's output site (both widths checked)."""
    if not sae.cfg.is_transcoder:
        return validate_sae(sites, sae)
    if not sae.cfg.site or not sae.cfg.out_site:
        raise InterventionError("the transcoder's config names no site/out_site, e.g. L6.mlp_in → L6.mlp_out")  # fmt: skip
    site, out = str(sites.site(sae.cfg.site)), str(sites.site(sae.cfg.out_site))
    check_compatible(sae, site, sites.site_dim(site), out_d=sites.site_dim(out))
    return out


def _order(sites: SiteModel, saes: Sequence[SAE]) -> list[tuple[str, SAE]]:
    named = [(_validate(sites, s), s) for s in saes]
    seen: dict[str, int] = {}
    for site, sae in named:
        seen[site] = seen.get(site, 0) + 1
        if sae.cfg.is_transcoder:  # its input site is replaced too (to record the input)
            inp = str(sites.site(sae.cfg.site))
            seen[inp] = seen.get(inp, 0) + 1
    twice = [s for s, n in seen.items() if n > 1]
    if twice:
        raise InterventionError(f"attribute takes one SAE per site; several at {', '.join(twice)}")
    if not named:
        raise InterventionError("attribute needs at least one SAE")

    def key(item: tuple[str, SAE]) -> tuple[int, int]:
        s = sites.site(item[0])
        return s.layer, KINDS.index(s.kind)

    return sorted(named, key=key)


def attribute(
    loaded: LoadedModel,
    prompt: str,
    saes: Sequence[SAE],
    target: Target,
    *,
    top: int = 50,
    max_edges: int | None = 1000,
) -> AttributionGraph:
    """The attribution graph of ``target`` after ``prompt`` over every active latent of ``saes``.

    Keeps the ``top`` latent nodes of largest |attribution| and every error node (ordinary
    positions), and the ``max_edges`` largest edges among them (None: all, 0: none). Costs one
    forward and backward pass, plus one short backward pass per kept node past the first SAE.

    >>> attribute(loaded, "The capital of France is", saes, (" Paris", " London"), top=20)
    """
    sites = SiteModel(loaded)
    ordered = _order(sites, saes)
    texts, tids = target_ids(loaded, target)
    ids = encode_prompt(loaded, prompt)
    taps = {site: _Tap(sae) for site, sae in ordered}
    with torch.enable_grad(), torch.inference_mode(False):
        replace: dict[str | Site, ReplaceFn] = {s: t for s, t in taps.items()}
        for t in taps.values():
            if t.sae.cfg.is_transcoder:
                replace[str(sites.site(t.sae.cfg.site))] = t.record
        logits = sites.run(ids, replace=replace).logits
        assert logits is not None
        last = logits[0, -1].float()
        m = last[tids[0]] - (last[tids[1]] if len(tids) == 2 else 0.0)
        leaves = [t.f for t in taps.values()] + [t.err for t in taps.values()]
        grads = torch.autograd.grad(m, leaves, retain_graph=max_edges != 0)
        n = len(taps)
        g_f = dict(zip(taps, (g[0] for g in grads[:n])))
        g_e = dict(zip(taps, (g[0] for g in grads[n:])))
        tok = loaded.tokenizer
        special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id} - {None}
        ordinary = [int(i) not in special for i in ids[0].tolist()]
        tokens = [str(tok.decode([i])) for i in ids[0].tolist()]
        totals, nodes = [], []
        for site, sae in ordered:
            totals.append(_totals(site, sae, taps[site], g_f[site], g_e[site], ordinary))
            nodes += _nodes(site, taps[site], g_f[site], g_e[site], ordinary, tokens)
        latents = sorted((x for x in nodes if x["kind"] == "latent"), key=lambda x: -abs(x["attribution"]))  # fmt: skip
        kept = latents[:top] + [x for x in nodes if x["kind"] == "error"]
        edges = _edges(ordered, taps, g_f, g_e, kept) if max_edges != 0 else []
    edges.sort(key=lambda e: -abs(e["weight"]))
    if max_edges is not None:
        edges = edges[:max_edges]
    kept.sort(key=lambda x: (x["layer"], x["position"], -abs(x["attribution"])))
    target_info = {"tokens": texts, "ids": tids, "value": float(m.detach())}
    return AttributionGraph(prompt, tokens, target_info, totals, kept, edges)


def _totals(site: str, sae: SAE, tap: _Tap, gf: Tensor, ge: Tensor, ordinary: list[bool]) -> dict[str, Any]:  # fmt: skip
    keep = torch.tensor(ordinary, device=gf.device)
    f, err, x = tap.f.detach()[0][keep], tap.err.detach()[0][keep], tap.x[0][keep]
    gf, ge = gf[keep], ge[keep]
    return {
        "site": site,
        "d_sae": sae.cfg.d_sae,
        "latent_total": float((f * gf).sum()),
        "error_total": float((err * ge).sum()),
        "bias_total": float((sae.b_dec.detach() * ge).sum()),
        "site_total": float((x * ge).sum()),
        "active": int((f != 0).sum()),
    }


def _node_id(site: str, position: int, latent: int | None) -> str:
    return f"{site}@{position}:{'error' if latent is None else latent}"


def _nodes(site: str, tap: _Tap, gf: Tensor, ge: Tensor, ordinary: list[bool], tokens: list[str]) -> list[dict[str, Any]]:  # fmt: skip
    f, err = tap.f.detach()[0], tap.err.detach()[0]
    attr = (f * gf).cpu()
    err_attr = (err * ge).sum(-1).cpu()
    err_norm = err.norm(dim=-1).cpu()
    layer = int(site.split(".")[0][1:])
    out = []
    for p, i in (f != 0).nonzero().tolist():
        if ordinary[p]:
            out.append({"id": _node_id(site, p, i), "kind": "latent", "site": site, "layer": layer,
                        "position": p, "token": tokens[p], "latent": i,
                        "activation": float(f[p, i]), "attribution": float(attr[p, i])})  # fmt: skip
    for p, ok in enumerate(ordinary):
        if ok:
            out.append({"id": _node_id(site, p, None), "kind": "error", "site": site, "layer": layer,
                        "position": p, "token": tokens[p], "latent": None,
                        "activation": float(err_norm[p]), "attribution": float(err_attr[p])})  # fmt: skip
    return out


def _edges(
    ordered: list[tuple[str, SAE]],
    taps: dict[str, _Tap],
    g_f: dict[str, Tensor],
    g_e: dict[str, Tensor],
    kept: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    by_site: dict[str, list[dict[str, Any]]] = {}
    for x in kept:
        by_site.setdefault(x["site"], []).append(x)
    edges = []
    for (up, _), (down, _) in zip(ordered, ordered[1:]):
        sources = by_site.get(up, [])
        if not sources:
            continue
        tu, td = taps[up], taps[down]
        f_up, err_up = tu.f.detach()[0], tu.err.detach()[0]
        for d in by_site.get(down, []):
            p = d["position"]
            if d["kind"] == "latent":
                scalar, factor = td.z[0, p, d["latent"]], float(g_f[down][p, d["latent"]])
            else:
                scalar, factor = (td.err_live[0, p] * g_e[down][p]).sum(), 1.0
            gf_up, ge_up = torch.autograd.grad(scalar, [tu.f, tu.err], retain_graph=True, allow_unused=True)  # fmt: skip
            for u in sources:
                q = u["position"]
                if q > p:
                    continue  # causal: a later token cannot affect an earlier one
                if u["kind"] == "latent":
                    g = 0.0 if gf_up is None else float(gf_up[0, q, u["latent"]])
                    direct = float(f_up[q, u["latent"]]) * g
                else:
                    direct = 0.0 if ge_up is None else float((err_up[q] * ge_up[0, q]).sum())
                weight = direct * factor
                if weight != 0.0:
                    edges.append({"source": u["id"], "target": d["id"], "weight": weight,
                                  "direct": direct if d["kind"] == "latent" else None})  # fmt: skip
    return edges


__all__ = ["AttributionGraph", "attribute", "target_ids"]
