"""The sparse-aware JumpReLU step equals plain dense autograd on the same loss."""

from __future__ import annotations

import pytest
import torch

from lmscope.train.kernels import (
    StepOut,
    jumprelu_step_grads,
    remove_parallel_grads_,
    renormalise_rows_,
)

D, W, B = 16, 64, 32
EPS = 1e-3
LAM = 0.3
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")


# ---- a reference of our own: dense autograd, straight from the Gemma Scope definitions ---------


def _rect(u: torch.Tensor, eps: float) -> torch.Tensor:
    return ((u / eps).abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        g_theta = (-(theta / ctx.eps) * _rect(z - theta, ctx.eps) * g).sum(0)
        return g * (z > theta), g_theta, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        return None, (-(1.0 / ctx.eps) * _rect(z - theta, ctx.eps) * g).sum(0), None


def reference_step(params: dict[str, torch.Tensor], x: torch.Tensor, lam: float, eps: float):
    p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    z = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    f = _JumpReLU.apply(z, p["threshold"], eps)
    x_hat = f @ p["W_dec"] + p["b_dec"]
    mse = (x - x_hat).square().sum(1).mean()
    l0 = _Step.apply(z, p["threshold"], eps).sum(1).mean()
    loss = mse + lam * l0
    loss.backward()
    fires = (z > p["threshold"]).sum(0)
    return loss.detach(), mse.detach(), l0.detach(), {k: v.grad for k, v in p.items()}, fires, z


# ---- data with entries deliberately inside the θ-window ------------------------------------------


def make_problem(
    dtype: torch.dtype, seed: int = 0, target_active: float = 0.1
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A random SAE and batch whose thresholds put some entries on both sides of z = θ ± ε/2."""
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(W, D, generator=g, dtype=torch.float64)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_enc = W_dec.t() + 0.1 * torch.randn(D, W, generator=g, dtype=torch.float64)
    b_enc = 0.05 * torch.randn(W, generator=g, dtype=torch.float64)
    b_dec = 0.1 * torch.randn(D, generator=g, dtype=torch.float64)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    z = (x - b_dec) @ W_enc + b_enc
    theta = torch.quantile(z, 1 - target_active, dim=0).clamp_min(0.05)
    # Pin a few entries inside the window, just above and just below θ.
    for j in range(0, W, 5):
        r = j % B
        theta[j] = z[r, j] + (0.3 if j % 2 else -0.3) * EPS
    params = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "threshold": theta}
    # Float rounding must not move an entry across z = θ or the window edges.
    u = (z - theta).abs()
    assert (u > 1e-6).all() and ((u - EPS / 2).abs() > 1e-6).all()
    return {k: v.to(dtype) for k, v in params.items()}, x.to(dtype)


def run_kernel(params: dict[str, torch.Tensor], x: torch.Tensor, **kw) -> StepOut:
    return jumprelu_step_grads(*(params[k] for k in PARAMS), x, lam=LAM, eps=EPS, **kw)


def assert_matches_reference(out: StepOut, params, x, rtol: float, atol: float) -> None:
    loss, mse, l0, grads, fires, _ = reference_step(params, x, LAM, EPS)
    torch.testing.assert_close(out.loss, loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(out.mse, mse, rtol=rtol, atol=atol)
    torch.testing.assert_close(out.l0, l0, rtol=0, atol=0)
    for name, grad in out.grads().items():
        torch.testing.assert_close(grad, grads[name], rtol=rtol, atol=atol, msg=name)
    assert torch.equal(out.fire_counts, fires)


# ---- specifications ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "rtol", "atol"), [(torch.float64, 1e-10, 1e-10), (torch.float32, 1e-4, 1e-5)]
)
@pytest.mark.parametrize("chunk", [7, 64, 1024])
def test_step_matches_dense_autograd(dtype, rtol, atol, chunk):
    params, x = make_problem(dtype)
    assert_matches_reference(run_kernel(params, x, chunk=chunk), params, x, rtol, atol)


@pytest.mark.parametrize("rows", [1, 7, 31])
def test_batch_sizes_that_do_not_fill_whole_words(rows):
    params, x = make_problem(torch.float64)
    assert_matches_reference(run_kernel(params, x[:rows], chunk=7), params, x[:rows], 1e-10, 1e-10)


def test_problem_has_window_entries_on_both_sides_of_threshold():
    params, x = make_problem(torch.float64)
    *_, z = reference_step(params, x, LAM, EPS)
    u = z - params["threshold"]
    assert ((u > 0) & (u < EPS / 2)).any() and ((u < 0) & (u > -EPS / 2)).any()


def test_threshold_gradient_sees_inactive_window_entries():
    params, x = make_problem(torch.float64)
    *_, grads, _, z = reference_step(params, x, LAM, EPS)
    u = z - params["threshold"]
    only_inactive = ((u < 0) & (u > -EPS / 2)).any(0) & ~((u > 0) & (u < EPS / 2)).any(0)
    assert only_inactive.any()
    out = run_kernel(params, x)
    assert (out.grad_threshold[only_inactive] != 0).all()


def test_reused_gradient_buffers_are_fully_overwritten():
    params, x = make_problem(torch.float32)
    fresh = run_kernel(params, x)
    stale = run_kernel(params, x)
    for grad in stale.grads().values():
        grad.fill_(float("nan"))
    reused = run_kernel(params, x, into=stale)
    assert reused.grad_W_enc is stale.grad_W_enc and reused.grad_W_dec is stale.grad_W_dec
    for name, grad in reused.grads().items():
        torch.testing.assert_close(grad, fresh.grads()[name], rtol=0, atol=0, msg=name)


def test_l0_and_fire_counts_are_the_direct_counts():
    params, x = make_problem(torch.float32, seed=3)
    z = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
    fired = z > params["threshold"]
    out = run_kernel(params, x)
    assert out.l0.item() == fired.sum().item() / B
    assert out.fire_counts.dtype == torch.int64
    assert torch.equal(out.fire_counts, fired.sum(0))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_no_active_latent_gives_pure_bias_reconstruction(dtype):
    params, x = make_problem(dtype)
    params["threshold"] = torch.full((W,), 1e3, dtype=dtype)  # nothing fires, nothing in window
    out = run_kernel(params, x)
    assert out.l0.item() == 0 and out.fire_counts.sum().item() == 0
    for name in ("W_enc", "b_enc", "W_dec", "threshold"):
        assert not out.grads()[name].any(), name
    assert_matches_reference(out, params, x, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_all_latents_active(dtype):
    params, x = make_problem(dtype)
    z = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
    params["threshold"] = (z.min(0).values - 0.1).clamp_min(1e-6)
    params["b_enc"] = params["b_enc"] + 10.0  # shifts every z well above its θ
    out = run_kernel(params, x)
    assert out.l0.item() == W and torch.equal(out.fire_counts, torch.full((W,), B))
    assert_matches_reference(out, params, x, rtol=1e-4, atol=1e-4)


def test_bf16_encoder_selects_the_same_candidates_and_keeps_full_precision():
    params, x = make_problem(torch.float32, seed=1)
    exact = run_kernel(params, x)
    fast = run_kernel(params, x, encoder_dtype=torch.bfloat16, chunk=16)
    assert torch.equal(fast.fire_counts, exact.fire_counts)
    assert_matches_reference(fast, params, x, rtol=1e-4, atol=1e-5)


def test_matches_the_sae_module_training_loss():
    jumprelu = pytest.importorskip("lmscope.sae.jumprelu")
    base = pytest.importorskip("lmscope.sae.base")
    params, x = make_problem(torch.float64)
    sae = jumprelu.JumpReLUSAE(base.SAEConfig("jumprelu", d_in=D, d_sae=W, dtype="float64"))
    with torch.no_grad():
        for name in PARAMS:
            getattr(sae, name).copy_(params[name])
    res = sae.training_loss(x, sparsity_coeff=LAM, bandwidth=EPS)
    res.loss.backward()
    out = run_kernel(params, x)
    torch.testing.assert_close(out.loss, res.loss.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.l0, res.l0.detach(), rtol=0, atol=0)
    for name in PARAMS:
        torch.testing.assert_close(
            out.grads()[name], getattr(sae, name).grad, rtol=1e-10, atol=1e-10, msg=name
        )


def test_remove_parallel_grads_leaves_only_orthogonal_components():
    g = torch.Generator().manual_seed(0)
    W_dec = torch.randn(W, D, generator=g, dtype=torch.float64)
    grad = torch.randn(W, D, generator=g, dtype=torch.float64)
    expected = (
        grad - (grad * W_dec).sum(1, keepdim=True) / (W_dec * W_dec).sum(1, keepdim=True) * W_dec
    )
    remove_parallel_grads_(W_dec, grad)
    torch.testing.assert_close(grad, expected)
    assert (grad * W_dec).sum(1).abs().max() < 1e-12


def test_renormalise_rows_gives_unit_rows():
    W_dec = torch.randn(W, D, dtype=torch.float64) * 3
    direction = W_dec / W_dec.norm(dim=1, keepdim=True)
    renormalise_rows_(W_dec)
    torch.testing.assert_close(W_dec.norm(dim=1), torch.ones(W, dtype=torch.float64))
    torch.testing.assert_close(W_dec, direction)
