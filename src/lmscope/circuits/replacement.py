"""The replacement model: the LM with every MLP replaced by its layer's transcoder plus an error term.

Sites (docs/architecture.md, "Sites"): a transcoder reads ``L<l>.mlp_in`` and writes
``L<l>.mlp_out``. For Gemma, ``mlp_in`` is the output of ``pre_feedforward_layernorm`` and
``mlp_out`` the output of ``post_feedforward_layernorm``: both Gemma MLP norms sit *inside* the
replaced block, so the only norm on a feature's path is the pre-MLP norm in front of ``mlp_in``,
which is frozen along with the attention norms and the final norm (``lmscope.circuits.frozen``).
For Llama-style models ``mlp_in`` is the output of ``post_attention_layernorm`` and ``mlp_out`` the
MLP's output.

On a prompt, with everything frozen, layer l's MLP output is

    mlp_out[l] = acts[l] @ W_dec + b_dec + skip(mlp_in[l]) + errors[l]

where ``acts[l]`` are the transcoder's latents on the clean ``mlp_in[l]`` (held fixed: the
replacement model's sources) and ``errors[l] = clean mlp_out[l] − transcoder(mlp_in[l])``, so the
replacement reproduces the model exactly on the prompt. Features are not read at BOS/EOS/pad
positions (transcoders never saw them in training): there the error carries the whole MLP output.

Sources of the linear model: the token embeddings (layer 0's ``resid_pre``), every active latent,
every error vector; biases are constants. ``Linearised.forward`` runs it for a batch of source
settings; ``lmscope.circuits.graph`` differentiates it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lmscope.circuits.frozen import Frozen
from lmscope.errors import CircuitError
from lmscope.model import LoadedModel, SiteModel
from lmscope.model.sites import ReplaceFn, Site
from lmscope.sae import SAE

if TYPE_CHECKING:
    from lmscope.suite import Suite

SUPPORTED = ("gemma3", "gemma2", "llama", "mistral", "qwen2", "qwen3")


def check_transcoders(sites: SiteModel, transcoders: Sequence[SAE]) -> list[SAE]:
    """One folded transcoder per layer, ``L<l>.mlp_in`` → ``L<l>.mlp_out``, in layer order."""
    if sites.loaded.arch not in SUPPORTED:
        raise CircuitError(
            f"attribution graphs support {', '.join(SUPPORTED)}; not {sites.loaded.arch!r}"
        )
    by_layer: dict[int, SAE] = {}
    for tc in transcoders:
        cfg = tc.cfg
        site = sites.site(cfg.site)
        out = sites.site(cfg.out_site) if cfg.out_site else None
        if not cfg.is_transcoder or site.kind != "mlp_in" or out != Site(site.layer, "mlp_out"):
            raise CircuitError(
                f"{cfg.architecture} at {cfg.site} → {cfg.out_site}: the replacement model needs "
                "transcoders reading L<l>.mlp_in and writing L<l>.mlp_out of the same layer"
            )
        if site.layer in by_layer:
            raise CircuitError(f"two transcoders at layer {site.layer}; give one per layer")
        if cfg.d_in != sites.d_model or cfg.out_dim != sites.d_model:
            raise CircuitError(
                f"transcoder at {cfg.site} is {cfg.d_in}→{cfg.out_dim}; the model's width is "
                f"{sites.d_model}"
            )
        by_layer[site.layer] = tc if cfg.is_folded else tc.folded()
    missing = [str(i) for i in range(sites.n_layers) if i not in by_layer]
    if missing:
        raise CircuitError(
            f"no transcoder at layers {', '.join(missing)}; the replacement model needs one at "
            f"every layer 0-{sites.n_layers - 1}"
        )
    return [by_layer[i] for i in range(sites.n_layers)]


@dataclass
class Clean:
    """The clean forward of one prompt (batch 1), and the replacement model's sources on it."""

    ids: Tensor  # [1, T]
    ordinary: Tensor  # [T] bool: positions where features may fire (not BOS/EOS/pad)
    embed: Tensor  # [1, T, d]: layer 0's resid_pre
    mlp_in: list[Tensor]  # per layer [1, T, d]
    acts: list[Tensor]  # per layer [1, T, W_l], zero at non-ordinary positions
    errors: list[Tensor]  # per layer [1, T, d]
    logits: Tensor  # [V] at the last position, as the model computes them


@dataclass
class Pass:
    """One linearised forward: every layer's ``mlp_in`` [B, T, d] and the final normed residual
    at the last position [B, d] (``logits = final @ W_U``, before any soft-cap)."""

    mlp_in: list[Tensor]
    final: Tensor


class Linearised:
    """The prompt's replacement model with attention and norms frozen (use ``linearise``)."""

    def __init__(self, loaded: LoadedModel, transcoders: list[SAE], frozen: Frozen) -> None:
        self.loaded = loaded
        self.sites = SiteModel(loaded)
        self.transcoders = transcoders
        self.frozen = frozen
        self.clean: Clean
        self.n_layers = self.sites.n_layers

    def record(self, ids: Tensor, ordinary: Tensor) -> Clean:
        """The clean pass: records patterns and norm scales, then encodes every layer's mlp_in."""
        n = self.n_layers
        reads = ["L0.resid_pre"] + [f"L{i}.{k}" for i in range(n) for k in ("mlp_in", "mlp_out")]
        with torch.no_grad():
            run = self.sites.run(ids, read=reads)
            assert run.logits is not None
            acts, errors = [], []
            keep = ordinary.to(run.acts["L0.resid_pre"].device)[None, :, None]
            for i, tc in enumerate(self.transcoders):
                x = run.acts[f"L{i}.mlp_in"].to(tc.W_dec.dtype)
                a = tc.encode(x) * keep
                acts.append(a)
                errors.append(run.acts[f"L{i}.mlp_out"] - self._mlp_out(i, a, x, None))
        self.frozen.replay()
        self.clean = Clean(
            ids=ids,
            ordinary=ordinary,
            embed=run.acts["L0.resid_pre"],
            mlp_in=[run.acts[f"L{i}.mlp_in"] for i in range(n)],
            acts=acts,
            errors=errors,
            logits=run.logits[0, -1].detach(),
        )
        return self.clean

    def _mlp_out(self, layer: int, acts: Tensor, mlp_in: Tensor, error: Tensor | None) -> Tensor:
        tc = self.transcoders[layer]
        out = tc.decode(acts)
        skip: Tensor | None = mlp_in @ tc.get_parameter("W_skip") if tc.cfg.skip else None
        out = out if skip is None else out + skip
        return out if error is None else out + error

    def forward(
        self,
        *,
        rows: int = 1,
        embed: Tensor | None = None,
        acts: Sequence[Tensor] | None = None,
        errors: Sequence[Tensor] | None = None,
        leaves: Sequence[Tensor] | None = None,
    ) -> Pass:
        """The linear model on ``rows`` copies of the prompt. Sources default to the clean ones and
        broadcast from batch 1; ``leaves`` (n_layers + 1 tensors [rows, T, d]) are added to the
        embedding and to each layer's mlp_out, so their gradients are the gradients there."""
        c = self.clean
        embed = c.embed if embed is None else embed
        acts = c.acts if acts is None else acts
        errors = c.errors if errors is None else errors
        ids = c.ids.expand(rows, -1)
        mlp_in: dict[int, Tensor] = {}

        def set_embed(x: Tensor) -> Tensor:
            e = embed.expand_as(x).to(x.dtype)
            return e if leaves is None else e + leaves[0]

        def read_in(i: int) -> ReplaceFn:
            def fn(x: Tensor) -> Tensor:
                mlp_in[i] = x
                return x

            return fn

        def write_out(i: int) -> ReplaceFn:
            def fn(x: Tensor) -> Tensor:
                xin = mlp_in[i].to(self.transcoders[i].W_dec.dtype)
                out = self._mlp_out(i, acts[i], xin, errors[i]).expand_as(x).to(x.dtype)
                return out if leaves is None else out + leaves[i + 1]

            return fn

        replace: dict[str | Site, ReplaceFn] = {"L0.resid_pre": set_embed}
        for i in range(self.n_layers):
            replace[f"L{i}.mlp_in"] = read_in(i)
            replace[f"L{i}.mlp_out"] = write_out(i)
        last = f"L{self.n_layers - 1}.resid_post"
        with _mlps_off(self.sites):
            run = self.sites.run(ids, read=[last], replace=replace, return_logits=False)
        final = self.sites.final_norm(run.acts[last])[:, -1]
        return Pass([mlp_in[i] for i in range(self.n_layers)], final)

    def logits(self, p: Pass) -> Tensor:
        """Logits [B, V] at the last position from a pass (the model's soft-cap applied)."""
        logits = p.final @ self.sites.unembedding
        cap = getattr(self.loaded.model.config.get_text_config(), "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap


@contextmanager
def _mlps_off(sites: SiteModel) -> Iterator[None]:
    """The real MLPs output zeros (their result is replaced anyway): no compute, no graph."""
    mlps: list[nn.Module] = [layer.get_submodule("mlp") for layer in sites.layers]
    saved = [m.__dict__.get("forward") for m in mlps]
    try:
        for m in mlps:
            m.forward = torch.zeros_like  # type: ignore[method-assign]
        yield
    finally:
        for m, fwd in zip(mlps, saved):
            if fwd is None:
                del m.forward
            else:
                m.forward = fwd


def ordinary_positions(loaded: LoadedModel, ids: Tensor) -> Tensor:
    """[T] bool: True except at BOS/EOS/pad, where transcoders never read in training."""
    tok = loaded.tokenizer
    special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id} - {None}
    return torch.tensor([int(i) not in special for i in ids[0].tolist()], device=ids.device)


@contextmanager
def linearise(loaded: LoadedModel, transcoders: Sequence[SAE], ids: Tensor) -> Iterator[Linearised]:
    """The replacement model of ``loaded`` on ``ids`` [1, T], frozen on its clean forward.

    >>> with linearise(loaded, transcoders, ids) as lin:
    ...     logits = lin.logits(lin.forward())  # equals the model's, to rounding
    """
    sites = SiteModel(loaded)
    tcs = check_transcoders(sites, transcoders)
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise CircuitError(f"linearise takes one prompt of ids [1, T], got {tuple(ids.shape)}")
    ids = ids.to(loaded.device)
    with Frozen(loaded.model) as frozen:
        lin = Linearised(loaded, tcs, frozen)
        lin.record(ids, ordinary_positions(loaded, ids))
        yield lin


def suite_transcoders(
    suite: Suite, keys: Sequence[str] | None = None, *, device: str | torch.device | None = None
) -> list[SAE]:
    """The suite's mlp_in → mlp_out transcoders, one per layer: by name or input site (``keys``),
    else each layer's canonical one (the first by width when none is marked canonical)."""
    entries = [e for e in suite.entries if e.get("out_site") and e["site"].endswith(".mlp_in")]
    if keys is None:
        canon = set(suite.manifest.get("canonical", {}).values())
        chosen: dict[str, str] = {}
        for e in entries:
            if e["site"] not in chosen or e["name"] in canon:
                chosen[e["site"]] = e["name"]
        keys = list(chosen.values())
        if not keys:
            raise CircuitError(
                f"suite {suite.path} has no mlp_in → mlp_out transcoders; train them with "
                "`lmscope train --arch jumprelu_transcoder --sites all.mlp_in --out-site mlp_out`"
            )
    names = []
    for key in keys:
        named = [e["name"] for e in entries if key in (e["name"], e["site"])]
        if not named:
            valid = ", ".join(e["name"] for e in entries) or "none"
            raise CircuitError(f"{key!r} is not a transcoder of suite {suite.path}; valid: {valid}")
        names.append(named[0])
    return [suite.load_sae(n, device=device) for n in names]


__all__ = [
    "SUPPORTED",
    "Clean",
    "Linearised",
    "Pass",
    "check_transcoders",
    "linearise",
    "suite_transcoders",
]
