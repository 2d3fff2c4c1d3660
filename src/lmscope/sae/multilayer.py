"""Cross-layer transcoders (CLTs) and multi-layer crosscoders: Gemma Scope 2's files and lmscope's.

Gemma Scope 2 layout (its tutorial loader, which stacks the files along a new leading axis, and a
published shape dump): ``<folder>/params_layer_{i}.safetensors`` for i = 0 … n−1, each holding

- ``w_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``threshold [d_sae]``: layer i's own encoder;
- ``w_dec [d_sae, n, d_out]``: layer i's latents decode into every layer;
- ``b_dec [d_out]``: the decoder bias of *output* layer i;
- ``affine_skip_connection [d_in, d_out]`` (``_affine`` folders): layer i's input to its output.

The width in a folder's name counts every layer's latents (a 262k CLT of Gemma 3 1B holds 26 ×
10,080). For a CLT, layer i reads ``pre_feedforward_layernorm.output`` (``mlp_in``) and writes
``post_feedforward_layernorm.output`` (``mlp_out``) of the model's layer i; a crosscoder reads and
reconstructs the residual stream (``resid_post``) at its listed layers (e.g. 7, 13, 17, 22). With
``x [..., n, d_in]``: ``f = relu(z)·1[z > θ]``, ``z[l] = x[l] @ w_enc[l] + b_enc[l]``; ``y[m] =
Σ_l f[l] @ w_dec[l, :, m] + b_dec[m] (+ x[m] @ skip[m])``. A CLT is causal: layer m's MLP output
cannot depend on a later layer's input, so its sum runs over l ≤ m only (circuit-tracer reads
``w_dec[i, :, i:]`` the same way); a crosscoder's runs over all its layers.

The native folder (``save_native`` / ``load_native``; docs/formats.md, "Multi-layer SAEs") is
``config.json`` (``"multilayer": "clt" | "crosscoder"``, layers, sites, widths, model, training,
and the published config.json kept verbatim) and one ``weights.safetensors`` of the stacked
tensors, written atomically. ``save_multilayer`` writes Gemma Scope 2's files back.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from lmscope.errors import SAEError

_FILE = re.compile(r"params_layer_(\d+)\.safetensors")
KINDS = {"clt": ("mlp_in", "mlp_out"), "crosscoder": ("resid_post", "resid_post")}
NATIVE_VERSION = 1
WEIGHTS = "weights.safetensors"
_TENSORS = ("w_enc", "b_enc", "threshold", "w_dec", "b_dec")


@dataclass
class MultiLayerSAE:
    """A CLT or crosscoder: tensors stacked over its ``n`` layers (leading axis)."""

    w_enc: Tensor  # [n, d_in, d_sae]
    b_enc: Tensor  # [n, d_sae]
    threshold: Tensor  # [n, d_sae]
    w_dec: Tensor  # [n, d_sae, n, d_out]
    b_dec: Tensor  # [n, d_out]
    skip: Tensor | None = None  # [n, d_in, d_out]
    kind: str = "clt"  # clt | crosscoder
    layers: tuple[int, ...] = ()  # the model's layers, one per stacked index (default 0 … n−1)
    model: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    published_config: dict[str, Any] | None = None  # Gemma Scope 2's config.json, verbatim

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SAEError(f"multi-layer kind {self.kind!r}; valid: {', '.join(KINDS)}")
        n = self.n_layers
        self.layers = tuple(self.layers) or tuple(range(n))
        if len(self.layers) != n or list(self.layers) != sorted(set(self.layers)):
            raise SAEError(
                f"{n} stacked layers need {n} increasing model layers, got {self.layers}"
            )
        if self.w_dec.ndim != 4 or tuple(self.w_dec.shape[:3]) != (n, self.d_sae, n):
            raise SAEError(
                f"w_dec is {tuple(self.w_dec.shape)}; expected [{n}, {self.d_sae}, {n}, d_out]"
            )

    # -- shapes and sites --------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return int(self.w_enc.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.w_enc.shape[1])

    @property
    def d_sae(self) -> int:
        """Latents per layer (the total is ``n_layers × d_sae``)."""
        return int(self.w_enc.shape[2])

    @property
    def d_out(self) -> int:
        return int(self.w_dec.shape[3])

    @property
    def causal(self) -> bool:
        return self.kind == "clt"

    @property
    def sites(self) -> list[str]:
        return [f"L{la}.{KINDS[self.kind][0]}" for la in self.layers]

    @property
    def out_sites(self) -> list[str]:
        return [f"L{la}.{KINDS[self.kind][1]}" for la in self.layers]

    def sources(self, m: int) -> range:
        """The stacked layers whose latents write into output layer ``m``."""
        return range(m + 1) if self.causal else range(self.n_layers)

    # -- computing ---------------------------------------------------------------------------
    def encode_layer(self, x: Tensor, i: int) -> Tensor:
        """Layer ``i``'s latents ``[..., d_sae]`` from its input ``x [..., d_in]``."""
        z = x @ self.w_enc[i] + self.b_enc[i]
        return z.relu() * (z > self.threshold[i]).to(z.dtype)

    def encode(self, x: Tensor) -> Tensor:
        """``x [..., n, d_in]`` → latents ``[..., n, d_sae]``."""
        z = torch.einsum("...ld,lds->...ls", x, self.w_enc) + self.b_enc
        return z.relu() * (z > self.threshold).to(z.dtype)

    def decode_layer(self, f: Tensor, m: int) -> Tensor:
        """Output layer ``m`` ``[..., d_out]`` from latents ``f [..., n', d_sae]`` of at least the
        layers that write into it (``sources(m)``), bias included, skip not."""
        src = self.sources(m)
        w = self.w_dec[src.start : src.stop, :, m]  # [k, d_sae, d_out]
        return torch.einsum("...ls,lsd->...d", f[..., src.start : src.stop, :], w) + self.b_dec[m]

    def decode(self, f: Tensor) -> Tensor:
        """Latents ``[..., n, d_sae]`` → every layer's output ``[..., n, d_out]``."""
        return torch.stack([self.decode_layer(f, m) for m in range(self.n_layers)], -2)

    def skip_layer(self, x: Tensor, m: int) -> Tensor | None:
        return None if self.skip is None else x @ self.skip[m]

    def forward(self, x: Tensor) -> Tensor:
        y = self.decode(self.encode(x))
        if self.skip is not None:
            y = y + torch.einsum("...ld,lde->...le", x, self.skip)
        return y

    __call__ = forward

    def to(self, device: str | torch.device | None = None) -> MultiLayerSAE:
        """This SAE with its tensors on ``device`` (a new object; metadata shared)."""
        if device is None:
            return self
        moved = {k: getattr(self, k).to(device) for k in _TENSORS}
        skip = None if self.skip is None else self.skip.to(device)
        return MultiLayerSAE(
            **moved,
            skip=skip,
            kind=self.kind,
            layers=self.layers,
            model=self.model,
            training=self.training,
            published_config=self.published_config,
        )

    def config(self) -> dict[str, Any]:
        """The native config.json content."""
        return {
            "lmscope_format": NATIVE_VERSION,
            "multilayer": self.kind,
            "architecture": f"jumprelu_{self.kind}",
            "layers": list(self.layers),
            "sites": self.sites,
            "out_sites": self.out_sites,
            "n_layers": self.n_layers,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "d_out": self.d_out,
            "skip": self.skip is not None,
            "causal": self.causal,
            "dtype": str(self.w_enc.dtype).removeprefix("torch."),
            "model": self.model,
            "training": self.training,
            "published_config": self.published_config,
        }


def is_multilayer(folder: str | Path) -> bool:
    """True for a native multi-layer folder (its config.json names ``multilayer``)."""
    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "multilayer" in json.loads(cfg.read_text())
    except (ValueError, TypeError):
        return False


def save_native(sae: MultiLayerSAE, folder: str | Path) -> Path:
    """Write ``sae`` as a native folder (config.json + weights.safetensors), atomically."""
    from lmscope.sae.formats import _atomic_dir

    path = Path(folder)
    tensors = {k: getattr(sae, k) for k in _TENSORS}
    if sae.skip is not None:
        tensors["skip"] = sae.skip
    with _atomic_dir(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(sae.config(), indent=2) + "\n")
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS)
        )
    return path


def load_native(folder: str | Path, *, device: str | torch.device | None = None) -> MultiLayerSAE:
    """Read a folder written by ``save_native``."""
    p = Path(folder)
    if not is_multilayer(p) or not (p / WEIGHTS).is_file():
        raise SAEError(
            f"{p} is not an lmscope multi-layer folder (config.json naming 'multilayer' + {WEIGHTS})"
        )
    cfg = json.loads((p / "config.json").read_text())
    if cfg.get("lmscope_format") != NATIVE_VERSION:
        raise SAEError(
            f"{p}/config.json has lmscope_format={cfg.get('lmscope_format')}; expected {NATIVE_VERSION}"
        )
    st = load_file(str(p / WEIGHTS), device=str(device) if device is not None else "cpu")
    missing = [k for k in _TENSORS if k not in st]
    if missing:
        raise SAEError(f"{p}/{WEIGHTS} lacks {', '.join(missing)}")
    return MultiLayerSAE(
        **{k: st[k] for k in _TENSORS},
        skip=st.get("skip"),
        kind=cfg["multilayer"],
        layers=tuple(cfg["layers"]),
        model=cfg.get("model") or "",
        training=cfg.get("training") or {},
        published_config=cfg.get("published_config"),
    )


def load_multilayer(
    folder: str | Path, *, kind: str | None = None, layers: tuple[int, ...] = ()
) -> MultiLayerSAE:
    """Read a Gemma Scope 2 ``clt/…`` or ``crosscoder/…`` folder (every params_layer_i file).

    ``kind`` defaults to the folder's parent name (``clt`` or ``crosscoder``, else ``clt``); a
    crosscoder's ``layers`` default to those its folder name lists (``layer_7_13_17_22_…``).
    """
    p = Path(folder)
    files = sorted(
        (
            (int(m[1]), f)
            for f in p.glob("params_layer_*.safetensors")
            if (m := _FILE.fullmatch(f.name))
        ),
        key=lambda t: t[0],
    )
    if not files:
        raise SAEError(
            f"{p} holds no params_layer_<i>.safetensors (a Gemma Scope 2 CLT/crosscoder)"
        )
    if [i for i, _ in files] != list(range(len(files))):
        raise SAEError(
            f"{p}: params_layer files are not 0…{len(files) - 1}: {[i for i, _ in files]}"
        )
    per = [load_file(str(f)) for _, f in files]
    keys = set(per[0])
    if not set(_TENSORS) <= keys or any(set(q) != keys for q in per):
        raise SAEError(f"{p}: each params_layer file needs {sorted(_TENSORS)} (same keys in all)")
    n = len(per)
    if per[0]["w_dec"].ndim != 3 or per[0]["w_dec"].shape[1] != n:
        raise SAEError(
            f"{p}: w_dec is {tuple(per[0]['w_dec'].shape)}, expected [d_sae, {n}, d_out]"
        )
    shapes = {k: {tuple(q[k].shape) for q in per} for k in keys}
    uneven = [k for k, s in shapes.items() if len(s) > 1]
    if uneven:
        raise SAEError(f"{p}: layers differ in the shape of {', '.join(sorted(uneven))}")
    st = {k: torch.stack([q[k].float() for q in per]) for k in keys}
    kind = kind or (p.parent.name if p.parent.name in KINDS else "clt")
    if not layers and kind == "crosscoder":
        m = re.match(r"layer_([\d_]+?)_width", p.name)
        layers = tuple(int(v) for v in m[1].split("_")) if m else ()
    cfg_file = p / "config.json"
    published = json.loads(cfg_file.read_text()) if cfg_file.is_file() else None
    return MultiLayerSAE(
        st["w_enc"],
        st["b_enc"],
        st["threshold"],
        st["w_dec"],
        st["b_dec"],
        st.get("affine_skip_connection"),
        kind=kind,
        layers=layers,
        published_config=published,
    )


def save_multilayer(sae: MultiLayerSAE, folder: str | Path) -> Path:
    """Write ``sae`` back as Gemma Scope 2 files (one params_layer_i.safetensors per layer, and the
    published config.json when the SAE came with one)."""
    from lmscope.sae.formats import _atomic_dir

    path = Path(folder)
    with _atomic_dir(path) as tmp:
        for i in range(sae.n_layers):
            d = {k: getattr(sae, k)[i] for k in _TENSORS}
            if sae.skip is not None:
                d["affine_skip_connection"] = sae.skip[i]
            out = {k: v.detach().cpu().contiguous() for k, v in d.items()}
            save_file(out, str(tmp / f"params_layer_{i}.safetensors"))
        if sae.published_config is not None:
            (tmp / "config.json").write_text(json.dumps(sae.published_config, indent=2) + "\n")
    return path


__all__ = [
    "KINDS",
    "MultiLayerSAE",
    "is_multilayer",
    "load_multilayer",
    "load_native",
    "save_multilayer",
    "save_native",
]
