"""Keeping JumpReLU latents alive: an auxiliary loss on the latents that stopped firing.

A JumpReLU latent whose pre-activation stays below θ − ε/2 on every row gets no gradient at all:
the MSE reaches z only through H(z − θ) and θ only inside the ε-window, and the L0 term only
raises θ. So once dead it stays dead (half of a 4,096-latent Gemma SAE in 1M tokens). Two cures,
both applied to the *dead* latents only (not fired for ``dead_after_tokens`` rows), which keeps
them cheap beside the sparse kernel (a [B, n_dead] problem, not [B, W]):

- ``auxk`` (Gao et al. 2024, the TopK trainers' AuxK): the dead latents' top ``k_aux``
  pre-activations per row (ReLU'd) reconstruct the live SAE's residual ``target − x̂``; it moves
  their encoder and decoder towards what the live latents miss, so a revived latent is useful;
- ``preact`` (Anthropic's pre-activation loss, SAELens ``pre_act_loss_coefficient``):
  ``Σ_i relu(θ_i − z_i)·‖W_dec,i‖`` pushes each dead latent's pre-activation up towards θ and
  θ down towards it.

Gradients are computed on detached copies of the dead columns and added into the parameters'
``.grad`` (the decoder rows' part parallel to the row removed, as for the main loss), so the same
code serves the autograd path and the sparse kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmscope.sae import SAE
from lmscope.train.config import DEAD_LOSSES


def add_dead_latent_grads(
    sae: SAE,
    x: Tensor,
    residual: Tensor,
    dead: Tensor,
    *,
    kind: str,
    coeff: float,
    k_aux: int,
) -> float:
    """Add ``coeff``·(``kind`` loss on the ``dead`` latents) to the SAE's ``.grad``; return it.

    ``x``: the SAE's (normalised) input batch; ``residual``: ``target − x̂`` of the main loss (used
    by ``auxk``); ``dead``: bool [d_sae]. Parameters without a ``.grad`` yet get one.
    """
    if kind == "none" or coeff <= 0:
        return 0.0
    idx = dead.nonzero().squeeze(1)
    if idx.numel() == 0:
        return 0.0
    with torch.no_grad():
        xc = x - sae.b_dec if sae.cfg.apply_b_dec_to_input else x
    w_enc = sae.W_enc.detach()[:, idx].requires_grad_()
    b_enc = sae.b_enc.detach()[idx].requires_grad_()
    w_dec = sae.W_dec.detach()[idx].requires_grad_()
    z = xc @ w_enc + b_enc  # [B, n_dead]
    theta: Tensor | None = None
    if kind == "auxk":
        vals, j = z.topk(min(k_aux, idx.numel()), dim=1)
        f = torch.zeros_like(z).scatter(1, j, vals.relu())
        loss = (f @ w_dec - residual).pow(2).sum(-1).mean()
    elif kind == "preact":
        theta = sae.get_parameter("threshold").detach()[idx].requires_grad_()
        norms = w_dec.norm(dim=1)
        loss = ((theta - z).relu() * norms).sum(-1).mean()
    else:
        raise ValueError(f"unknown dead-latent loss {kind!r}; valid: {', '.join(DEAD_LOSSES)}")
    (coeff * loss).backward()
    assert w_enc.grad is not None and b_enc.grad is not None
    with torch.no_grad():
        _grad(sae.W_enc).index_add_(1, idx, w_enc.grad)
        _grad(sae.b_enc).index_add_(0, idx, b_enc.grad)
        if theta is not None and theta.grad is not None:  # it lowers θ too (Anthropic's form)
            _grad(sae.get_parameter("threshold")).index_add_(0, idx, theta.grad)
        if w_dec.grad is not None:  # tangent part only: rows stay unit-norm
            g, w = w_dec.grad, w_dec.detach()
            g -= (g * w).sum(1, keepdim=True) / w.pow(2).sum(1, keepdim=True).clamp_min(1e-12) * w
            _grad(sae.W_dec).index_add_(0, idx, g)
    return float(loss.detach())


def _grad(p: Tensor) -> Tensor:
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return p.grad
