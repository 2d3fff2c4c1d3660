"""JumpReLU: straight-through pseudo-derivatives equal the derivatives of the kernel-smoothed loss.

Smoothing the Dirac delta in ∂/∂θ with the rectangle kernel K (bandwidth ε) turns the step H(z − θ)
into its smoothed version Hs(z, θ) = ∫_θ^∞ (1/ε)K((z − t)/ε) dt and the JumpReLU z·H(z − θ) into
J(z, θ) = ∫_θ^∞ (t/ε)K((z − t)/ε) dt (the jump at t has height t). Both have closed forms; their
numerical θ-derivatives must match what autograd gets from the custom Functions.
"""

from __future__ import annotations

import torch

from lmscope.sae.base import THRESHOLD_MIN
from lmscope.sae.jumprelu import jumprelu, step

EPS = 0.001


def _window(z: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = z + EPS / 2
    a = torch.minimum(torch.maximum(theta, z - EPS / 2), b)
    return a, b


def smoothed_jumprelu(z: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    a, b = _window(z, theta)
    return (b**2 - a**2) / (2 * EPS)


def smoothed_step(z: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    a, b = _window(z, theta)
    return (b - a) / EPS


def _setup(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    theta = 0.002 + 0.004 * torch.rand(8, generator=g, dtype=torch.float64)
    # many z inside the kernel windows around θ, plus some far away
    z = theta + EPS * (torch.rand(200, 8, generator=g, dtype=torch.float64) - 0.5) * 1.6
    upstream = torch.randn(200, 8, generator=g, dtype=torch.float64)
    return z, theta, upstream


def _numeric_grad(fn, z, theta, upstream, h: float = 1e-8) -> torch.Tensor:  # type: ignore[no-untyped-def]
    grads = torch.zeros_like(theta)
    for j in range(theta.numel()):
        tp, tm = theta.clone(), theta.clone()
        tp[j] += h
        tm[j] -= h
        grads[j] = ((upstream * fn(z, tp)).sum() - (upstream * fn(z, tm)).sum()) / (2 * h)
    return grads


def test_jumprelu_theta_pseudo_derivative_matches_smoothed_finite_difference() -> None:
    z, theta, up = _setup()
    t = theta.clone().requires_grad_(True)
    (up * jumprelu(z, t, EPS)).sum().backward()
    assert t.grad is not None and t.grad.abs().sum() > 0
    torch.testing.assert_close(
        t.grad, _numeric_grad(smoothed_jumprelu, z, theta, up), rtol=1e-5, atol=1e-6
    )


def test_step_theta_pseudo_derivative_matches_smoothed_finite_difference() -> None:
    z, theta, up = _setup(1)
    t = theta.clone().requires_grad_(True)
    (up * step(z, t, EPS)).sum().backward()
    assert t.grad is not None and t.grad.abs().sum() > 0
    torch.testing.assert_close(
        t.grad, _numeric_grad(smoothed_step, z, theta, up), rtol=1e-5, atol=1e-6
    )


def test_forward_values_are_exact_jumprelu_and_heaviside() -> None:
    z, theta, _ = _setup(2)
    on = (z > theta).double()
    torch.testing.assert_close(jumprelu(z, theta, EPS), z * on)
    torch.testing.assert_close(step(z, theta, EPS), on)


def test_l0_term_sends_no_gradient_to_z() -> None:
    z, theta, up = _setup(3)
    zz = z.clone().requires_grad_(True)
    (up * step(zz, theta.clone().requires_grad_(True), EPS)).sum().backward()
    assert zz.grad is not None and torch.count_nonzero(zz.grad) == 0


def test_jumprelu_gradient_to_z_is_the_gate() -> None:
    z, theta, up = _setup(4)
    zz = z.clone().requires_grad_(True)
    (up * jumprelu(zz, theta, EPS)).sum().backward()
    torch.testing.assert_close(zz.grad, up * (z > theta).double())


def test_threshold_gets_no_gradient_when_no_preactivation_is_near_it(make_sae) -> None:
    sae = make_sae(architecture="jumprelu")
    with torch.no_grad():
        sae.threshold.fill_(50.0)  # far above every pre-activation
    out = sae.training_loss(torch.randn(16, 6, dtype=torch.float64), sparsity_coeff=1.0)
    out.loss.backward()
    assert sae.threshold.grad is not None and torch.count_nonzero(sae.threshold.grad) == 0
    assert out.l0.item() == 0.0


def test_training_loss_is_mse_plus_lambda_l0(make_sae) -> None:
    sae = make_sae(architecture="jumprelu")
    x = torch.randn(16, 6, dtype=torch.float64)
    out = sae.training_loss(x, sparsity_coeff=0.5)
    f = sae.encode(x)
    torch.testing.assert_close(out.f, f)
    torch.testing.assert_close(out.mse, ((sae.decode(f) - x) ** 2).sum(-1).mean())
    torch.testing.assert_close(out.l0, (f > 0).double().sum(-1).mean())
    torch.testing.assert_close(out.loss, out.mse + 0.5 * out.l0)


def test_target_l0_penalty_is_quadratic_and_zero_at_target(make_sae) -> None:
    sae = make_sae(architecture="jumprelu")
    x = torch.randn(16, 6, dtype=torch.float64)
    l0 = sae.training_loss(x, sparsity_coeff=1.0).l0.item()
    at = sae.training_loss(x, sparsity_coeff=3.0, target_l0=l0)
    torch.testing.assert_close(at.loss, at.mse)
    off = sae.training_loss(x, sparsity_coeff=3.0, target_l0=2 * l0)
    torch.testing.assert_close(off.loss, off.mse + 3.0 * 0.25 * torch.ones((), dtype=torch.float64))


def test_after_step_keeps_thresholds_positive(make_sae) -> None:
    sae = make_sae(architecture="jumprelu")
    with torch.no_grad():
        sae.threshold[:3] = -1.0
    sae.after_step()
    assert bool((sae.threshold >= THRESHOLD_MIN).all())
