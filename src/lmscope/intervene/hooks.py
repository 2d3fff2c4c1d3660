"""Interventions on SAE latents: splice, steer, clamp, ablate; composable, active inside `intervene`.

>>> sae = suite.load_sae(suite.resolve("L6.resid_post"))
>>> with intervene(loaded, [Splice(sae), Clamp(sae, 123, 0.0)]):
...     logits = loaded.model(ids).logits

How the interventions of one site compose (in list order). At each site, every SAE named by a
`Splice`, `Clamp` or `Ablate` encodes the value ``x`` that enters the site once: latents ``f`` and
error ``ε = x − decode(f)``. Clamp and Ablate edit a copy ``f'`` of the latents, later edits
overriding earlier ones on the same latent and position; Steer adds ``coeff·W_dec[latent]`` to a
steering sum. The site's new value is

    x + Σ_SAE (f' − f)·W_dec  +  steering        (every SAE keeps its error term), or
    decode(f') + steering                        (the one SAE spliced with ``error=False``).

So a splice with its error term changes nothing until a latent is edited, and clamping a latent
to its own value is an exact no-op. Latents of folded SAEs are in raw activation units.

Positions are absolute token indices (0 is the first token, normally BOS), counted across KV-cache
generation steps, so ``positions=[5]`` means the sixth token even when it is generated.
``positions=None`` means every token that is not BOS, EOS or padding: SAEs never see those in
training, and a reconstruction there would break the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from lmscope.errors import InterventionError
from lmscope.model import LoadedModel, SiteModel
from lmscope.model.sites import ReplaceFn, Site, decoder_body
from lmscope.sae import SAE, check_compatible

ABLATE_MODES = ("zero", "mean")


def _check_latent(sae: SAE, latent: int) -> int:
    if not 0 <= int(latent) < sae.cfg.d_sae:
        raise InterventionError(
            f"latent {latent} is out of range for the SAE at {sae.cfg.site or '?'} "
            f"(width {sae.cfg.d_sae}); valid latents: 0-{sae.cfg.d_sae - 1}"
        )
    return int(latent)


def _check_positions(positions: Sequence[int] | None) -> tuple[int, ...] | None:
    if positions is None:
        return None
    out = tuple(int(p) for p in positions)
    if any(p < 0 for p in out):
        raise InterventionError(
            f"positions must be absolute token indices >= 0 (0 is the first token), got {list(out)}"
        )
    return out


@dataclass(eq=False)
class Splice:
    """Replace ``sae.cfg.site`` by the SAE's reconstruction, plus its error term when ``error``."""

    sae: SAE
    error: bool = True

    def __post_init__(self) -> None:
        if self.sae.cfg.is_transcoder:
            raise InterventionError("transcoders cannot be spliced yet; use an SAE of one site")


@dataclass(eq=False)
class Steer:
    """Add ``coeff × W_dec[latent]`` to the site at ``positions`` (None: every non-special token)."""

    sae: SAE
    latent: int
    coeff: float
    positions: Sequence[int] | None = None

    def __post_init__(self) -> None:
        self.latent = _check_latent(self.sae, self.latent)
        self.positions = _check_positions(self.positions)


@dataclass(eq=False)
class Clamp:
    """Set one latent to ``value`` at ``positions`` (the rest of the site, error included, is kept)."""

    sae: SAE
    latent: int
    value: float
    positions: Sequence[int] | None = None

    def __post_init__(self) -> None:
        self.latent = _check_latent(self.sae, self.latent)
        self.positions = _check_positions(self.positions)


@dataclass(eq=False)
class Ablate:
    """Set latents to zero (``mode="zero"``) or to their mean activation (``mode="mean"``).

    ``mean`` is a ``[d_sae]`` tensor of mean activations (see `latent_means`) or one value per
    latent in ``latents``.
    """

    sae: SAE
    latents: Sequence[int]
    mode: str = "zero"
    mean: Tensor | None = None
    positions: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if self.mode not in ABLATE_MODES:
            raise InterventionError(
                f"unknown ablation mode {self.mode!r}; valid: {', '.join(ABLATE_MODES)}"
            )
        self.latents = [_check_latent(self.sae, i) for i in self.latents]
        self.positions = _check_positions(self.positions)
        if self.mode == "mean":
            if self.mean is None:
                raise InterventionError(
                    "Ablate(mode='mean') needs mean=, e.g. latent_means(loaded, sae, texts)"
                )
            n = self.mean.numel()
            if n not in (self.sae.cfg.d_sae, len(self.latents)):
                raise InterventionError(
                    f"mean has {n} values; give one per latent of the SAE ({self.sae.cfg.d_sae}) "
                    f"or one per ablated latent ({len(self.latents)})"
                )

    def values(self, like: Tensor) -> Tensor:
        """What the ablated latents are set to, ``[len(latents)]``."""
        if self.mode == "zero" or self.mean is None:
            return like.new_zeros(len(self.latents))
        mean = self.mean.to(like.device, like.dtype).flatten()
        return mean[list(self.latents)] if mean.numel() == self.sae.cfg.d_sae else mean


Intervention = Splice | Steer | Clamp | Ablate


class _Positions:
    """Absolute positions and special-token flags of the forward pass in flight.

    A pre-hook on the decoder body records ``position_ids`` (HF ``generate`` passes them) or, when
    absent, the KV cache's length, and the input ids; site hooks turn them into ``[B, T]`` masks.
    """

    def __init__(self, special_ids: set[int]):
        self.special_ids = sorted(special_ids)
        self.position_ids: Tensor | None = None
        self.offset = 0
        self.input_ids: Tensor | None = None

    def pre_hook(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.position_ids = kwargs.get("position_ids")
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], Tensor) and not args[0].is_floating_point():
            ids = args[0]
        self.input_ids = ids
        cache: Any = kwargs.get("past_key_values")
        cache = kwargs.get("cache") if cache is None else cache
        length = getattr(cache, "get_seq_length", None)
        self.offset = int(length()) if callable(length) else 0

    def absolute(self, x: Tensor) -> Tensor:
        b, t = x.shape[:2]
        pos = self.position_ids
        if pos is not None and pos.shape[-1] == t:
            return pos.to(x.device).expand(b, t)
        return torch.arange(self.offset, self.offset + t, device=x.device).expand(b, t)

    def ordinary(self, x: Tensor) -> Tensor:
        """``[B, T]`` True where the token is not BOS, EOS or padding."""
        ids = self.input_ids
        if ids is None or tuple(ids.shape) != tuple(x.shape[:2]) or not self.special_ids:
            return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        special = torch.tensor(self.special_ids, device=ids.device)
        return ~torch.isin(ids, special).to(x.device)

    def mask(self, x: Tensor, positions: Sequence[int] | None) -> Tensor:
        if positions is None:
            return self.ordinary(x)
        wanted = torch.tensor(list(positions), device=x.device)
        return torch.isin(self.absolute(x), wanted)


class _SiteChain:
    """Every intervention of one site, applied to the site's value as the module docstring says."""

    def __init__(self, site: str, items: list[Intervention], where: _Positions):
        self.site, self.items, self.where = site, items, where
        unspliced = [i for i in items if isinstance(i, Splice) and not i.error]
        if len({id(i.sae) for i in unspliced}) > 1:
            raise InterventionError(
                f"at most one SAE per site may be spliced without its error term; {site} has "
                f"{len(unspliced)}"
            )
        self.no_error = unspliced[0].sae if unspliced else None

    def __call__(self, x: Tensor) -> Tensor:
        steering: Tensor | None = None
        latents: dict[int, tuple[SAE, Tensor, Tensor]] = {}  # id(sae) → (sae, f, f')
        for item in self.items:
            sae = item.sae
            w = sae.W_dec
            if isinstance(item, Steer):
                mask = self.where.mask(x, item.positions).to(w.device, w.dtype)
                add = mask[..., None] * (item.coeff * w[item.latent])
                steering = add if steering is None else steering + add
                continue
            if isinstance(item, Splice) and item.error:
                continue  # x + (f − f)·W_dec: nothing to compute
            if id(sae) not in latents:
                f = sae.encode(x.to(w.device, w.dtype))
                latents[id(sae)] = (sae, f, f.clone())
            f_new = latents[id(sae)][2]
            if isinstance(item, Clamp):
                mask = self.where.mask(x, item.positions).to(f_new.device)
                col = f_new[..., item.latent]
                f_new[..., item.latent] = torch.where(mask, col.new_tensor(item.value), col)
            elif isinstance(item, Ablate):
                mask = self.where.mask(x, item.positions).to(f_new.device)
                idx = list(item.latents)
                f_new[..., idx] = torch.where(mask[..., None], item.values(f_new), f_new[..., idx])
        out = x
        for sae, f, f_new in latents.values():
            if sae is self.no_error:
                # decode(f') only at ordinary tokens: BOS/EOS/pad keep their value (see the docstring)
                keep = self.where.ordinary(x)[..., None]
                out = torch.where(keep, sae.decode(f_new).to(x.device, x.dtype), out)
                continue
            changed = (f_new != f).flatten(0, -2).any(0).nonzero().flatten()
            if len(changed):  # only the edited latents: exact no-op when nothing changed
                delta = (f_new - f)[..., changed] @ sae.W_dec[changed]
                out = out + delta.to(x.device, x.dtype)
        if steering is not None:
            out = out + steering.to(x.device, x.dtype)
        return out


class Hooks:
    """Interventions installed on a model: a context manager, or ``attach()`` / ``remove()``.

    Made by `intervene`; nothing happens until it is entered or attached.
    """

    def __init__(self, loaded: LoadedModel, interventions: Iterable[Intervention]):
        self.loaded = loaded
        self.interventions = list(interventions)
        self._handles: list[Any] = []
        sites = SiteModel(loaded)
        by_site: dict[str, list[Intervention]] = {}
        for item in self.interventions:
            if not isinstance(item, Splice | Steer | Clamp | Ablate):
                raise InterventionError(
                    f"{item!r} is not an intervention; use Splice, Steer, Clamp or Ablate"
                )
            site = validate_sae(sites, item.sae)
            by_site.setdefault(site, []).append(item)
        tok = loaded.tokenizer
        special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id} - {None}
        self._where = _Positions({int(i) for i in special})  # type: ignore[arg-type]
        self._chains = {s: _SiteChain(s, items, self._where) for s, items in by_site.items()}
        self._sites = sites

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> Hooks:
        if self._handles or not self._chains:
            return self
        body = decoder_body(self.loaded.model)
        self._handles.append(body.register_forward_pre_hook(self._where.pre_hook, with_kwargs=True))
        try:
            replace: dict[str | Site, ReplaceFn] = {s: c for s, c in self._chains.items()}
            self._handles += self._sites.add_hooks(replace)
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> Hooks:
        return self.attach()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()


def intervene(loaded: LoadedModel, interventions: Iterable[Intervention]) -> Hooks:
    """The interventions, active for every forward pass inside ``with`` (``SiteModel.run`` and HF
    ``generate`` included). Several on one site compose in list order (module docstring).

    >>> with intervene(loaded, [Steer(sae, 123, 8.0)]):
    ...     out = loaded.model.generate(ids, max_new_tokens=10)
    """
    return Hooks(loaded, interventions)


def validate_sae(sites: SiteModel, sae: SAE) -> str:
    """The SAE's site name, after checking that the model has that site with the SAE's width."""
    if not sae.cfg.site:
        raise InterventionError("the SAE's config names no site; set cfg.site, e.g. L6.resid_post")
    if sae.cfg.is_transcoder:
        raise InterventionError("transcoders are not supported here yet; use an SAE of one site")
    site = str(sites.site(sae.cfg.site))
    check_compatible(sae, site, sites.site_dim(site))
    return site


@torch.no_grad()
def latent_means(
    loaded: LoadedModel, sae: SAE, texts: Sequence[str], *, batch_size: int = 8
) -> Tensor:
    """Mean activation of every latent over the ordinary tokens of ``texts``, ``[d_sae]``.

    >>> Ablate(sae, [12, 40], mode="mean", mean=latent_means(loaded, sae, texts))
    """
    if not texts:
        raise InterventionError("latent_means needs at least one text")
    sites = SiteModel(loaded)
    site = validate_sae(sites, sae)
    tok = loaded.tokenizer
    special = torch.tensor(sorted({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id} - {None}))
    total = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    count = 0
    for i in range(0, len(texts), batch_size):
        batch = tok(list(texts[i : i + batch_size]), return_tensors="pt", padding=True)
        x = sites.run(batch.input_ids, batch.attention_mask, read=[site], return_logits=False)
        keep = ~torch.isin(batch.input_ids, special) & batch.attention_mask.bool()
        acts = x.acts[site][keep.to(x.acts[site].device)]
        total += sae.encode(acts.to(sae.W_dec.device, sae.W_dec.dtype)).double().sum(0).cpu()
        count += int(keep.sum())
    if count == 0:
        raise InterventionError("the texts hold no ordinary tokens (only BOS/EOS/padding)")
    return (total / count).to(sae.W_dec.dtype)
