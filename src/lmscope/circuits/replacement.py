"""The replacement model: the LM with every MLP replaced by transcoders plus an error term.

Sites (docs/architecture.md, "Sites"): a transcoder reads ``L<l>.mlp_in`` and writes
``L<l>.mlp_out``. For Gemma, ``mlp_in`` is the output of ``pre_feedforward_layernorm`` and
``mlp_out`` the output of ``post_feedforward_layernorm``: both Gemma MLP norms sit *inside* the
replaced block, so the only norm on a feature's path is the pre-MLP norm in front of ``mlp_in``,
which is frozen along with the attention norms and the final norm (``lmscope.circuits.frozen``).
For Llama-style models ``mlp_in`` is the output of ``post_attention_layernorm`` and ``mlp_out`` the
MLP's output.

The transcoders are one per layer, or one cross-layer transcoder (CLT, ``MultiLayerSAE``) whose
layer s encodes ``mlp_in[s]`` and decodes into the ``mlp_out`` of every layer l ≥ s. On a prompt,
with everything frozen, layer l's MLP output is

    per-layer:  mlp_out[l] = acts[l] @ W_dec + b_dec + skip(mlp_in[l]) + errors[l]
    CLT:        mlp_out[l] = Σ_{s ≤ l} acts[s] @ W_dec[s→l] + b_dec[l] + skip_l(mlp_in[l]) + errors[l]

where ``acts[s]`` are the latents on the clean ``mlp_in[s]`` (held fixed: the replacement model's
sources) and ``errors[l] = clean mlp_out[l] − (the rest of the right-hand side)``, so the
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
from lmscope.sae.multilayer import MultiLayerSAE

if TYPE_CHECKING:
    from lmscope.suite import Suite

SUPPORTED = ("gemma3", "gemma2", "llama", "mistral", "qwen2", "qwen3")
Transcoder = SAE | MultiLayerSAE  # a per-layer transcoder, or a CLT spanning every layer


def _check_arch(sites: SiteModel) -> None:
    if sites.loaded.arch not in SUPPORTED:
        raise CircuitError(
            f"attribution graphs support {', '.join(SUPPORTED)}; not {sites.loaded.arch!r}"
        )


def check_transcoders(sites: SiteModel, transcoders: Sequence[SAE]) -> list[SAE]:
    """One folded transcoder per layer, ``L<l>.mlp_in`` → ``L<l>.mlp_out``, in layer order."""
    _check_arch(sites)
    by_layer: dict[int, SAE] = {}
    for tc in transcoders:
        if isinstance(tc, MultiLayerSAE):
            raise CircuitError(
                "this takes per-layer transcoders; a cross-layer transcoder goes to linearise / "
                "build_graph alone"
            )
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


def check_clt(sites: SiteModel, clt: MultiLayerSAE) -> MultiLayerSAE:
    """A CLT spanning every layer of the model, ``L<l>.mlp_in`` → ``L<l>.mlp_out``, at its width."""
    _check_arch(sites)
    n = sites.n_layers
    if clt.kind != "clt":
        raise CircuitError(
            f"a {clt.kind} reads and writes the residual stream; the replacement model needs a "
            "cross-layer transcoder (mlp_in → mlp_out)"
        )
    if list(clt.layers) != list(range(n)):
        raise CircuitError(
            f"the CLT spans layers {list(clt.layers)}; the replacement model needs every layer "
            f"0-{n - 1} of the model"
        )
    if (clt.d_in, clt.d_out) != (sites.d_model, sites.d_model):
        raise CircuitError(
            f"the CLT is {clt.d_in}→{clt.d_out}; the model's width is {sites.d_model}"
        )
    return clt


class Coders:
    """What the replacement model asks of its transcoders, one per layer or one CLT."""

    def __init__(self, per_layer: list[SAE] | None = None, clt: MultiLayerSAE | None = None):
        self.per_layer = per_layer or []
        self.clt = clt
        self.n_layers = clt.n_layers if clt is not None else len(self.per_layer)

    @property
    def dtype(self) -> torch.dtype:
        return self.clt.w_enc.dtype if self.clt is not None else self.per_layer[0].W_dec.dtype

    @property
    def sites(self) -> list[str]:
        """Each layer's input site (what a graph records as its transcoders)."""
        if self.clt is not None:
            return self.clt.sites
        return [str(tc.cfg.site) for tc in self.per_layer]

    def W_enc(self, layer: int) -> Tensor:  # noqa: N802 (the weight's name)
        """[d, W]: layer ``layer``'s encoder (a latent's column is the direction it reads)."""
        return self.clt.w_enc[layer] if self.clt is not None else self.per_layer[layer].W_enc

    def encode(self, layer: int, x: Tensor) -> Tensor:
        if self.clt is not None:
            return self.clt.encode_layer(x, layer)
        return self.per_layer[layer].encode(x)

    def out(self, layer: int, acts: Sequence[Tensor], mlp_in: Tensor) -> Tensor:
        """Layer ``layer``'s MLP output without its error: decoded latents of ``acts`` (every
        layer's, at least up to ``layer``), decoder bias and skip path on ``mlp_in``."""
        if self.clt is not None:
            f = torch.stack([acts[s] for s in self.clt.sources(layer)], -2)
            out = self.clt.decode_layer(f, layer)
            skip = self.clt.skip_layer(mlp_in, layer)
        else:
            tc = self.per_layer[layer]
            out = tc.decode(acts[layer])
            skip = mlp_in @ tc.get_parameter("W_skip") if tc.cfg.skip else None
        return out if skip is None else out + skip

    def decoders(self, source: int) -> list[tuple[int, Tensor]]:
        """(layer l, W_dec[source → l] [W, d]) for every mlp_out that layer ``source``'s latents
        write into: their own layer's, and with a CLT every later layer's too."""
        if self.clt is not None:
            return [(la, self.clt.w_dec[source, :, la]) for la in range(source, self.n_layers)]
        return [(source, self.per_layer[source].W_dec)]


def replacement_coders(sites: SiteModel, transcoders: Sequence[Transcoder]) -> Coders:
    """The checked transcoders of a replacement model: one per layer, or a single CLT."""
    clts = [tc for tc in transcoders if isinstance(tc, MultiLayerSAE)]
    if clts:
        if len(transcoders) != 1:
            raise CircuitError(
                "a cross-layer transcoder replaces every MLP by itself; give it alone, without "
                f"other transcoders (got {len(transcoders)})"
            )
        return Coders(clt=check_clt(sites, clts[0]))
    per_layer = [tc for tc in transcoders if isinstance(tc, SAE)]
    return Coders(per_layer=check_transcoders(sites, per_layer))


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

    def __init__(self, loaded: LoadedModel, coders: Coders, frozen: Frozen) -> None:
        self.loaded = loaded
        self.sites = SiteModel(loaded)
        self.coders = coders
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
            for i in range(n):
                x = run.acts[f"L{i}.mlp_in"].to(self.coders.dtype)
                acts.append(self.coders.encode(i, x) * keep)
                errors.append(run.acts[f"L{i}.mlp_out"] - self.coders.out(i, acts, x))
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
                xin = mlp_in[i].to(self.coders.dtype)
                out = (self.coders.out(i, acts, xin) + errors[i]).expand_as(x).to(x.dtype)
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
def linearise(
    loaded: LoadedModel, transcoders: Sequence[Transcoder], ids: Tensor
) -> Iterator[Linearised]:
    """The replacement model of ``loaded`` on ``ids`` [1, T], frozen on its clean forward; the
    transcoders are one per layer or a single CLT.

    >>> with linearise(loaded, transcoders, ids) as lin:
    ...     logits = lin.logits(lin.forward())  # equals the model's, to rounding
    """
    sites = SiteModel(loaded)
    coders = replacement_coders(sites, transcoders)
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise CircuitError(f"linearise takes one prompt of ids [1, T], got {tuple(ids.shape)}")
    ids = ids.to(loaded.device)
    with Frozen(loaded.model) as frozen:
        lin = Linearised(loaded, coders, frozen)
        lin.record(ids, ordinary_positions(loaded, ids))
        yield lin


def suite_transcoders(
    suite: Suite, keys: Sequence[str] | None = None, *, device: str | torch.device | None = None
) -> list[Transcoder]:
    """The suite's mlp_in → mlp_out transcoders, one per layer: by name or input site (``keys``),
    else each layer's canonical one (the first by width when none is marked canonical); or a
    cross-layer transcoder of the suite (``[clt]``): named alone in ``keys``, or by default when
    the suite has no per-layer transcoders."""
    entries = [e for e in suite.entries if e.get("out_site") and e["site"].endswith(".mlp_in")]
    clts = [e["name"] for e in suite.multilayer_entries if e["multilayer"] == "clt"]
    named_clts = [k for k in keys or [] if k in clts]
    if named_clts:
        if len(keys or []) != 1:
            raise CircuitError(
                f"{named_clts[0]!r} is a cross-layer transcoder: it replaces every MLP by itself, "
                "so name it alone"
            )
        return [suite.load_multilayer(named_clts[0], device=device)]
    if keys is None:
        canon = set(suite.manifest.get("canonical", {}).values())
        chosen: dict[str, str] = {}
        for e in entries:
            if e["site"] not in chosen or e["name"] in canon:
                chosen[e["site"]] = e["name"]
        keys = list(chosen.values())
        if not keys and clts:
            return [suite.load_multilayer(clts[0], device=device)]
        if not keys:
            raise CircuitError(
                f"suite {suite.path} has no mlp_in → mlp_out transcoders; train them with "
                "`lmscope train --arch jumprelu_transcoder --sites all.mlp_in --out-site mlp_out`, "
                "or pull a cross-layer transcoder (`lmscope pull gemma-scope-2-270m-pt-clt`)"
            )
    names = []
    for key in keys:
        named = [e["name"] for e in entries if key in (e["name"], e["site"])]
        if not named:
            valid = ", ".join([e["name"] for e in entries] + clts) or "none"
            raise CircuitError(f"{key!r} is not a transcoder of suite {suite.path}; valid: {valid}")
        names.append(named[0])
    return [suite.load_sae(n, device=device) for n in names]


__all__ = [
    "SUPPORTED",
    "Clean",
    "Coders",
    "Linearised",
    "Pass",
    "Transcoder",
    "check_clt",
    "check_transcoders",
    "linearise",
    "replacement_coders",
    "suite_transcoders",
]
