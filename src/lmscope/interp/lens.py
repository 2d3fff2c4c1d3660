"""What a latent's decoder direction does: its logit lens, and the latents whose directions it matches.

Logit lens. A decoder row `v` is a direction in the site's space; mapped into the residual stream
(identity for residual-basis sites, through `o_proj` for `attn_z`), it reaches the logits through the
final norm and the unembedding. RMSNorm (Gemma, Llama) computes `x / rms(x) · g` (Gemma's `g` is
`1 + weight`): dividing by `rms(x)` scales every logit alike, so the ranking of tokens that adding
`v` raises or lowers is that of `(v ⊙ g) @ W_U`, and that is what is stored (the first-order effect
of adding `v` to a residual stream of RMS 1, ignoring the small change of `rms(x)` itself). `g` is
read by running the norm on a vector of ones (`rms = 1`), so every RMSNorm variant gives its own
gain. LayerNorm (GPT-2) also removes the mean: `((v − mean v) ⊙ w) @ W_U`; its bias shifts all
latents alike and is left out. Gemma 2's final soft-cap is monotonic and is left out too. `mlp_in`
latents live after a norm, not in the residual stream: they get no logit lens.

Neighbours: cosine similarity of decoder rows, within an SAE and to the SAEs of the same site kind one
layer up and down (how a feature evolves through depth). All in chunks of latents, so the
`[d_sae, vocab]` and `[d_sae, d_sae]` products never exist whole.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import cast

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from lmscope.model import SiteModel

RESIDUAL_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
CHUNK = 128


def norm_gain(norm: nn.Module, d: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The per-dimension gain of an RMSNorm-style module: its output on a vector of RMS 1."""
    with torch.no_grad():
        return cast(Tensor, norm(torch.ones(1, d, device=device, dtype=dtype)))[0].float()


def residual_directions(model: SiteModel, kind: str, layer: int, w_dec: Tensor) -> Tensor | None:
    """Decoder rows [d_sae, d_site] as directions in the residual stream, or None for `mlp_in`."""
    if kind in RESIDUAL_KINDS:
        return w_dec
    if kind != "attn_z":
        return None
    block = model.layers[layer]
    o_proj = block.get_submodule(model.adapter.o_proj)
    weight = cast(Tensor, o_proj.weight).float()
    # nn.Linear stores [out, in], GPT-2's Conv1D [in, out]; o_proj's bias moves no direction
    out = w_dec.float() @ (weight if isinstance(o_proj, Conv1D) else weight.T)
    attn_out = block.get_submodule(model.adapter.attn_out)
    if type(attn_out).__name__.endswith("RMSNorm"):  # Gemma: attn_out = post_attention_norm(o_proj)
        out = out * norm_gain(attn_out, out.shape[1], out.device, out.dtype)
    return out


def lens_matrix(model: SiteModel, directions: Tensor) -> Tensor:
    """Directions [n, d_model] → what multiplies W_U: `v ⊙ g` (RMSNorm) or `(v − mean v) ⊙ w` (LayerNorm)."""
    norm = model.final_norm
    if isinstance(norm, nn.LayerNorm):
        centred = directions - directions.mean(dim=1, keepdim=True)
        return centred * norm.weight.detach().float() if norm.weight is not None else centred
    return directions * norm_gain(norm, directions.shape[1], directions.device, directions.dtype)


# Vocabularies at least this large pick candidates in bf16, then rescore them exactly in fp32.
APPROX_MIN_VOCAB = 32_768
CANDIDATES = 8  # candidates per list, as a multiple of n


@functools.cache
def _cpu_has_bf16_units() -> bool:
    """AVX512-BF16 or AMX on this CPU (Linux /proc/cpuinfo flags). Without them torch emulates bf16
    matmuls: on this project's AVX2-only 2-core VM [256, 640] @ [640, 262,144] took 10.6 s in fp32
    and over 90 s in bf16 (one thread), and the quick build's logit lens ran at ~60 s per SAE."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_is_fast(device: torch.device) -> bool:
    """Whether a bf16 product is worth taking on `device` (CUDA, or a CPU with bf16 units)."""
    return device.type == "cuda" or (device.type == "cpu" and _cpu_has_bf16_units())


def _exact(m: Tensor, w_u_t: Tensor, idx: Tensor) -> Tensor:
    """Exact logits `m @ W_U` at the token ids `idx` [c, k] only: [c, k]."""
    return torch.einsum("cd,ckd->ck", m, w_u_t[idx])


@torch.no_grad()
def logit_lens(
    model: SiteModel, directions: Tensor, n: int, *, approx: bool | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(up values, up token ids, down values, down token ids), each [d_sae, n]: the tokens whose
    logits each direction raises most (values descending) and lowers most (values ascending).

    With a large vocabulary (Gemma's 262k tokens) the `[latents, vocab]` product is most of
    `interpret`'s time, so by default (``approx=None``) vocabularies of ``APPROX_MIN_VOCAB`` or more
    take the product in bf16 where bf16 is fast (CUDA, CPUs with bf16 units; elsewhere it is
    emulated, ~9× slower than fp32, and the exact fp32 product is taken) only to pick
    ``CANDIDATES × n`` candidates per list, and the candidates are then scored exactly in fp32:
    the values are exact, and the lists are exact unless a true top-n token ranks below
    ``CANDIDATES × n`` in bf16, which a 2⁻⁸ relative error does not do at these gaps.
    """
    w_u = model.unembedding.detach().float()
    vocab = w_u.shape[1]
    n = min(n, vocab)
    if approx is None:
        approx = vocab >= APPROX_MIN_VOCAB and bf16_is_fast(w_u.device)
    k = min(vocab, CANDIDATES * n)
    w_lo = w_u.to(torch.bfloat16) if approx else None
    w_u_t = w_u.T.contiguous() if approx else None
    parts: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    for start in range(0, len(directions), CHUNK):
        m = lens_matrix(model, directions[start : start + CHUNK].to(w_u.device))
        if w_lo is None or w_u_t is None:
            logits = m @ w_u
            up, down = logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)
            parts.append((up.values, up.indices, down.values, down.indices))
            continue
        rough = m.to(torch.bfloat16) @ w_lo
        lists = []
        for largest in (True, False):
            cand = rough.topk(k, dim=1, largest=largest).indices
            best = _exact(m, w_u_t, cand).topk(n, dim=1, largest=largest)
            lists += [best.values, cand.gather(1, best.indices)]
        parts.append((lists[0], lists[1], lists[2], lists[3]))
    up_v, up_i, down_v, down_i = (torch.cat(column) for column in zip(*parts, strict=True))
    return up_v, up_i, down_v, down_i


@torch.no_grad()
def nearest(w: Tensor, other: Tensor | None, n: int) -> tuple[Tensor, Tensor]:
    """(cosines, indices) [d_sae, n] of the rows of `other` closest to each row of `w` by cosine;
    `other=None` searches `w` itself, leaving each row out of its own list."""
    a = nn.functional.normalize(w.float(), dim=1)
    b = a if other is None else nn.functional.normalize(other.float().to(a.device), dim=1)
    n = min(n, len(b) - (1 if other is None else 0))
    values: list[Tensor] = []
    indices: list[Tensor] = []
    for start in range(0, len(a), CHUNK):
        cos = a[start : start + CHUNK] @ b.T
        if other is None:
            rows = torch.arange(len(cos), device=cos.device)
            cos[rows, rows + start] = float("-inf")
        top = cos.topk(n, dim=1)
        values.append(top.values)
        indices.append(top.indices)
    return torch.cat(values), torch.cat(indices)
