"""Gemma Scope 2 cross-layer transcoders (CLTs) and multi-layer crosscoders: one params file per layer.

Layout (Gemma Scope 2's tutorial loader, which stacks the files along a new leading axis, and a
published shape dump): ``<folder>/params_layer_{i}.safetensors`` for i = 0 … n−1, each holding

- ``w_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``threshold [d_sae]``: layer i's own encoder;
- ``w_dec [d_sae, n, d_out]``: layer i's latents decode into every layer (CLTs are causal by their
  weights, not by masking);
- ``b_dec [d_out]``: the decoder bias of *output* layer i;
- ``affine_skip_connection [d_in, d_out]`` (``_affine`` folders): layer i's input to its output.

For a CLT, layer i reads ``pre_feedforward_layernorm.output`` (``mlp_in``) and writes
``post_feedforward_layernorm.output`` (``mlp_out``) of the model's layer i; a crosscoder reads and
reconstructs the residual stream at its listed layers (e.g. 7, 13, 17, 22). With ``x [..., n, d_in]``:
``f = relu(z)·1[z > θ]``, ``z[l] = x[l] @ w_enc[l] + b_enc[l]``; ``y[m] = Σ_l f[l] @ w_dec[l, :, m]
+ b_dec[m] (+ x[m] @ skip[m])``. The config.json of these folders is not relied on (its keys are
not documented where we could read them); shapes come from the tensors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from lmscope.errors import SAEError

_FILE = re.compile(r"params_layer_(\d+)\.safetensors")


@dataclass
class MultiLayerSAE:
    """A CLT or crosscoder: tensors stacked over its ``n`` layers (leading axis)."""

    w_enc: Tensor  # [n, d_in, d_sae]
    b_enc: Tensor  # [n, d_sae]
    threshold: Tensor  # [n, d_sae]
    w_dec: Tensor  # [n, d_sae, n, d_out]
    b_dec: Tensor  # [n, d_out]
    skip: Tensor | None = None  # [n, d_in, d_out]

    @property
    def n_layers(self) -> int:
        return int(self.w_enc.shape[0])

    def encode(self, x: Tensor) -> Tensor:
        """``x [..., n, d_in]`` → latents ``[..., n, d_sae]``."""
        z = torch.einsum("...ld,lds->...ls", x, self.w_enc) + self.b_enc
        return z.relu() * (z > self.threshold).to(z.dtype)

    def decode(self, f: Tensor) -> Tensor:
        """Latents ``[..., n, d_sae]`` → every layer's output ``[..., n, d_out]``."""
        return torch.einsum("...ls,lsmd->...md", f, self.w_dec) + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        y = self.decode(self.encode(x))
        if self.skip is not None:
            y = y + torch.einsum("...ld,lde->...le", x, self.skip)
        return y

    __call__ = forward


def load_multilayer(folder: str | Path) -> MultiLayerSAE:
    """Read a Gemma Scope 2 ``clt/…`` or ``crosscoder/…`` folder (every params_layer_i file)."""
    p = Path(folder)
    files = sorted(((int(m[1]), f) for f in p.glob("params_layer_*.safetensors")
                    if (m := _FILE.fullmatch(f.name))), key=lambda t: t[0])  # fmt: skip
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
    need = {"w_enc", "b_enc", "threshold", "w_dec", "b_dec"}
    if not need <= keys or any(set(q) != keys for q in per):
        raise SAEError(f"{p}: each params_layer file needs {sorted(need)} (same keys in all)")
    n = len(per)
    if per[0]["w_dec"].ndim != 3 or per[0]["w_dec"].shape[1] != n:
        raise SAEError(f"{p}: w_dec is {tuple(per[0]['w_dec'].shape)}, expected [d_sae, {n}, d_out]")  # fmt: skip
    st = {k: torch.stack([q[k].float() for q in per]) for k in keys}
    return MultiLayerSAE(st["w_enc"], st["b_enc"], st["threshold"], st["w_dec"], st["b_dec"],
                         st.get("affine_skip_connection"))  # fmt: skip


def save_multilayer(sae: MultiLayerSAE, folder: str | Path) -> Path:
    """Write ``sae`` back as Gemma Scope 2 files (one params_layer_i.safetensors per layer)."""
    from lmscope.sae.formats import _atomic_dir

    path = Path(folder)
    with _atomic_dir(path) as tmp:
        for i in range(sae.n_layers):
            d = {"w_enc": sae.w_enc[i], "b_enc": sae.b_enc[i], "threshold": sae.threshold[i],
                 "w_dec": sae.w_dec[i], "b_dec": sae.b_dec[i]}  # fmt: skip
            if sae.skip is not None:
                d["affine_skip_connection"] = sae.skip[i]
            save_file({k: v.contiguous() for k, v in d.items()}, str(tmp / f"params_layer_{i}.safetensors"))  # fmt: skip
    return path
