"""Evaluate many SAEs of one model on the same held-out tokens, each token block run once clean.

Per token block: one clean forward reads every site the SAEs need and the final residual stream;
then each SAE is spliced in by running only the layers from its site on (`SiteModel.run_from`,
fed the cached clean stream), and each site is zero-ablated the same way once, however many SAEs
share it. The logits are unembedded only at the loss positions, a chunk at a time.

`fast=False` is the plain reference the tests hold the fast path equal to: a full forward of the
model with a replacement hook per SAE (and per zero ablation), logits from the model itself.

>>> results = evaluate_saes(loaded, {"L6": sae}, eval_blocks(loaded, EvalConfig(tokens=4096)))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lmscope.activations.harvest import read_sites
from lmscope.data import TokenBatches, TokenBlock
from lmscope.errors import ConfigError, CorpusError, SAEError
from lmscope.evals.metrics import (
    DENSE_THRESHOLD,
    LossStats,
    ReconStats,
    clean_reference,
    next_token_losses,
    spliced_losses,
    summarise,
)
from lmscope.model import LoadedModel, Site, SiteModel
from lmscope.model.sites import ReplaceFn
from lmscope.sae import SAE
from lmscope.sae.base import check_compatible


@dataclass
class EvalConfig:
    """Which held-out tokens to evaluate on, and how."""

    corpus: str | None = None  # None: the suite's corpus (else "default")
    seq_len: int | None = None  # None: the suite's (else 128)
    tokens: int = 8192  # eval tokens (BOS, EOS and pad not counted)
    # > tokens: L0, FVU, dead/dense and frequencies also cover the next (recon_tokens − tokens)
    # eval tokens. Those cost one clean forward per block and no splice or unembedding (the
    # 262k-token unembedding is most of an SAE's eval on Gemma), and "dead" needs many tokens.
    recon_tokens: int = 0
    batch_size: int = 4  # sequences per forward pass (memory: 2 × rows × vocab float32 per block)
    seed: int = 0
    eval_fraction: float = 0.05  # as in TokenBatches: the same documents as training left out
    dense_threshold: float = DENSE_THRESHOLD
    fast: bool = True  # False: the full-forward reference
    progress: bool = True  # a bar over (block, SAE) splices, with tokens/s

    def __post_init__(self) -> None:
        # a non-positive count evaluates nothing and writes NaN metrics; refuse it up front
        for name, low in (("tokens", 1), ("batch_size", 1), ("recon_tokens", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ConfigError(f"eval {name} must be an integer >= {low}, got {v!r}")
        if self.seq_len is not None and (not isinstance(self.seq_len, int) or self.seq_len < 2):
            raise ConfigError(f"eval seq_len must be an integer >= 2, got {self.seq_len!r}")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")

    def with_defaults(self, corpus: str, seq_len: int) -> EvalConfig:
        """This config with `corpus` and `seq_len` filled in where unset."""
        return replace(self, corpus=self.corpus or corpus, seq_len=self.seq_len or seq_len)


@dataclass
class EvalResult:
    """One SAE's eval: `scalars` go into the suite manifest, `arrays` (histograms, by position)
    only into its eval.json."""

    name: str
    site: str
    scalars: dict[str, float]
    arrays: dict[str, Any] = field(repr=False)


def eval_blocks(loaded: LoadedModel, cfg: EvalConfig) -> list[TokenBlock]:
    """The eval split's first `max(cfg.tokens, cfg.recon_tokens)` tokens, as token blocks (an
    empty split is a CorpusError)."""
    cfg = cfg.with_defaults("default", 128)
    assert cfg.corpus is not None and cfg.seq_len is not None
    blocks = list(
        TokenBatches(
            cfg.corpus,
            loaded.tokenizer,
            seq_len=cfg.seq_len,
            batch_size=cfg.batch_size,
            split="eval",
            seed=cfg.seed,
            eval_fraction=cfg.eval_fraction,
            max_tokens=max(cfg.tokens, cfg.recon_tokens),
        )
    )
    if not sum(b.n_tokens for b in blocks):
        raise CorpusError(
            f"the eval split of {cfg.corpus} has no tokens but BOS/EOS/pad; give a larger corpus"
        )
    return blocks


@dataclass
class _Plan:
    """One SAE ready to splice: its folded module, input and output sites, and its running sums."""

    name: str
    sae: SAE
    site: Site
    out: Site
    recon: ReconStats
    loss: LossStats


def _plan(sm: SiteModel, name: str, sae: SAE, seq_len: int) -> _Plan:
    cfg = sae.cfg
    if cfg.model and cfg.model != sm.loaded.name:
        raise SAEError(
            f"SAE {name} was trained on model {cfg.model!r}, not {sm.loaded.name!r}; evaluate it with --model {cfg.model}"
        )
    if not cfg.site:
        raise SAEError(f"SAE {name} names no site in its config; set 'site', e.g. L6.resid_post")
    site = sm.site(cfg.site)
    out = sm.site(cfg.out_site) if cfg.out_site else site
    check_compatible(sae, str(site), sm.site_dim(site), out_d=sm.site_dim(out))
    folded = sae if cfg.is_folded else sae.folded()
    folded = folded.to(device=sm.loaded.device).eval()
    return _Plan(
        name, folded, site, out, ReconStats(cfg.out_dim, cfg.d_sae, seq_len), LossStats(seq_len)
    )


def _reconstruct(sae: SAE, x_in: Tensor) -> tuple[Tensor, Tensor]:
    """(latents, reconstruction) of an SAE on raw activations; a transcoder's skip path included."""
    x = x_in.to(sae.W_enc.dtype)
    f = sae.encode(x)
    x_hat = sae.decode(f)
    skip = getattr(sae, "skip_out", None)
    extra = skip(x) if skip is not None else None
    return f, x_hat if extra is None else x_hat + extra


def checked_blocks(blocks: Iterable[TokenBlock]) -> tuple[list[TokenBlock], int]:
    """The eval blocks as a list, and their longest sequence; no tokens at all is an error."""
    out = list(blocks)
    if not sum(b.n_tokens for b in out):
        raise CorpusError("no eval tokens to evaluate on (only BOS/EOS/pad, or no blocks at all)")
    return out, max(b.input_ids.shape[1] for b in out)


def evaluate_saes(
    loaded: LoadedModel,
    saes: Mapping[str, SAE],
    blocks: Iterable[TokenBlock],
    cfg: EvalConfig | None = None,
) -> dict[str, EvalResult]:
    """Evaluate every SAE on the same token blocks; results keyed like `saes`."""
    cfg = cfg or EvalConfig()
    sm = SiteModel(loaded)
    blocks, seq_len = checked_blocks(blocks)
    plans = [_plan(sm, name, sae, seq_len) for name, sae in saes.items()]
    n_tokens = sum(b.n_tokens for b in blocks)
    recon_only = _recon_only(blocks, cfg)
    costs = [block_cost(sm, plans, b, r, cfg.fast) for b, r in zip(blocks, recon_only)]
    # The bar counts estimated work, not splices: the loss blocks carry every splice and
    # unembedding, and counting them like recon-only blocks made the ETA 8× too long.
    bar = tqdm(total=round(sum(costs), 3), desc=f"eval {len(plans)} SAEs on {n_tokens:,} tokens",
               disable=not cfg.progress, dynamic_ncols=True, unit="work",
               bar_format="{l_bar}{bar}| {percentage:3.0f}% [{elapsed}<{remaining}]")  # fmt: skip
    with torch.inference_mode(), bar:
        for block, recon, cost in zip(blocks, recon_only, costs):
            if recon:  # past the loss tokens
                _recon_block(sm, plans, block)
                bar.update(cost)
            else:
                tick = _ticker(bar, cost / len(plans))
                (_fast_block if cfg.fast else _reference_block)(sm, plans, block, tick)
    results = {}
    for p in plans:
        scalars, arrays = summarise(p.recon, p.loss, dense_threshold=cfg.dense_threshold)
        results[p.name] = EvalResult(p.name, str(p.site), scalars, arrays)
    return results


def _ticker(bar: Any, per_splice: float) -> Callable[[int], Any]:
    return lambda n: bar.update(n * per_splice)


def _recon_only(blocks: list[TokenBlock], cfg: EvalConfig) -> list[bool]:
    """Per block: True once the loss tokens are covered (reconstruction statistics only)."""
    out, seen = [], 0
    for b in blocks:
        out.append(seen >= cfg.tokens and cfg.recon_tokens > cfg.tokens)
        seen += b.n_tokens
    return out


def block_cost(sm: SiteModel, plans: list[_Plan], block: TokenBlock, recon_only: bool,
               fast: bool = True) -> float:  # fmt: skip
    """Estimated multiply-adds (in units of 10⁹) to evaluate `plans` on `block`: layers run × the
    tokens through them × a layer's weights, the unembedding (vocab × d per loss row) and each
    SAE's encoder and decoder at every position."""
    params = sum(p.numel() for p in sm.model.parameters())
    vocab_d = sm.unembedding.numel()
    layer = max(params - vocab_d, 0) / max(sm.n_layers, 1)  # an (approximate) layer's weights
    positions = block.input_ids.numel()
    saes = positions * sum(p.sae.W_enc.numel() + p.sae.W_dec.numel() for p in plans)
    if recon_only:
        deepest = max(max(p.site.layer, p.out.layer) for p in plans)
        return (positions * (deepest + 1) * layer + saes) / 1e9
    rows = int((block.mask[:, :-1] & block.mask[:, 1:]).sum())
    full = positions * sm.n_layers * layer
    if not fast:  # two full forwards with logits at every position per SAE
        return ((1 + 2 * len(plans)) * (full + positions * vocab_d) + saes) / 1e9

    def tail(out: Site) -> float:  # run from the output site's layer, then unembed the loss rows
        return positions * (sm.n_layers - out.layer) * layer + rows * vocab_d

    zero = sum(tail(out) for out in dict.fromkeys(p.out for p in plans))
    return (full + rows * vocab_d + zero + sum(tail(p.out) for p in plans) + saes) / 1e9


def _loss_rows(block: TokenBlock, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(batch index, position, next token) of every loss position: the token and the next are real."""
    mask = block.mask.to(device)
    b, t = torch.nonzero(mask[:, :-1] & mask[:, 1:], as_tuple=True)
    return b, t, block.input_ids.to(device)[b, t + 1]


def _record_recon(p: _Plan, acts: dict[str, Tensor], mask: Tensor) -> Tensor:
    """Reconstruct p's site from the clean acts, add to p's sums, return the spliced site value."""
    x_in, x = acts[str(p.site)], acts[str(p.out)]
    f, x_hat = _reconstruct(p.sae, x_in)
    x_hat = x_hat.to(x.dtype)
    pos = torch.nonzero(mask, as_tuple=True)[1]
    p.recon.update(x[mask], x_hat[mask], f[mask], pos)
    return torch.where(mask[..., None], x_hat, x)


def _needed(sm: SiteModel, plans: list[_Plan]) -> list[str]:
    last = sm.n_layers - 1
    reads = {f"L{last}.resid_post"}
    for p in plans:
        reads |= {str(p.site), str(p.out)}
        if p.out.kind not in ("resid_pre", "resid_post"):
            reads.add(f"L{p.out.layer}.resid_pre")
    return sorted(reads)


def _final_resid(sm: SiteModel, out: Site, value: Tensor, acts: dict[str, Tensor]) -> Tensor:
    """The last layer's resid_post [B, T, d] with `out` set to `value`, running only what follows it."""
    last = f"L{sm.n_layers - 1}.resid_post"
    replace: dict[str | Site, ReplaceFn] = {}
    if out.kind == "resid_pre":
        start, resid = out.layer, value
    elif out.kind == "resid_post":
        start, resid = out.layer + 1, value
    else:  # a site inside the layer: rerun the layer from its clean input
        start, resid = out.layer, acts[f"L{out.layer}.resid_pre"]
        replace[out] = lambda _x: value
    if start == sm.n_layers:
        return value
    return sm.run_from(start, resid, read=[last], replace=replace, return_logits=False).acts[last]


def _recon_block(sm: SiteModel, plans: list[_Plan], block: TokenBlock) -> None:
    """Reconstruction statistics only: one forward up to the deepest site, no splicing."""
    ids, mask = block.input_ids.to(sm.loaded.device), block.mask.to(sm.loaded.device)
    acts = read_sites(sm, ids, sorted({str(s) for p in plans for s in (p.site, p.out)}))
    for p in plans:
        _record_recon(p, acts, mask)


def _fast_block(sm: SiteModel, plans: list[_Plan], block: TokenBlock, done: Callable[[int], Any]) -> None:  # fmt: skip
    ids, mask = block.input_ids.to(sm.loaded.device), block.mask.to(sm.loaded.device)
    acts = sm.run(ids, read=_needed(sm, plans), return_logits=False).acts
    b, t, targets = _loss_rows(block, sm.loaded.device)
    last = f"L{sm.n_layers - 1}.resid_post"
    clean = clean_reference(sm.unembed, acts[last][b, t], targets)
    ce_zero: dict[Site, Tensor] = {}
    for out in dict.fromkeys(p.out for p in plans):
        zeroed = acts[str(out)].masked_fill(mask[..., None], 0.0)
        h = _final_resid(sm, out, zeroed, acts)
        ce_zero[out] = spliced_losses(sm.unembed, h[b, t], targets)[0]
    for p in plans:
        spliced = _record_recon(p, acts, mask)
        h = _final_resid(sm, p.out, spliced, acts)
        ce, kl = spliced_losses(sm.unembed, h[b, t], targets, clean)
        assert kl is not None
        p.loss.update(clean.ce, ce, kl, ce_zero[p.out], t)
        done(1)


def _reference_block(sm: SiteModel, plans: list[_Plan], block: TokenBlock, done: Callable[[int], Any]) -> None:  # fmt: skip
    ids, mask = block.input_ids.to(sm.loaded.device), block.mask.to(sm.loaded.device)
    b, t, targets = _loss_rows(block, sm.loaded.device)
    sites = sorted({str(s) for p in plans for s in (p.site, p.out)})
    clean = sm.run(ids, read=sites)
    assert clean.logits is not None
    logp_clean = torch.log_softmax(clean.logits[b, t].float(), -1)
    ce_clean = -logp_clean.gather(1, targets[:, None]).squeeze(1)
    for p in plans:
        _record_recon(p, clean.acts, mask)
        logits, zero = _reference_runs(sm, p, ids, mask[..., None])
        ce, kl = next_token_losses(logits[b, t], targets, logp_clean)
        assert kl is not None
        p.loss.update(ce_clean, ce, kl, next_token_losses(zero[b, t], targets)[0], t)
        done(1)


def _reference_runs(sm: SiteModel, p: _Plan, ids: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """Full-forward logits with p's reconstruction spliced in, and with its site zero-ablated."""
    seen: dict[str, Tensor] = {}

    def keep(x: Tensor) -> Tensor:  # a transcoder's input, read on the way to its output
        seen["in"] = x
        return x

    def splice(x: Tensor) -> Tensor:
        return torch.where(m, _reconstruct(p.sae, seen.get("in", x))[1].to(x.dtype), x)

    replace: dict[str | Site, ReplaceFn] = {p.out: splice}
    if p.site != p.out:
        replace = {p.site: keep, p.out: splice}
    logits = sm.run(ids, replace=replace).logits
    zero = sm.run(ids, replace={p.out: lambda x: x.masked_fill(m, 0.0)}).logits
    assert logits is not None and zero is not None
    return logits, zero
