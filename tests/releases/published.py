"""Write folders in the exact layouts Gemma Scope 1 and 2 publish, inside a Hugging Face cache.

Layouts (file names, tensor names and shapes, config keys), with where each fact comes from:
- Gemma Scope 1 (`google/gemma-scope-2b-pt-res` …): `layer_L/width_W/average_l0_N/params.npz`,
  float32 `W_enc [d_in, d_sae]`, `W_dec [d_sae, d_in]`, `b_enc`, `b_dec`, `threshold`; no config
  (SAELens gemma_2 loader; Gemma Scope tutorial's JumpReLUSAE attribute names). The transcoder
  repo's npz uses lower-case `w_enc`/`w_dec` (SAELens' gemma_2_transcoder loader test mock).
- Gemma Scope 2 (`google/gemma-scope-2-270m-pt` …): `<group>/layer_L_width_W_l0_{small,medium,
  big}[_affine]/params.safetensors` with `w_enc [d_in, d_sae]`, `w_dec [d_sae, d_out]`, `b_enc`,
  `b_dec`, `threshold`, transcoders' `affine_skip_connection [d_in, d_out]` (SAELens
  gemma_3_sae_huggingface_loader), and `config.json` with `hf_hook_point_in`, `hf_hook_point_out`,
  `width`, `model_name`, `architecture: "jump_relu"`, `l0`, `affine_connection`, `type` (a
  published google/gemma-scope-2-4b-pt resid_post config, quoted verbatim in a public repo).
- Gemma Scope 2 CLT / crosscoder: `clt/width_W_l0_X[_affine]/params_layer_{i}.safetensors`, one
  file per layer with `w_enc [d_model, d_sae_layer]`, `b_enc`, `threshold [d_sae_layer]`, `w_dec
  [d_sae_layer, n_layers, d_model]`, `b_dec [d_model]`, `affine_skip_connection [d_model,
  d_model]` (Gemma Scope 2 tutorial loader and a shape-inspection script).
The HF cache layout is huggingface_hub's: `models--{owner}--{name}/refs/main` (a commit hash) and
`snapshots/{hash}/…`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

REVISION = "0123456789abcdef0123456789abcdef01234567"
HF_HOOK = {"resid_post": "model.layers.{L}.output", "attn_z": "model.layers.{L}.self_attn.o_proj.input",
           "mlp_in": "model.layers.{L}.pre_feedforward_layernorm.output",
           "mlp_out": "model.layers.{L}.post_feedforward_layernorm.output"}  # fmt: skip


def snapshot(cache: Path, repo: str) -> Path:
    """The snapshot folder of ``repo`` in the HF cache ``cache`` (refs/main written)."""
    base = cache / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(REVISION)
    snap = base / "snapshots" / REVISION
    snap.mkdir(parents=True, exist_ok=True)
    return snap


def jumprelu_params(rng: np.random.Generator, d_in: int, d_sae: int, d_out: int | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """Random weights whose JumpReLU fires on some but not all inputs (θ around the pre-act scale)."""
    d_out = d_in if d_out is None else d_out
    f32 = np.float32
    return {"w_enc": (rng.normal(size=(d_in, d_sae)) / np.sqrt(d_in)).astype(f32),
            "b_enc": (0.1 * rng.normal(size=d_sae)).astype(f32),
            "w_dec": (rng.normal(size=(d_sae, d_out)) / np.sqrt(d_sae)).astype(f32),
            "b_dec": (0.1 * rng.normal(size=d_out)).astype(f32),
            "threshold": rng.uniform(0.05, 0.5, size=d_sae).astype(f32)}  # fmt: skip


def write_gs2(snap: Path, folder: str, params: dict[str, np.ndarray], *, kind: str,
              out_kind: str | None, layer: int, model: str, l0: int) -> Path:  # fmt: skip
    path = snap / folder
    path.mkdir(parents=True)
    save_file(params, str(path / "params.safetensors"))
    hook_in = HF_HOOK[kind].format(L=layer)
    config = {"hf_hook_point_in": hook_in,
              "hf_hook_point_out": HF_HOOK[out_kind].format(L=layer) if out_kind else hook_in,
              "width": int(params["w_enc"].shape[1]), "model_name": model,
              "architecture": "jump_relu", "l0": l0,
              "affine_connection": "affine_skip_connection" in params,
              "type": "transcoder" if out_kind else "sae"}  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    return path


def write_gs1(
    snap: Path, folder: str, params: dict[str, np.ndarray], *, lower: bool = False
) -> Path:
    path = snap / folder
    path.mkdir(parents=True)
    names = {"w_enc": "w_enc" if lower else "W_enc", "w_dec": "w_dec" if lower else "W_dec"}
    np.savez(path / "params.npz", **{names.get(k, k): v for k, v in params.items()})  # type: ignore[arg-type]
    return path


def write_gs2_multilayer(snap: Path, folder: str, per_layer: list[dict[str, np.ndarray]]) -> Path:
    path = snap / folder
    path.mkdir(parents=True)
    for i, params in enumerate(per_layer):
        save_file(params, str(path / f"params_layer_{i}.safetensors"))
    return path


def numpy_encode(params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Gemma Scope's JumpReLU straight from the file's arrays: relu(z)·1[z > θ], z = x·W + b."""
    w = params.get("w_enc", params.get("W_enc"))
    z = x.astype(np.float64) @ w.astype(np.float64) + params["b_enc"]
    return np.maximum(z, 0) * (z > params["threshold"])
