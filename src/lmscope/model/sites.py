"""Sites: named places in a model (`L6.resid_post`) that one forward pass can read and replace.

Each architecture family maps the seven site kinds onto its transformers submodules; PyTorch forward
hooks and pre-hooks do the reading and replacing, and are always removed when the pass ends.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from lmscope.errors import ModelError, SiteError
from lmscope.model.loading import LoadedModel

KINDS = ("resid_pre", "attn_z", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_post")
_SITE = re.compile(r"^(?:L(\d+)(?:-(\d+))?|all)\.(\w+|\*)$")
_SPEC_HELP = (
    "expected L<layer>.<kind>, L<a>-<b>.<kind>, all.<kind> or L<layer>.*, e.g. L6.resid_post"
)

ReplaceFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Site:
    """One site: a layer (0-indexed) and a kind from `KINDS`. `str(Site(6, "resid_post")) == "L6.resid_post"`."""

    layer: int
    kind: str

    def __str__(self) -> str:
        return f"L{self.layer}.{self.kind}"


def parse_sites(spec: str | Site | Iterable[str | Site], n_layers: int) -> list[Site]:
    """Parse a comma-separated site spec into sites in forward-pass order, without duplicates.

    >>> [str(s) for s in parse_sites("L0-1.resid_post,L0.attn_z", n_layers=18)]
    ['L0.attn_z', 'L0.resid_post', 'L1.resid_post']
    """
    items = spec.split(",") if isinstance(spec, str) else [spec] if isinstance(spec, Site) else spec
    sites: set[Site] = set()
    for item in items:
        sites.update(_parse_one(item, n_layers))
    return sorted(sites, key=lambda s: (s.layer, KINDS.index(s.kind)))


def _parse_one(item: str | Site, n_layers: int) -> list[Site]:
    if isinstance(item, Site):
        first, last, kinds = item.layer, item.layer, [item.kind]
    else:
        match = _SITE.match(item.strip())
        if match is None:
            raise SiteError(f"cannot parse site {item.strip()!r}; {_SPEC_HELP}")
        start, end, kind = match.groups()
        first = 0 if start is None else int(start)
        last = n_layers - 1 if start is None else int(end if end is not None else start)
        kinds = list(KINDS) if kind == "*" else [kind]
    for kind in kinds:
        if kind not in KINDS:
            raise SiteError(
                f"unknown site kind {kind!r} in {str(item)!r}; valid kinds: {', '.join(KINDS)}"
            )
    for layer in (first, last):
        if not 0 <= layer < n_layers:
            raise SiteError(
                f"layer {layer} in {str(item)!r} is out of range; this model has layers 0-{n_layers - 1}"
            )
    if first > last:
        raise SiteError(
            f"empty layer range in {str(item)!r}; write L<first>-<last> with first <= last"
        )
    return [Site(layer, kind) for layer in range(first, last + 1) for kind in kinds]


@dataclass(frozen=True)
class _Adapter:
    """Where each site lives, as submodule paths relative to a decoder layer."""

    o_proj: str  # its input is attn_z
    attn_out: str  # its (first) output is attn_out
    pre_mlp_norm: str  # its input is resid_mid, its output mlp_in
    mlp_out: str  # its output is mlp_out


_GEMMA = _Adapter(
    "self_attn.o_proj",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)
_LLAMA = _Adapter("self_attn.o_proj", "self_attn", "post_attention_layernorm", "mlp")
_GPT2 = _Adapter("attn.c_proj", "attn", "ln_2", "mlp")
# Llama-style covers every pre-norm model whose layer is input_layernorm → self_attn(o_proj) →
# post_attention_layernorm (the pre-MLP norm, despite its name) → mlp.
ADAPTERS: dict[str, _Adapter] = {
    "gemma3": _GEMMA,
    "gemma2": _GEMMA,
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma"), _LLAMA),
    "gpt2": _GPT2,
}
# Where the decoder layers and the final norm sit under the *ForCausalLM model, first match wins.
_BODIES = ("model.language_model", "model", "transformer")


def decoder_body(model: nn.Module) -> nn.Module:
    """The module that holds the decoder layers and the final norm (e.g. `model.model`)."""
    for path in _BODIES:
        try:
            body = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(getattr(body, "layers", getattr(body, "h", None)), nn.ModuleList):
            return body
    raise ModelError(
        f"cannot find the decoder layers of {type(model).__name__}; looked under {_BODIES}"
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers, in order."""
    body = decoder_body(model)
    layers = body.layers if hasattr(body, "layers") else body.h
    assert isinstance(layers, nn.ModuleList)
    return layers


@dataclass
class RunResult:
    """What `SiteModel.run` returns: the read activations by site name, and the logits if asked for."""

    acts: dict[str, Tensor]
    logits: Tensor | None


class _Stop(Exception):
    """Raised from the last needed layer's hook to skip the rest of the forward pass."""


class SiteModel:
    """Read and replace sites in one forward pass of a loaded model.

    >>> result = SiteModel(loaded).run(ids, read=["L2.resid_post"], return_logits=False)
    """

    def __init__(self, loaded: LoadedModel) -> None:
        if loaded.arch not in ADAPTERS:
            raise ModelError(
                f"no site adapter for architecture {loaded.arch!r}; supported: {', '.join(ADAPTERS)}"
            )
        self.loaded = loaded
        self.model = loaded.model
        self.adapter = ADAPTERS[loaded.arch]
        self.layers = decoder_layers(self.model)
        self.n_layers = len(self.layers)
        self.d_model = int(self.model.config.get_text_config().hidden_size)

    @property
    def final_norm(self) -> nn.Module:
        """The norm applied to the last residual stream before the unembedding."""
        body = decoder_body(self.model)
        return cast(nn.Module, body.norm if hasattr(body, "norm") else body.ln_f)

    @property
    def unembedding(self) -> Tensor:
        """The unembedding matrix W_U, [d_model, vocab]: `logits = final_norm(resid) @ W_U`."""
        return self.model.get_output_embeddings().weight.T

    def unembed(self, resid: Tensor) -> Tensor:
        """Logits from a residual stream [..., d_model], as the model computes them (logit lens)."""
        logits = self.model.get_output_embeddings()(self.final_norm(resid))
        cap = getattr(self.model.config.get_text_config(), "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def site(self, site: str | Site) -> Site:
        """One site, validated against this model."""
        sites = parse_sites([site], self.n_layers)
        if len(sites) != 1:
            raise SiteError(
                f"{str(site)!r} names {len(sites)} sites; name exactly one, e.g. L6.resid_post"
            )
        return sites[0]

    def site_dim(self, site: str | Site) -> int:
        """The width of a site's vectors: n_heads·d_head for attn_z, d_model for the others."""
        site = self.site(site)
        if site.kind != "attn_z":
            return self.d_model
        o_proj = self.layers[site.layer].get_submodule(self.adapter.o_proj)
        # GPT-2's Conv1D stores its weight as [in, out], nn.Linear as [out, in].
        weight = cast(Tensor, o_proj.weight)
        return int(weight.shape[0] if isinstance(o_proj, Conv1D) else weight.shape[1])

    def run(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        read: Iterable[str | Site] = (),
        replace: Mapping[str | Site, ReplaceFn] | None = None,
        stop_after_layer: int | None = None,
        return_logits: bool = True,
    ) -> RunResult:
        """One forward pass that records the `read` sites and applies the `replace` functions.

        A read gives the site's value before any replacement at that site. Without logits, the pass
        stops after the last layer read (or `stop_after_layer`). Gradients follow torch's mode: wrap
        the call in `torch.no_grad()` or `torch.inference_mode()` when none are needed.
        """
        inputs = {"input_ids": input_ids.to(self.loaded.device)}
        return self._run(inputs, attention_mask, read, replace, stop_after_layer, return_logits)

    def run_from(
        self,
        layer: int,
        resid_pre: Tensor,
        attention_mask: Tensor | None = None,
        *,
        read: Iterable[str | Site] = (),
        replace: Mapping[str | Site, ReplaceFn] | None = None,
        return_logits: bool = True,
    ) -> RunResult:
        """`run` from `layer` on, given that layer's input `resid_pre` [B, T, d] (for `layer ==
        n_layers`, the last resid_post): the layers below are skipped, not computed.

        Masks, positions and rotary embeddings come from the model's own forward as usual, so with
        `resid_pre` cached from a clean `run` this equals `run` on the same ids to rounding. Reads
        and replacements must be at layers >= `layer`.

        >>> pre = model.run(ids, read=["L6.resid_pre"], return_logits=False).acts["L6.resid_pre"]
        >>> logits = model.run_from(6, pre, replace={"L6.resid_post": sae}).logits
        """
        if not 0 <= layer <= self.n_layers:
            raise SiteError(f"run_from layer {layer} is out of range; valid: 0-{self.n_layers}")
        early = [str(s) for s in [*read, *(replace or {})] if self.site(s).layer < layer]
        if early:
            raise SiteError(f"sites {', '.join(early)} come before run_from layer {layer}")
        resid = resid_pre.to(self.loaded.device, self.loaded.dtype)
        # The model still runs whole, so that it builds masks and positions itself, but the layers
        # below `layer` pass their input through and the first module after them sees `resid`.
        skipped = list(self.layers[:layer])
        first = self.layers[layer] if layer < self.n_layers else self.final_norm
        saved = [m.__dict__.get("forward") for m in skipped]
        handle = first.register_forward_pre_hook(
            lambda _m, args, kwargs: _with_first(args, kwargs, resid),
            with_kwargs=True,
            prepend=True,
        )
        try:
            for m in skipped:
                m.forward = _passthrough
            inputs = {"inputs_embeds": resid}
            return self._run(inputs, attention_mask, read, replace, None, return_logits)
        finally:
            handle.remove()
            for m, fwd in zip(skipped, saved):
                if fwd is None:
                    del m.forward
                else:
                    m.forward = fwd

    def _run(
        self,
        inputs: dict[str, Tensor],
        attention_mask: Tensor | None,
        read: Iterable[str | Site],
        replace: Mapping[str | Site, ReplaceFn] | None,
        stop_after_layer: int | None,
        return_logits: bool,
    ) -> RunResult:
        reads = [self.site(s) for s in read]
        fns = {self.site(s): fn for s, fn in (replace or {}).items()}
        stop = self._stop_layer(reads, stop_after_layer, return_logits)
        if stop is None and not return_logits:
            return RunResult({}, None)
        acts: dict[str, Tensor] = {}
        handles = self._install(set(reads), fns, acts, stop)
        try:
            out = self.model(
                **inputs,
                attention_mask=None
                if attention_mask is None
                else attention_mask.to(self.loaded.device),
                use_cache=False,
            )
        except _Stop:
            return RunResult(acts, None)
        finally:
            for handle in handles:
                handle.remove()
        return RunResult(acts, out.logits if return_logits else None)

    def add_hooks(
        self, replace: Mapping[str | Site, ReplaceFn]
    ) -> list[torch.utils.hooks.RemovableHandle]:
        """Install `replace` functions that act on every later forward pass (HF `generate` too)
        until the caller removes the returned handles; `lmscope.intervene` builds on this.
        """
        fns = {self.site(s): fn for s, fn in replace.items()}
        return self._install(set(), fns, {}, None)

    def _stop_layer(
        self, reads: list[Site], stop_after_layer: int | None, return_logits: bool
    ) -> int | None:
        if stop_after_layer is None:
            return None if return_logits or not reads else max(s.layer for s in reads)
        if return_logits:
            raise SiteError(
                "stop_after_layer skips the unembedding; pass return_logits=False with it"
            )
        if not 0 <= stop_after_layer < self.n_layers:
            raise SiteError(
                f"stop_after_layer {stop_after_layer} is out of range; valid: 0-{self.n_layers - 1}"
            )
        late = [str(s) for s in reads if s.layer > stop_after_layer]
        if late:
            raise SiteError(
                f"sites {', '.join(late)} come after stop_after_layer={stop_after_layer}"
            )
        return stop_after_layer

    def _install(
        self,
        reads: set[Site],
        fns: dict[Site, ReplaceFn],
        acts: dict[str, Tensor],
        stop: int | None,
    ) -> list[torch.utils.hooks.RemovableHandle]:
        handles: list[torch.utils.hooks.RemovableHandle] = []
        try:
            layers = {s.layer for s in reads | fns.keys()} | ({stop} if stop is not None else set())
            for layer in sorted(layers):
                handles += self._install_layer(layer, reads, fns, acts, stop)
        except BaseException:
            for handle in handles:
                handle.remove()
            raise
        return handles

    def _install_layer(
        self,
        layer: int,
        reads: set[Site],
        fns: dict[Site, ReplaceFn],
        acts: dict[str, Tensor],
        stop: int | None,
    ) -> list[torch.utils.hooks.RemovableHandle]:
        block = self.layers[layer]
        wanted = {s.kind for s in reads | fns.keys() if s.layer == layer}
        handles: list[torch.utils.hooks.RemovableHandle] = []

        def visit(kind: str, x: Tensor) -> Tensor:
            site = Site(layer, kind)
            if site in reads:
                acts[str(site)] = x
            fn = fns.get(site)
            return x if fn is None else _checked(site, x, fn(x))

        if "resid_pre" in wanted:
            handles.append(
                block.register_forward_pre_hook(_on_input(visit, "resid_pre"), with_kwargs=True)
            )
        if "attn_z" in wanted:
            o_proj = block.get_submodule(self.adapter.o_proj)
            handles.append(
                o_proj.register_forward_pre_hook(_on_input(visit, "attn_z"), with_kwargs=True)
            )
        outputs = {
            "attn_out": self.adapter.attn_out,
            "mlp_in": self.adapter.pre_mlp_norm,
            "mlp_out": self.adapter.mlp_out,
        }
        for kind, path in outputs.items():
            if kind in wanted:
                handles.append(
                    block.get_submodule(path).register_forward_hook(_on_output(visit, kind))
                )

        # resid_mid is the layer's local `residual` variable, so it cannot be replaced directly: replace
        # the pre-MLP norm's input instead, and add the change (new - old) to the layer's output, so
        # that resid_post = new + mlp_out(new) as if the residual itself had been replaced.
        delta: list[Tensor] = []
        if "resid_mid" in wanted:

            def on_mid(_module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
                old = _first(args, kwargs)
                new = visit("resid_mid", old)
                if new is old:
                    return None
                delta.append(new - old)
                return _with_first(args, kwargs, new)

            norm = block.get_submodule(self.adapter.pre_mlp_norm)
            handles.append(norm.register_forward_pre_hook(on_mid, with_kwargs=True))

        if "resid_mid" in wanted or "resid_post" in wanted or layer == stop:

            def on_layer(_module: nn.Module, _args: tuple, output: Any) -> Any:
                hidden = output[0] if isinstance(output, tuple) else output
                if delta:
                    hidden = hidden + delta.pop()
                hidden = visit("resid_post", hidden) if "resid_post" in wanted else hidden
                if layer == stop:
                    raise _Stop
                return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

            handles.append(block.register_forward_hook(on_layer))
        return handles


def _checked(site: Site, old: Tensor, new: Tensor) -> Tensor:
    if new.shape != old.shape:
        raise SiteError(
            f"replacement for {site} has shape {tuple(new.shape)}; expected {tuple(old.shape)}"
        )
    return new.to(old.dtype)


def _passthrough(*args: Any, **kwargs: Any) -> Tensor:
    """A skipped decoder layer's forward: its input, unchanged (see `SiteModel.run_from`)."""
    return _first(args, kwargs)


def _first(args: tuple, kwargs: dict) -> Tensor:
    # transformers 5 passes hidden states positionally to layers and projections, but a keyword call
    # (hidden_states=..., input=...) must work too: take the first tensor argument either way.
    if args:
        return args[0]
    return next(v for v in kwargs.values() if isinstance(v, Tensor))


def _with_first(args: tuple, kwargs: dict, new: Tensor) -> tuple[tuple, dict]:
    if args:
        return (new, *args[1:]), kwargs
    key = next(k for k, v in kwargs.items() if isinstance(v, Tensor))
    return args, {**kwargs, key: new}


def _on_input(visit: Callable[[str, Tensor], Tensor], kind: str) -> Callable[..., tuple | None]:
    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        old = _first(args, kwargs)
        new = visit(kind, old)
        return None if new is old else _with_first(args, kwargs, new)

    return hook


def _on_output(visit: Callable[[str, Tensor], Tensor], kind: str) -> Callable[..., Any]:
    def hook(_module: nn.Module, _args: tuple, output: Any) -> Any:
        # Attention modules return (output, weights); norms and MLPs return a tensor.
        old = output[0] if isinstance(output, tuple) else output
        new = visit(kind, old)
        if new is old:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return hook
