"""Sparse-aware JumpReLU training step: the fast path beside the plain autograd loss.

The plain reference is `SAE.training_loss` (lmscope.sae.jumprelu); `tests/train/test_kernels.py`
holds the two equal. With ~65 of 16,384 latents firing per token, autograd spends five dense
[B, d] x [d, W] matmuls on a step whose only necessarily dense part is the encoder forward. Here
everything after it touches only the *candidate* entries of z (active, or inside the θ-window):

    encoder   u = (x − b_dec) W_enc + b_enc − θ     dense, chunked over latents, thresholded hot
    decoder   x̂ = f W_dec + b_dec                   embedding_bag over active W_dec rows
    grad f    ∂L/∂x̂ · W_decᵀ at candidates          sampled matmul (SDDMM), no nnz × d gather
    grad W    fᵀ ∂L/∂x̂ and Gᵀ (x − b_dec)           CSR spmm over the latent-major pattern

Candidates are kept latent-major (sorted by latent, then row) because that order falls out of
the chunked encoder for free and is exactly the CSR layout of fᵀ and Gᵀ that the weight gradients
need. No step materialises the dense [B, W] z or an `nnz × d` gather (DESIGN.md, speed notes).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# Entries of z computed per slab of the chunked encoder when `chunk` is not given.
_SLAB_ENTRIES = 2**24
# bf16 unit roundoff; the bf16 encoder's error bound is a small multiple of it (see _candidates).
_BF16_U = 2.0**-9


@dataclass(frozen=True)
class StepOut:
    """Loss terms, gradients of every parameter and per-latent fire counts of one batch."""

    loss: Tensor  # scalar: mse + λ·l0
    mse: Tensor  # scalar: mean over rows of ‖x − x̂‖²
    l0: Tensor  # scalar: mean number of active latents per row
    grad_W_enc: Tensor  # [d_in, d_sae]
    grad_b_enc: Tensor  # [d_sae]
    grad_W_dec: Tensor  # [d_sae, d_out]
    grad_b_dec: Tensor  # [d_out]
    grad_threshold: Tensor  # [d_sae]
    fire_counts: Tensor  # [d_sae] int64: rows of the batch on which each latent fired
    x_hat: Tensor | None = None  # [B, d_out] the reconstruction (the dead-latent loss's residual)

    def grads(self) -> dict[str, Tensor]:
        """Gradients keyed by parameter name, e.g. `p.grad = out.grads()[name]`."""
        return {
            "W_enc": self.grad_W_enc,
            "b_enc": self.grad_b_enc,
            "W_dec": self.grad_W_dec,
            "b_dec": self.grad_b_dec,
            "threshold": self.grad_threshold,
        }


@dataclass(frozen=True)
class _Candidates:
    """Entries of z with z − θ > −ε/2, latent-major: `crow` is the CSR row pointer of zᵀ."""

    crow: Tensor  # [W + 1]
    lat: Tensor  # [nnz] latent of each entry (non-decreasing)
    row: Tensor  # [nnz] batch row of each entry (increasing within a latent)
    u: Tensor  # [nnz] z − θ


@torch.no_grad()
def jumprelu_step_grads(
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    threshold: Tensor,
    x: Tensor,
    lam: float,
    eps: float = 1e-3,
    *,
    chunk: int | None = None,
    encoder_dtype: torch.dtype | None = None,
    into: StepOut | None = None,
) -> StepOut:
    """Loss and gradients of a JumpReLU SAE batch, equal to autograd's but sparse-aware.

    loss = mean_b ‖x_b − x̂_b‖² + lam · mean_b Σ_j H(z_bj − θ_j), with the Gemma Scope
    rectangle-kernel pseudo-derivatives of bandwidth `eps` for θ. `chunk` latents of z are
    computed and thresholded at a time (default: a 2^24-entry slab, 64 MB in fp32; a bigger
    slab means fewer, larger ops, which suits a shared CPU). `encoder_dtype=torch.bfloat16`
    runs the encoder matmul in bf16 to *select* candidates (with a provable error margin) and
    recomputes their values in the parameters' dtype, so results stay those of full precision.
    `into` (the previous step's output) has its weight gradients overwritten instead of fresh
    ones allocated: first-touching 2 × 40 MB of new memory costs ~50 ms a step on this CPU.

        out = None
        for x in batches:
            out = jumprelu_step_grads(W_enc, b_enc, W_dec, b_dec, theta, x, lam=1e-3, into=out)
    """
    B = x.shape[0]
    W = W_enc.shape[1]
    xc = x - b_dec
    chunk = chunk or max(1, _SLAB_ENTRIES // B)
    cand = _candidates(xc, W_enc, b_enc - threshold, eps / 2, chunk, encoder_dtype)
    lat, u = cand.lat, cand.u

    active = u > 0
    f = torch.where(active, u + threshold[lat], 0.0)
    x_hat = _decode(cand, f, W_dec, b_dec, B)
    err = x_hat - x
    mse = err.square().sum() / B
    l0 = active.sum().to(x.dtype) / B
    d_xhat = err.mul_(2.0 / B)

    # ∂L/∂f at candidates only: g_f[j, r] = W_dec[j] · d_xhat[r]. One pattern (zᵀ's candidates)
    # serves f, G and this SDDMM; inactive window entries just carry zeros in f and G.
    fT = _csr(cand, f, B)
    g_f = torch.sparse.sampled_addmm(fT, W_dec, d_xhat.t(), beta=0.0).values()
    g_z = torch.where(active, g_f, 0.0)  # ∂f/∂z = H(z − θ); the L0 term sends nothing to z

    # θ gets the rectangle-kernel pseudo-derivatives of both f and the L0 step on window entries.
    window = u < eps / 2
    g_theta_entry = -(threshold[lat] / eps) * g_f - lam / (B * eps)
    grad_threshold = torch.zeros_like(threshold).index_add_(0, lat[window], g_theta_entry[window])
    grad_b_enc = torch.zeros_like(b_enc).index_add_(0, lat, g_z)
    # b_dec enters twice: added to x̂ and subtracted from x before the encoder.
    grad_b_dec = d_xhat.sum(0) - W_enc @ grad_b_enc

    # Weight gradients: CSR × dense into reused buffers. grad_W_encᵀ = Gᵀ xc comes out [W, d]; it
    # passes through grad_W_dec's buffer (same shape, d_in = d_out) on its way to [d, W].
    grad_W_dec = torch.empty_like(W_dec) if into is None else into.grad_W_dec
    grad_W_enc = torch.empty_like(W_enc) if into is None else into.grad_W_enc
    grad_W_enc.copy_(_spmm_into(grad_W_dec, _csr(cand, g_z, B), xc).t())
    _spmm_into(grad_W_dec, fT, d_xhat)

    return StepOut(
        loss=mse + lam * l0,
        mse=mse,
        l0=l0,
        grad_W_enc=grad_W_enc,
        grad_b_enc=grad_b_enc,
        grad_W_dec=grad_W_dec,
        grad_b_dec=grad_b_dec,
        grad_threshold=grad_threshold,
        fire_counts=torch.bincount(lat[active], minlength=W),
        x_hat=x_hat,
    )


def _spmm_into(out: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """out = a @ b for CSR `a`. `torch.sparse.mm` zero-fills a fresh result and copies it onto
    itself before MKL runs (~2x the MKL time here); addmm with beta=0 into `out` skips both."""
    return torch.addmm(out, a, b, beta=0.0, out=out)


def _candidates(
    xc: Tensor,
    W_enc: Tensor,
    shift: Tensor,
    half_width: float,
    chunk: int,
    encoder_dtype: torch.dtype | None,
) -> _Candidates:
    """Entries with u = xc W_enc + shift > −half_width, found a chunk of latents at a time.

    Computing zᵀ (latents × rows) makes the nonzero scan come out latent-major, and one reused
    slab buffer means the dense [B, W] tensor is never allocated (a fresh 256 MB tensor costs
    page faults every step) and the compare reads what the matmul just wrote.
    """
    B, W = xc.shape[0], W_enc.shape[1]
    low = -half_width - shift  # u > −h  ⇔  (xc W_enc)_rj > −h − shift_j
    lowp = encoder_dtype is not None and encoder_dtype != W_enc.dtype
    W_encT, xcT = W_enc.t(), xc.t()
    if lowp:
        # Rounding x and W to bf16 and the product back errs by at most ~3u·Σ|x_i w_i|, which is
        # ≤ 3u·‖x_r‖·‖w_j‖: widen the cut by 4u·max‖x_r‖·‖w_j‖ and re-filter exact values below.
        W_encT = W_encT.contiguous()  # the exact recompute (an SDDMM) wants rows of W_encᵀ
        col_norms = torch.linalg.vector_norm(W_encT, dim=1)  # fast along contiguous rows
        low = low - 4 * _BF16_U * torch.linalg.vector_norm(xc, dim=1).max() * col_norms
        # Compare in bf16 too (a mixed compare copies each slab to fp32); rounding `low` to
        # bf16 moves it by ≤ u·|low|, so lower it by 2u·|low| first to stay on the safe side.
        low = (low - 2 * _BF16_U * low.abs()).to(encoder_dtype)
        W_encT_mm, xcT_mm = W_encT.to(encoder_dtype), xcT.to(encoder_dtype)
    else:
        W_encT_mm, xcT_mm = W_encT, xcT

    flats, values = [], []
    buf = torch.empty(min(chunk, W), B, dtype=W_encT_mm.dtype)
    for start in range(0, W, chunk):
        stop = min(start + chunk, W)
        slab = torch.mm(W_encT_mm[start:stop], xcT_mm, out=buf[: stop - start])
        flat = _flat_nonzero(slab > low[start:stop, None])
        flats.append(flat + start * B)
        if not lowp:
            values.append(slab.view(-1)[flat])
    flat = torch.cat(flats)
    lat = flat // B
    row = flat - lat * B
    if lowp:
        # Exact values at the candidates only (an SDDMM over zᵀ's pattern), then the exact cut.
        # Zero values, not empty: sampled_addmm computes 0·values, and garbage NaN survives it.
        pattern = _csr_tensor(_crow(lat, W), row, torch.zeros(lat.numel(), dtype=xc.dtype), (W, B))
        u = torch.sparse.sampled_addmm(pattern, W_encT, xcT, beta=0.0).values() + shift[lat]
        keep = u > -half_width
        lat, row, u = lat[keep], row[keep], u[keep]
    else:
        u = torch.cat(values) + shift[lat]
    crow = _crow(lat, W)
    return _Candidates(crow=crow, lat=lat, row=row, u=u)


def _flat_nonzero(mask: Tensor) -> Tensor:
    """Flat indices of the True entries of a contiguous bool tensor, in order.

    At ~0.5% density most 8-byte words of the mask are zero: scanning int64 words first and
    expanding only the nonzero ones is ~2.5x faster than `nonzero` on the bytes.
    """
    flat = mask.view(-1)
    if flat.numel() % 8:
        return flat.nonzero().squeeze(1)
    words = flat.view(torch.int64).nonzero().squeeze(1)
    word, byte = flat.view(-1, 8)[words].nonzero().unbind(1)
    return words[word] * 8 + byte


def _decode(cand: _Candidates, f: Tensor, W_dec: Tensor, b_dec: Tensor, B: int) -> Tensor:
    """x̂ = f W_dec + b_dec as a per-row weighted sum of W_dec rows (`embedding_bag`).

    embedding_bag wants the entries row-major; a stable sort on int32 keys (a radix sort in
    torch) gets there for less than a CSC spmm with the latent-major pattern costs.
    """
    order = torch.argsort(cand.row.to(torch.int32), stable=True)
    offsets = torch.zeros(B, dtype=torch.long)
    torch.cumsum(torch.bincount(cand.row, minlength=B)[:-1], 0, out=offsets[1:])
    x_hat = F.embedding_bag(
        cand.lat[order], W_dec, offsets, mode="sum", per_sample_weights=f[order]
    )
    return x_hat.add_(b_dec)


def _crow(lat: Tensor, n: int) -> Tensor:
    crow = torch.zeros(n + 1, dtype=torch.long)
    torch.cumsum(torch.bincount(lat, minlength=n), 0, out=crow[1:])
    return crow


def _csr_tensor(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    # Our patterns are valid by construction; CSR being "beta" in torch is not news to a user.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


def _csr(cand: _Candidates, values: Tensor, B: int) -> Tensor:
    """[W, B] CSR matrix with the candidates' pattern (zᵀ's layout) and the given values."""
    return _csr_tensor(cand.crow, cand.row, values, (cand.crow.numel() - 1, B))


# ---- optimiser-side helpers (Gemma Scope: unit-norm decoder rows, no parallel gradient) ------


@torch.no_grad()
def remove_parallel_grads_(W_dec: Tensor, grad: Tensor) -> Tensor:
    """Remove from each row of `grad` its component along the matching row of `W_dec`, in place.

    `einsum` row dots (no [d_sae, d] temporary, unlike `(g * w).sum(1)` or `vecdot`, 3-4x
    faster here) and one in-place `addcmul_`.
    """
    coef = torch.einsum("ij,ij->i", grad, W_dec) / torch.einsum("ij,ij->i", W_dec, W_dec).clamp_min(
        1e-12
    )
    return grad.addcmul_(W_dec, coef.unsqueeze(1), value=-1.0)


@torch.no_grad()
def renormalise_rows_(W_dec: Tensor) -> Tensor:
    """Scale every row of `W_dec` to unit norm, in place."""
    return W_dec.div_(torch.linalg.vector_norm(W_dec, dim=1, keepdim=True).clamp_min(1e-12))
