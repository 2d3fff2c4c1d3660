"""Evaluate cross-layer transcoders and crosscoders: per-layer reconstruction, one spliced loss.

Reconstruction, per layer m of the SAE, on the clean activations of each block: L0 of layer m's
latents, FVU of output layer m (a CLT's sum over source layers s ≤ m, a crosscoder's over all its
layers, plus the decoder bias and any skip), dead and dense latents of layer m. The suite manifest
gets the totals (L0 summed over layers, FVU pooled over layers: Σ squared error / Σ centred sum of
squares, dead latents summed) and eval.json also the per-layer lists (``by_layer``).

Next-token loss (the definitions of ``lmscope.evals.metrics``), with the whole SAE spliced in:

- a CLT replaces *every* layer's ``mlp_out`` with its summed decoder outputs, its latents encoded
  from the live ``mlp_in`` of the spliced forward: the replacement model of the CLT, no error term;
  CE(zero) zero-ablates every layer's ``mlp_out``;
- a crosscoder replaces the residual stream at every layer it writes with its reconstruction from
  the clean activations (the last such layer decides the logits); CE(zero) zeroes those sites.

Both act only at eval tokens (BOS, EOS and pad keep their clean values).

>>> results = evaluate_multilayer(loaded, {"clt": clt}, eval_blocks(loaded, EvalConfig()))
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lmscope.data import TokenBlock
from lmscope.errors import SAEError
from lmscope.evals.evaluate import EvalConfig, EvalResult, _loss_rows, _recon_only, checked_blocks
from lmscope.evals.metrics import (
    LossStats,
    ReconStats,
    clean_reference,
    spliced_losses,
    summarise,
)
from lmscope.model import LoadedModel, Site, SiteModel
from lmscope.model.sites import ReplaceFn
from lmscope.sae.multilayer import MultiLayerSAE


@dataclass
class _Plan:
    name: str
    sae: MultiLayerSAE
    sites: list[Site]
    outs: list[Site]
    recon: list[ReconStats]  # one per layer of the SAE
    loss: LossStats


def _plan(sm: SiteModel, name: str, sae: MultiLayerSAE, seq_len: int) -> _Plan:
    if sae.model and sae.model != sm.loaded.name:
        raise SAEError(
            f"{name} was made for model {sae.model!r}, not {sm.loaded.name!r}; evaluate it with --model {sae.model}"
        )
    sites, outs = [sm.site(s) for s in sae.sites], [sm.site(s) for s in sae.out_sites]
    for s, o in zip(sites, outs):
        if (sm.site_dim(s), sm.site_dim(o)) != (sae.d_in, sae.d_out):
            raise SAEError(
                f"{name} is {sae.d_in}→{sae.d_out} at {s}→{o}; the model has "
                f"{sm.site_dim(s)}→{sm.site_dim(o)}"
            )
    moved = sae.to(sm.loaded.device)
    recon = [ReconStats(sae.d_out, sae.d_sae, seq_len) for _ in sites]
    return _Plan(name, moved, sites, outs, recon, LossStats(seq_len))


def _reconstruct(sae: MultiLayerSAE, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Latents [..., n, W] and each output layer's reconstruction [..., d_out] from inputs x
    [..., n, d_in] (the clean activations)."""
    f = sae.encode(x)
    ys = []
    for m in range(sae.n_layers):
        y = sae.decode_layer(f, m)
        skip = sae.skip_layer(x[..., m, :], m)
        ys.append(y if skip is None else y + skip)
    return f, ys


def _record(p: _Plan, acts: dict[str, Tensor], mask: Tensor) -> list[Tensor]:
    """Add one block's clean reconstruction to p's per-layer sums; return the reconstructions."""
    x = torch.stack([acts[str(s)] for s in p.sites], -2).to(p.sae.w_enc.dtype)
    f, ys = _reconstruct(p.sae, x)
    pos = torch.nonzero(mask, as_tuple=True)[1]
    for m, (y, out) in enumerate(zip(ys, p.outs)):
        target = acts[str(out)]
        p.recon[m].update(target[mask], y.to(target.dtype)[mask], f[..., m, :][mask], pos)
    return ys


def _clt_splice(p: _Plan, mask: Tensor) -> dict[str | Site, ReplaceFn]:
    """The CLT's replacement model: every mlp_out from latents of the live mlp_in."""
    live: dict[int, tuple[Tensor, Tensor]] = {}  # stacked layer → (input, latents)
    sae, m3 = p.sae, mask[..., None]

    def read(i: int) -> ReplaceFn:
        def fn(x: Tensor) -> Tensor:
            xf = x.to(sae.w_enc.dtype)
            live[i] = (xf, sae.encode_layer(xf, i))
            return x

        return fn

    def write(m: int) -> ReplaceFn:
        def fn(x: Tensor) -> Tensor:
            f = torch.stack([live[s][1] for s in sae.sources(m)], -2)
            y = sae.decode_layer(f, m)
            skip = sae.skip_layer(live[m][0], m)
            y = y if skip is None else y + skip
            return torch.where(m3, y.to(x.dtype), x)

        return fn

    replace: dict[str | Site, ReplaceFn] = {}
    for i, (s, o) in enumerate(zip(p.sites, p.outs)):
        replace[s] = read(i)
        replace[o] = write(i)
    return replace


def _set(value: Tensor, mask: Tensor) -> ReplaceFn:
    """Put ``value`` in place of the site at the eval tokens."""

    def fn(x: Tensor) -> Tensor:
        return torch.where(mask[..., None], value.to(x.dtype), x)

    return fn


def _final(sm: SiteModel, ids: Tensor, replace: dict[str | Site, ReplaceFn]) -> Tensor:
    last = f"L{sm.n_layers - 1}.resid_post"
    return sm.run(ids, read=[last], replace=replace, return_logits=False).acts[last]


def _loss_block(sm: SiteModel, plans: list[_Plan], block: TokenBlock) -> None:
    dev = sm.loaded.device
    ids, mask = block.input_ids.to(dev), block.mask.to(dev)
    last = f"L{sm.n_layers - 1}.resid_post"
    reads = {last} | {str(s) for p in plans for s in (*p.sites, *p.outs)}
    acts = sm.run(ids, read=sorted(reads), return_logits=False).acts
    b, t, targets = _loss_rows(block, dev)
    clean = clean_reference(sm.unembed, acts[last][b, t], targets)
    for p in plans:
        ys = _record(p, acts, mask)
        splice: dict[str | Site, ReplaceFn] = (
            _clt_splice(p, mask) if p.sae.causal else {o: _set(y, mask) for o, y in zip(p.outs, ys)}
        )
        zero: dict[str | Site, ReplaceFn] = {
            o: _set(torch.zeros_like(acts[str(o)]), mask) for o in p.outs
        }
        ce, kl = spliced_losses(sm.unembed, _final(sm, ids, splice)[b, t], targets, clean)
        ce_zero = spliced_losses(sm.unembed, _final(sm, ids, zero)[b, t], targets)[0]
        assert kl is not None
        p.loss.update(clean.ce, ce, kl, ce_zero, t)


def _recon_block(sm: SiteModel, plans: list[_Plan], block: TokenBlock) -> None:
    dev = sm.loaded.device
    ids, mask = block.input_ids.to(dev), block.mask.to(dev)
    reads = sorted({str(s) for p in plans for s in (*p.sites, *p.outs)})
    acts = sm.run(ids, read=reads, return_logits=False).acts
    for p in plans:
        _record(p, acts, mask)


def summarise_multilayer(
    p: _Plan, dense_threshold: float
) -> tuple[dict[str, float], dict[str, Any]]:
    """Totals for the manifest, per-layer lists and by-position curves for eval.json."""
    per = [summarise(r, p.loss, dense_threshold=dense_threshold) for r in p.recon]
    first = per[0][0]
    sse = sum(r.sse for r in p.recon)
    centred = sum(r.centred_ss() for r in p.recon)
    n_rows = sum(r.n for r in p.recon)
    n_latents = p.sae.d_sae * p.sae.n_layers
    dead = sum(int(s["dead"]) for s, _ in per)
    dense = sum(int(s["dense"]) for s, _ in per)
    fvu = sse / centred if centred else float("nan")
    scalars = {
        "tokens": first["tokens"],
        "loss_tokens": first["loss_tokens"],
        "l0": sum(s["l0"] for s, _ in per),
        "l0_per_layer": sum(s["l0"] for s, _ in per) / len(per),
        "fvu": fvu,
        "explained_variance": 1.0 - fvu,
        "mse": sse / n_rows if n_rows else float("nan"),
        "cos_sim": sum(s["cos_sim"] for s, _ in per) / len(per),
        **{k: first[k] for k in ("ce_clean", "ce_spliced", "ce_zero", "delta_lm_loss", "kl")},
        "ce_recovered": first["ce_recovered"],
        "dead": dead,
        "dead_frac": dead / n_latents,
        "dense": dense,
        "dense_frac": dense / n_latents,
        "n_layers": p.sae.n_layers,
    }
    pos_sse = torch.stack([r.pos_sse for r in p.recon]).sum(0)
    pos_var = torch.stack([r.pos_n.double() * (r.centred_ss() / max(r.n, 1)) for r in p.recon]).sum(
        0
    )
    by_position = dict(per[0][1]["by_position"])
    by_position["fvu"] = [v if math.isfinite(v) else None for v in (pos_sse / pos_var).tolist()]
    arrays = {
        "by_layer": {
            "layers": list(p.sae.layers),
            "sites": p.sae.sites,
            "out_sites": p.sae.out_sites,
            **{k: [s[k] for s, _ in per] for k in ("l0", "fvu", "cos_sim", "dead", "dense")},
        },
        "latent_frequency": [v for _, a in per for v in a["latent_frequency"]],
        "by_position": by_position,
    }
    return scalars, arrays


def evaluate_multilayer(
    loaded: LoadedModel,
    saes: Mapping[str, MultiLayerSAE],
    blocks: Iterable[TokenBlock],
    cfg: EvalConfig | None = None,
) -> dict[str, EvalResult]:
    """Evaluate every CLT / crosscoder on the same token blocks; results keyed like ``saes``."""
    cfg = cfg or EvalConfig()
    sm = SiteModel(loaded)
    blocks, seq_len = checked_blocks(blocks)
    plans = [_plan(sm, name, sae, seq_len) for name, sae in saes.items()]
    recon_only = _recon_only(blocks, cfg)
    bar = tqdm(
        total=len(blocks),
        desc=f"eval {len(plans)} multi-layer SAEs",
        disable=not cfg.progress,
        dynamic_ncols=True,
    )
    with torch.inference_mode(), bar:
        for block, recon in zip(blocks, recon_only):
            (_recon_block if recon else _loss_block)(sm, plans, block)
            bar.update(1)
    results = {}
    for p in plans:
        scalars, arrays = summarise_multilayer(p, cfg.dense_threshold)
        site = f"{p.sae.sites[0]}…{p.sae.out_sites[-1]}"
        results[p.name] = EvalResult(p.name, site, scalars, arrays)
    return results


__all__ = ["evaluate_multilayer", "summarise_multilayer"]
