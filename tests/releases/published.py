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
- Gemma Scope 2 CLT / crosscoder: `clt/width_W_l0_X[_affine]/params_layer_{i}.safetensors` and
  `crosscoder/layer_7_13_17_22_width_W_l0_X/params_layer_{i}.safetensors`, one file per layer
  (i = 0 … n−1, also for the crosscoder's layers 7, 13, 17, 22) with `w_enc [d_model,
  d_sae_layer]`, `b_enc`, `threshold [d_sae_layer]`, `w_dec [d_sae_layer, n_layers, d_model]`,
  `b_dec [d_model]`, `affine_skip_connection [d_model, d_model]` (Gemma Scope 2 tutorial loader,
  circuit-tracer's load_gemma_scope_2_clt and a shape-inspection script; W counts every layer's
  latents: 262k = 26 × 10,080 on Gemma 3 1B). Each folder also has a config.json whose keys we
  could not read anywhere public: `multilayer_config` writes the single-layer family's keys with
  one hook point per layer, an assumption; lmscope keeps whatever the file holds verbatim and
  checks the hook points only when they come as such a list.
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


def write_gs2_multilayer(snap: Path, folder: str, per_layer: list[dict[str, np.ndarray]],
                         config: dict | None = None) -> Path:  # fmt: skip
    path = snap / folder
    path.mkdir(parents=True)
    for i, params in enumerate(per_layer):
        save_file(params, str(path / f"params_layer_{i}.safetensors"))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return path


def multilayer_params(rng: np.random.Generator, n: int, d: int, w: int, affine: bool) -> list[dict[str, np.ndarray]]:  # fmt: skip
    """Per-layer files of an n-layer CLT / crosscoder (every decoder slice random, as the files
    hold all n output layers), with JumpReLUs that fire on some inputs."""
    out = []
    for _ in range(n):
        p = {"w_enc": rng.normal(size=(d, w)) / np.sqrt(d), "b_enc": 0.1 * rng.normal(size=w),
             "threshold": rng.uniform(0.05, 0.4, size=w),
             "w_dec": rng.normal(size=(w, n, d)) / np.sqrt(w * n), "b_dec": 0.1 * rng.normal(size=d)}  # fmt: skip
        if affine:
            p["affine_skip_connection"] = 0.1 * rng.normal(size=(d, d))
        out.append({k: v.astype(np.float32) for k, v in p.items()})
    return out


def multilayer_config(kind: str, out_kind: str, layers: list[int], width: int, model: str,
                      l0: int, affine: bool, type_: str) -> dict:  # fmt: skip
    """A CLT / crosscoder config.json: the single-layer keys, one hook point per layer (assumed)."""
    return {"hf_hook_point_in": [HF_HOOK[kind].format(L=la) for la in layers],
            "hf_hook_point_out": [HF_HOOK[out_kind].format(L=la) for la in layers],
            "width": width, "model_name": model, "architecture": "jump_relu", "l0": l0,
            "affine_connection": affine, "type": type_}  # fmt: skip


def numpy_multilayer(per: list[dict[str, np.ndarray]], x: np.ndarray, causal: bool) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Latents [T, n, w] and outputs [T, n, d] straight from the files' arrays, x [T, n, d]:
    layer l encodes its own input; output m sums the decoders of layers l ≤ m (CLT) or all."""
    n = len(per)
    x = x.astype(np.float64)
    f = np.stack([numpy_encode(per[la], x[:, la]) for la in range(n)], 1)
    ys = []
    for m in range(n):
        src = range(m + 1) if causal else range(n)
        y = per[m]["b_dec"] + sum(
            f[:, la] @ per[la]["w_dec"][:, m].astype(np.float64) for la in src
        )
        if "affine_skip_connection" in per[m]:
            y = y + x[:, m] @ per[m]["affine_skip_connection"]
        ys.append(y)
    return f, np.stack(ys, 1)


def numpy_encode(params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Gemma Scope's JumpReLU straight from the file's arrays: relu(z)·1[z > θ], z = x·W + b."""
    w = params.get("w_enc", params.get("W_enc"))
    z = x.astype(np.float64) @ w.astype(np.float64) + params["b_enc"]
    return np.maximum(z, 0) * (z > params["threshold"])
