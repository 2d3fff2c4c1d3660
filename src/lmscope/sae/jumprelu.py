"""JumpReLU SAE (Gemma Scope): ``f = z·H(z − θ)``, loss = squared error + λ·L0, STE for θ.

H has zero derivative almost everywhere, so θ learns through straight-through pseudo-derivatives
(Rajamanoharan et al. 2024): the Dirac delta in ``∂/∂θ`` is replaced by a rectangle-kernel density
estimate ``(1/ε)·K((z − θ)/ε)``, ``K(u) = 1[|u| < ½]``:
- JumpReLU w.r.t. θ: ``−(θ/ε)·K((z−θ)/ε)``; w.r.t. z: ``H(z − θ)`` (the ordinary derivative);
- the L0 step H(z − θ) w.r.t. θ: ``−(1/ε)·K((z−θ)/ε)``; w.r.t. z: nothing (the L0 term only moves θ).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

from lmscope.errors import SAEError
from lmscope.sae.base import (
    SAE,
    THRESHOLD_INIT,
    THRESHOLD_MIN,
    LossOutput,
    SAEConfig,
    register,
    squared_error,
)


def rectangle(u: Tensor) -> Tensor:
    """The rectangle kernel ``K(u) = 1[|u| < ½]``."""
    return (u.abs() < 0.5).to(u.dtype)


def _theta_grad(grad_out: Tensor, theta: Tensor) -> Tensor:
    # θ broadcasts over leading (batch) dims: sum its gradient back to [d_sae]
    return grad_out.reshape(-1, theta.shape[-1]).sum(0)


class JumpReLUFunction(torch.autograd.Function):
    """``z·H(z − θ)`` with the straight-through θ pseudo-derivative ``−(θ/ε)·K((z−θ)/ε)``."""

    @staticmethod
    def forward(ctx: FunctionCtx, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth  # type: ignore[attr-defined]
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, Tensor, None]:
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = grad_out * (z > theta).to(z.dtype)
        grad_theta = -(theta / eps) * rectangle((z - theta) / eps) * grad_out
        return grad_z, _theta_grad(grad_theta, theta), None


class StepFunction(torch.autograd.Function):
    """``H(z − θ)`` for the L0 term: θ pseudo-derivative ``−(1/ε)·K((z−θ)/ε)``, none to z."""

    @staticmethod
    def forward(ctx: FunctionCtx, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth  # type: ignore[attr-defined]
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, Tensor, None]:
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = -(1.0 / eps) * rectangle((z - theta) / eps) * grad_out
        return torch.zeros_like(z), _theta_grad(grad_theta, theta), None


def jumprelu(z: Tensor, theta: Tensor, bandwidth: float = 0.001) -> Tensor:
    return JumpReLUFunction.apply(z, theta, bandwidth)  # type: ignore[no-any-return]


def step(z: Tensor, theta: Tensor, bandwidth: float = 0.001) -> Tensor:
    return StepFunction.apply(z, theta, bandwidth)  # type: ignore[no-any-return]


def sparsity_penalty(l0: Tensor, sparsity_coeff: float, target_l0: float | None) -> Tensor:
    """``λ·L0``, or with a target L0* (Gemma Scope 2 style) the quadratic ``λ·(L0/L0* − 1)²``.

    Relative to L0* so that one λ means the same pull whatever the target.
    """
    if target_l0 is None:
        return sparsity_coeff * l0
    if target_l0 <= 0:
        raise SAEError(f"target_l0 must be positive, got {target_l0}")
    return sparsity_coeff * (l0 / target_l0 - 1.0).pow(2)


def jumprelu_loss(
    sae: SAE,
    x: Tensor,
    target: Tensor,
    threshold: Tensor,
    *,
    sparsity_coeff: float,
    bandwidth: float,
    target_l0: float | None,
    skip: Tensor | None = None,
) -> LossOutput:
    """Shared by the JumpReLU SAE and transcoder: squared error + sparsity, STE through θ."""
    z = sae.pre_acts(x)
    f = jumprelu(z, threshold, bandwidth)
    x_hat = sae.decode(f)
    if skip is not None:
        x_hat = x_hat + skip
    mse = squared_error(x_hat, target)
    l0 = step(z, threshold, bandwidth).sum(-1).mean()
    loss = mse + sparsity_penalty(l0, sparsity_coeff, target_l0)
    return LossOutput(loss=loss, mse=mse, l0=l0, f=f, x_hat=x_hat)


@register
class JumpReLUSAE(SAE):
    """Gemma Scope's SAE. ``threshold`` is θ itself (not log θ); ``after_step`` floors it at
    ``THRESHOLD_MIN`` so it stays positive."""

    architecture = "jumprelu"

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.threshold = nn.Parameter(
            torch.full((cfg.d_sae,), THRESHOLD_INIT, dtype=cfg.torch_dtype)
        )

    def encode(self, x: Tensor) -> Tensor:
        # relu(z)·1[z > θ] (Gemma Scope's form) equals z·H(z − θ) for θ ≥ 0 and stays
        # non-negative for imported thresholds that are not
        z = self.pre_acts(x)
        return z.relu() * (z > self.threshold).to(z.dtype)

    def training_loss(
        self,
        x: Tensor,
        *,
        sparsity_coeff: float,
        bandwidth: float = 0.001,
        target: Tensor | None = None,
        target_l0: float | None = None,
    ) -> LossOutput:
        return jumprelu_loss(
            self,
            x,
            x if target is None else target,
            self.threshold,
            sparsity_coeff=sparsity_coeff,
            bandwidth=bandwidth,
            target_l0=target_l0,
        )

    @torch.no_grad()
    def clamp_threshold(self, minimum: float = THRESHOLD_MIN) -> None:
        self.threshold.clamp_(min=minimum)

    @torch.no_grad()
    def after_step(self) -> None:
        self.renormalise_decoder()
        self.clamp_threshold()
