"""SAE files: the native folder, and export/import for SAELens and Gemma Scope 1/2.

Native (``save_sae``/``load_sae``): ``config.json`` (``SAEConfig.to_dict()`` + ``lmscope_format``)
and ``weights.safetensors`` (the module's state dict, exact names), written atomically. It holds any
architecture, folded or not, so a training checkpoint and a finished SAE share one format.

Interop formats describe inference SAEs on raw activations, so ``export_sae`` folds first (exact,
see ``SAE.folded``) and converts what the format can express exactly: BatchTopK → JumpReLU (its
inference form) and, for Gemma Scope, ReLU → JumpReLU with θ = 0. What cannot be expressed (TopK in
Gemma Scope, a skip transcoder in Gemma Scope 1) is refused. Gemma Scope folders also get an
``lmscope.json`` sidecar (the full config) so a round trip keeps sites, model and training summary.
See ``docs/formats.md``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from lmscope.errors import SAEError
from lmscope.sae.base import DTYPES, SAE, SAEConfig, sae_class
from lmscope.sae.topk import BatchTopKSAE

FORMATS = ("native", "saelens", "gemmascope", "gemmascope2")
NATIVE_VERSION = 1
SIDECAR = "lmscope.json"
SAELENS_VERSION = "6.0.0"  # the cfg.json layout we write (v6: nested ``metadata``)

# our site kinds ↔ Hugging Face module paths (Gemma Scope 2 ``hf_hook_point_*``) and
# TransformerLens hook names (SAELens ``hook_name``); resid_mid has no HF module
HF_HOOKS = {
    "resid_pre": "model.layers.{L}.input",
    "resid_post": "model.layers.{L}.output",
    "attn_z": "model.layers.{L}.self_attn.o_proj.input",
    "attn_out": "model.layers.{L}.post_attention_layernorm.output",
    "mlp_in": "model.layers.{L}.pre_feedforward_layernorm.output",
    "mlp_out": "model.layers.{L}.post_feedforward_layernorm.output",
}
TL_HOOKS = {
    "resid_pre": "blocks.{L}.hook_resid_pre",
    "resid_mid": "blocks.{L}.hook_resid_mid",
    "resid_post": "blocks.{L}.hook_resid_post",
    "attn_z": "blocks.{L}.attn.hook_z",
    "attn_out": "blocks.{L}.hook_attn_out",
    "mlp_in": "blocks.{L}.ln2.hook_normalized",
    "mlp_out": "blocks.{L}.hook_mlp_out",
}
SUPPORTED = {
    "saelens": {"jumprelu", "topk", "relu", "jumprelu_transcoder"},
    "gemmascope": {"jumprelu", "jumprelu_transcoder"},
    "gemmascope2": {"jumprelu", "jumprelu_transcoder"},
}


# --- native ---


def replace_folder(src: Path, dst: Path) -> None:
    """Put folder ``src`` at ``dst`` by renames on one file system: readers see old or new, whole."""
    if dst.exists():  # rename cannot replace a non-empty folder: move the old one aside
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old)
    else:
        os.replace(src, dst)


@contextmanager
def _atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temp folder beside ``path``; on success it replaces ``path`` in one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        replace_folder(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _tensors(sae: SAE) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_sae(sae: SAE, path: str | Path) -> Path:
    """Write ``sae`` as a native folder (``config.json`` + ``weights.safetensors``)."""
    path = Path(path)
    with _atomic_dir(path) as tmp:
        _write_json(tmp / "config.json", {"lmscope_format": NATIVE_VERSION, **sae.cfg.to_dict()})
        save_file(_tensors(sae), str(tmp / "weights.safetensors"))
    return path


def _build(cfg: SAEConfig, state: dict[str, Tensor]) -> SAE:
    sae = sae_class(cfg.architecture)(cfg)
    state = {k: v.to(cfg.torch_dtype) for k, v in state.items()}
    try:
        sae.load_state_dict(state)
    except RuntimeError as e:  # missing/unexpected keys or wrong shapes
        first = str(e).strip().splitlines()
        raise SAEError(f"weights do not match the {cfg.architecture} config: {first[-1]}") from e
    return sae


def load_sae(path: str | Path, *, device: str | torch.device | None = None) -> SAE:
    """Read a native SAE folder written by ``save_sae``."""
    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "weights.safetensors").is_file():
        raise SAEError(f"{path} is not an lmscope SAE folder (config.json + weights.safetensors)")
    try:
        d = json.loads((path / "config.json").read_text())
    except ValueError:
        raise SAEError(f"{path}/config.json is not JSON") from None
    version = d.pop("lmscope_format", None) if isinstance(d, dict) else None
    if version != NATIVE_VERSION:
        raise SAEError(
            f"{path}/config.json has lmscope_format={version}; expected {NATIVE_VERSION}"
        )
    try:
        state = load_file(str(path / "weights.safetensors"))
    except (SafetensorError, OSError) as e:  # truncated or not safetensors at all
        raise SAEError(
            f"{path}/weights.safetensors is unreadable ({e}); re-export or retrain it"
        ) from None
    sae = _build(SAEConfig.from_dict(d), state)
    return sae.to(device) if device is not None else sae


# --- site names ---


def _split_site(site: str) -> tuple[int, str] | None:
    m = re.fullmatch(r"L(\d+)\.(\w+)", site)
    return (int(m.group(1)), m.group(2)) if m else None


def _hook(site: str | None, table: dict[str, str]) -> str | None:
    parts = _split_site(site or "")
    if parts is None or parts[1] not in table:
        return site or None  # not a standard site: pass our name through
    return table[parts[1]].format(L=parts[0])


def _site_from_hook(hook: str | None, table: dict[str, str]) -> str:
    for kind, pattern in table.items():
        regex = re.escape(pattern).replace(re.escape("{L}"), r"(\d+)")
        m = re.fullmatch(regex, hook or "")
        if m:
            return f"L{m.group(1)}.{kind}"
    return hook or ""


# --- export ---


def _inference_form(sae: SAE, fmt: str) -> SAE:
    """Folded, and converted to the architecture the format stores; SAEError if impossible."""
    out = sae if sae.cfg.is_folded else sae.folded()
    arch = out.cfg.architecture
    if isinstance(out, BatchTopKSAE):
        out = out.to_jumprelu()
    elif arch == "relu" and fmt.startswith("gemmascope"):
        out = _relu_as_jumprelu(out)
    arch = out.cfg.architecture
    if arch not in SUPPORTED[fmt]:
        able = [f for f in FORMATS if f == "native" or arch in SUPPORTED[f]]
        raise SAEError(f"format {fmt!r} cannot express a {arch} SAE; use one of: {', '.join(able)}")
    if fmt == "gemmascope" and out.cfg.skip:
        raise SAEError(
            "format 'gemmascope' has no skip connection; use gemmascope2, saelens or native"
        )
    return out


def _relu_as_jumprelu(sae: SAE) -> SAE:
    # relu(z)·1[z > 0] == relu(z): a JumpReLU with θ = 0 is the same function
    d = {**sae.cfg.to_dict(), "architecture": "jumprelu"}
    d["training"] = {**d["training"], "converted_from": "relu"}
    state = _tensors(sae)
    state["threshold"] = torch.zeros(sae.cfg.d_sae, dtype=sae.cfg.torch_dtype)
    return _build(SAEConfig.from_dict(d), state)


def export_sae(sae: SAE, path: str | Path, format: str = "native") -> Path:
    """Write ``sae`` in ``format`` (``native | saelens | gemmascope | gemmascope2``).

    Interop formats get the folded inference form; ``native`` keeps the SAE as it is.
    Example: ``export_sae(sae, "out/L6_res", "gemmascope2")``.
    """
    if format not in FORMATS:
        raise SAEError(f"unknown SAE format {format!r}; valid: {', '.join(FORMATS)}")
    if format == "native":
        return save_sae(sae, path)
    inf = _inference_form(sae, format)
    path = Path(path)
    with _atomic_dir(path) as tmp:
        {"saelens": _write_saelens, "gemmascope": _write_gs1, "gemmascope2": _write_gs2}[format](
            inf, tmp
        )
        if format != "saelens":
            _write_json(tmp / SIDECAR, inf.cfg.to_dict())
    return path


def _write_saelens(sae: SAE, out: Path) -> None:
    cfg = sae.cfg
    arch = {"relu": "standard"}.get(cfg.architecture, cfg.architecture)
    if cfg.architecture == "jumprelu_transcoder" and cfg.skip:
        arch = "jumprelu_skip_transcoder"
    hook = _hook(cfg.site, TL_HOOKS)
    d: dict[str, Any] = {
        "architecture": arch,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "hook_z" if (hook or "").endswith("hook_z") else "none",
        "sae_lens_version": SAELENS_VERSION,
        "metadata": {
            "sae_lens_version": SAELENS_VERSION,
            "model_name": cfg.model,
            "hook_name": hook,
            "hook_head_index": None,
            "prepend_bos": True,
            "lmscope": cfg.to_dict(),  # SAELens keeps unknown metadata: lets us round-trip
        },
    }
    if cfg.k is not None:
        d["k"] = cfg.k
    state = _tensors(sae)
    if cfg.is_transcoder:
        d |= {"d_out": cfg.out_dim, "hook_name_out": _hook(cfg.out_site, TL_HOOKS)}
        if cfg.skip:  # SAELens stores W_skip as [d_out, d_in] and applies x @ W_skip.T
            state["W_skip"] = state["W_skip"].T.contiguous()
    _write_json(out / "cfg.json", d)
    save_file(state, str(out / "sae_weights.safetensors"))


def _write_gs1(sae: SAE, out: Path) -> None:
    keys = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
    state = _tensors(sae)
    np.savez(out / "params.npz", **{k: state[k].float().numpy() for k in keys})  # type: ignore[arg-type]


def _write_gs2(sae: SAE, out: Path) -> None:
    cfg, state = sae.cfg, _tensors(sae)
    params = {k.lower(): state[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")}
    if cfg.skip:
        params["affine_skip_connection"] = state["W_skip"]  # [d_in, d_out], x @ A
    save_file(params, str(out / "params.safetensors"))
    _write_json(
        out / "config.json",
        {
            "hf_hook_point_in": _hook(cfg.site, HF_HOOKS),
            "hf_hook_point_out": _hook(cfg.out_site or cfg.site, HF_HOOKS),
            "width": cfg.d_sae,
            "model_name": cfg.model,
            "architecture": "jump_relu",
            "l0": cfg.training.get("l0", cfg.training.get("target_l0")),
            "affine_connection": cfg.skip,
            "type": "transcoder" if cfg.is_transcoder else "sae",
        },
    )


# --- import ---


def detect_format(path: str | Path) -> str:
    """Which of ``FORMATS`` a local folder (or a Gemma Scope params file) holds."""
    p = Path(path)
    if p.is_file():
        p = p.parent
    if (p / "weights.safetensors").is_file() and (p / "config.json").is_file():
        return "native"
    if (p / "cfg.json").is_file() and (p / "sae_weights.safetensors").is_file():
        return "saelens"
    if (p / "params.safetensors").is_file():
        return "gemmascope2"
    if (p / "params.npz").is_file():
        return "gemmascope"
    raise SAEError(
        f"no SAE found in {p}: expected config.json+weights.safetensors (native), cfg.json+"
        "sae_weights.safetensors (saelens), params.npz (gemmascope) or params.safetensors (gemmascope2)"
    )


def import_sae(
    path: str | Path, *, dtype: str | None = None, hints: dict[str, Any] | None = None
) -> SAE:
    """Load an SAE from a local folder in any of ``FORMATS`` (auto-detected), or from a Hugging
    Face path ``owner/repo/sub/folder`` (downloaded with ``huggingface_hub`` when online).

    ``hints`` (``site``, ``out_site``, ``model``) name what folders without a config read (Gemma
    Scope 1); a Gemma Scope 2 config's own hook points win over them.
    Example: ``import_sae("google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71")``.
    """
    spec = str(path)
    p = Path(path)
    hints = {k: v for k, v in (hints or {}).items() if v is not None}
    if not p.exists():
        if p.is_absolute() or spec.startswith(".") or spec.count("/") < 1:
            raise SAEError(f"no SAE at {spec}: not a local path nor an owner/repo[/folder] HF path")
        p, hints = _download(spec), _gemmascope_hints(spec)
    fmt = detect_format(p)
    if p.is_file():
        p = p.parent
    if fmt == "native":
        sae = load_sae(p)
    else:
        cfg_d, state = {
            "saelens": _read_saelens,
            "gemmascope": _read_gs1,
            "gemmascope2": _read_gs2,
        }[fmt](p, hints)
        if (p / SIDECAR).is_file():
            cfg_d = json.loads((p / SIDECAR).read_text())
        sae = _build(SAEConfig.from_dict(cfg_d), state)
    if dtype is not None and dtype != sae.cfg.dtype:
        d = {**sae.cfg.to_dict(), "dtype": dtype}
        sae = _build(SAEConfig.from_dict(d), _tensors(sae))
    return sae


def _dtype_name(t: Tensor) -> str:
    name = str(t.dtype).removeprefix("torch.")
    return name if name in DTYPES else "float32"


def _folded_cfg(arch: str, state: dict[str, Tensor], **kw: Any) -> dict[str, Any]:
    d_in, d_sae = state["W_enc"].shape
    d_out = state["W_dec"].shape[1]
    if d_out != d_in and arch == "jumprelu":
        arch = "jumprelu_transcoder"
    cfg = {
        "architecture": arch,
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "d_out": int(d_out) if arch == "jumprelu_transcoder" else None,
        "apply_b_dec_to_input": False,
        "input_scale": 1.0,
        "skip": "W_skip" in state,
        "dtype": _dtype_name(state["W_enc"]),
    }
    return cfg | {k: v for k, v in kw.items() if v is not None}


def _read_saelens(p: Path, hints: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    d = json.loads((p / "cfg.json").read_text())
    state = load_file(str(p / "sae_weights.safetensors"))
    meta = d.get("metadata", {}) or {}
    if d.get("normalize_activations") not in (None, "none"):
        raise SAEError(
            f"SAELens normalize_activations={d['normalize_activations']!r} is not supported; "
            "fold the scaling factor in SAELens first"
        )
    arch_map = {
        "standard": "relu",
        "jumprelu": "jumprelu",
        "topk": "topk",
        "jumprelu_transcoder": "jumprelu_transcoder",
        "jumprelu_skip_transcoder": "jumprelu_transcoder",
    }
    arch = arch_map.get(d.get("architecture", "standard"))
    if arch is None:
        raise SAEError(
            f"SAELens architecture {d.get('architecture')!r} is not supported; "
            f"valid: {', '.join(arch_map)}"
        )
    if "W_skip" in state:
        state["W_skip"] = state["W_skip"].T.contiguous()  # SAELens [d_out, d_in] → ours
    if d.get("apply_b_dec_to_input", True) and not arch.endswith("transcoder"):
        # fold the pre-subtraction so that every imported SAE is in the folded form
        state["b_enc"] = state["b_enc"] - state["b_dec"] @ state["W_enc"]
    k = d.get("k") or (d.get("activation_fn_kwargs") or {}).get("k")
    hook = meta.get("hook_name", d.get("hook_name"))
    cfg = _folded_cfg(
        arch,
        state,
        k=k,
        model=meta.get("model_name", d.get("model_name")),
        site=_site_from_hook(hook, TL_HOOKS),
        out_site=_site_from_hook(d.get("hook_name_out"), TL_HOOKS) if "d_out" in d else None,
    )
    lm = meta.get("lmscope")
    return ({**lm, "apply_b_dec_to_input": False, "input_scale": 1.0} if lm else cfg), state


def _read_gs1(p: Path, hints: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    with np.load(p / "params.npz") as data:
        raw = {k: torch.from_numpy(np.array(data[k])) for k in data.files}
    # published files use W_enc/W_dec; some copies use w_enc/w_dec
    state = {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in raw.items()}
    state = {
        k: v for k, v in state.items() if k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
    }
    # Gemma Scope 1 transcoders have d_in == d_out: only the path (hints) tells them apart
    arch = "jumprelu_transcoder" if hints.get("out_site") else "jumprelu"
    return _folded_cfg(arch, state, **hints), state


def _read_gs2(p: Path, hints: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    raw = load_file(str(p / "params.safetensors"))
    names = {"w_enc": "W_enc", "w_dec": "W_dec", "affine_skip_connection": "W_skip"}
    state = {names.get(k, k): v for k, v in raw.items()}
    meta = json.loads((p / "config.json").read_text()) if (p / "config.json").is_file() else {}
    if meta.get("architecture", "jump_relu") != "jump_relu":
        raise SAEError(f"Gemma Scope 2 architecture {meta['architecture']!r} is not supported")
    # Gemma Scope 2 config.json keys (as published, e.g. google/gemma-scope-2-4b-pt resid_post):
    # hf_hook_point_in, hf_hook_point_out, width, model_name, architecture ("jump_relu"), l0,
    # affine_connection, type ("sae" | "transcoder"). Transcoders read pre_feedforward_layernorm
    # .output and write post_feedforward_layernorm.output; an SAE's two hook points are equal.
    hook_in, hook_out = meta.get("hf_hook_point_in"), meta.get("hf_hook_point_out")
    transcoder = (
        meta.get("type") == "transcoder"
        or "W_skip" in state
        or (hook_out not in (None, hook_in))
        or (not meta and bool(hints.get("out_site")))
    )
    site_in = _site_from_hook(hook_in, HF_HOOKS) if hook_in else hints.get("site", "")
    out = hints.get("out_site") if not hook_out else _site_from_hook(hook_out, HF_HOOKS)
    cfg = _folded_cfg(
        "jumprelu_transcoder" if transcoder else "jumprelu",
        state,
        site=site_in,
        out_site=out if transcoder else None,
        model=meta.get("model_name") or hints.get("model"),
    )
    if meta.get("l0") is not None:
        cfg["training"] = {"l0": float(meta["l0"])}
    return cfg, state


def _gemmascope_hints(spec: str) -> dict[str, Any]:
    """Site and model guessed from a Gemma Scope 1 HF path (its folders carry no config)."""
    repo = spec.split("/")[1] if "/" in spec else ""
    m = re.search(r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att|transcoders)", repo)
    layer = re.search(r"layer_(\d+)", spec)
    if not m or not layer:
        return {}
    kind = {"res": "resid_post", "mlp": "mlp_out", "att": "attn_z", "transcoders": "mlp_in"}
    size, variant, which = m.groups()
    hints = {
        "site": f"L{layer.group(1)}.{kind[which]}",
        "model": f"google/gemma-2-{size}" + ("-it" if variant == "it" else ""),
    }
    if which == "transcoders":
        hints["out_site"] = f"L{layer.group(1)}.mlp_out"
    return hints


def _download(spec: str) -> Path:
    parts = spec.strip("/").split("/")
    repo_id, sub = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise SAEError(
            "importing from the Hugging Face Hub needs huggingface_hub (pip install)"
        ) from e
    try:
        root = snapshot_download(repo_id, allow_patterns=[f"{sub}/*"] if sub else None)
    except Exception as e:  # offline, gated, not found: one actionable message
        raise SAEError(
            f"could not download {spec} from the Hugging Face Hub ({type(e).__name__}); "
            "check the name, your connection/token, or pass a local folder"
        ) from e
    return Path(root) / sub
