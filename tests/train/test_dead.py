"""The dead-latent losses: their gradients equal autograd's, both step paths agree, they revive."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lmscope.sae import SAEConfig, build_sae, load_sae
from lmscope.train import SAESpec, TrainConfig, train_suite
from lmscope.train import trainer as trainer_mod
from lmscope.train.dead import add_dead_latent_grads

SITE = "L0.resid_post"
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR:UserWarning")


def _reference_loss(sae: Any, x: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor,
                    kind: str, k_aux: int) -> torch.Tensor:  # fmt: skip
    """The same losses written over the whole SAE, masking live latents out."""
    z = (x - sae.b_dec.detach()) @ sae.W_enc + sae.b_enc
    if kind == "auxk":
        z = z.masked_fill(~dead, -torch.inf)
        vals, j = z.topk(k_aux, dim=1)
        f = torch.zeros_like(z).scatter(1, j, vals.relu())
        return (f @ sae.W_dec - residual).pow(2).sum(-1).mean()
    gap = (sae.threshold - z).relu() * sae.W_dec.norm(dim=1)
    return (gap * dead).sum(-1).mean()


@pytest.mark.parametrize("kind", ["auxk", "preact"])
def test_dead_latent_grads_equal_autograd_of_the_masked_loss(kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    sae = build_sae(SAEConfig("jumprelu", d_in=8, d_sae=32, dtype="float64"), generator=g)
    with torch.no_grad():
        sae.b_dec.normal_(generator=g)
        sae.b_enc.normal_(generator=g)
        sae.threshold.uniform_(0.1, 0.5, generator=g)
    x = torch.randn(16, 8, dtype=torch.float64, generator=g)
    residual = torch.randn(16, 8, dtype=torch.float64, generator=g)
    dead = torch.rand(32, generator=g) < 0.4
    coeff, k_aux = 0.3, 3
    loss = add_dead_latent_grads(sae, x, residual, dead, kind=kind, coeff=coeff, k_aux=k_aux)
    got = {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}
    sae.zero_grad(set_to_none=True)
    ref = _reference_loss(sae, x, residual, dead, kind, k_aux)
    (coeff * ref).backward()
    assert loss == pytest.approx(float(ref))
    w = sae.W_dec.detach()
    gd = sae.W_dec.grad
    assert gd is not None
    gd -= (gd * w).sum(1, keepdim=True) * w  # the decoder's tangent part (rows are unit-norm)
    names = ("W_enc", "b_enc", "W_dec") + (("threshold",) if kind == "preact" else ())
    for n in names:
        p = sae.get_parameter(n)
        assert p.grad is not None
        torch.testing.assert_close(got[n], p.grad, rtol=1e-10, atol=1e-12)
    assert torch.equal(got["W_enc"][:, ~dead], torch.zeros_like(got["W_enc"][:, ~dead]))


def _cfg(**kw: object) -> TrainConfig:
    base: dict[str, object] = dict(
        total_tokens=256 * 300, batch_size=256, lr=1e-3, norm_batches=4, log_every=50,
        checkpoint_every=0, progress=False, fast=False, threshold_init=0.3,
        dead_after_tokens=256 * 10,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})  # type: ignore[arg-type]


def _dead_fraction(path: Path, x: torch.Tensor) -> float:
    return float((load_sae(path).encode(x) == 0).all(0).float().mean())


def _train_with_dead_half(kind: str, data: Any, steps: int = 300) -> float:
    """A JumpReLU SAE whose first half of latents starts dead (θ = 1.5: z never reaches it),
    trained by the plain loop plus the dead-latent loss; returns the fraction still dead."""
    torch.manual_seed(0)
    sae = build_sae(
        SAEConfig("jumprelu", d_in=32, d_sae=256), generator=torch.Generator().manual_seed(0)
    )
    x_all = data.pool[SITE][: data.rows]
    c = float((x_all - x_all.mean(0)).pow(2).sum(1).mean().sqrt())
    with torch.no_grad():
        sae.b_dec.copy_(x_all.mean(0) / c)
        sae.threshold.fill_(0.05)
        sae.threshold[:128] = 1.5
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3, betas=(0.0, 0.999))
    since = torch.zeros(256, dtype=torch.int64)
    it = data(0)
    for _ in range(steps):
        x = next(it)[SITE] / c
        opt.zero_grad(set_to_none=True)
        out = sae.training_loss(x, sparsity_coeff=1e-3)
        out.loss.backward()
        dead = since >= 256 * 5
        add_dead_latent_grads(sae, x, (x - out.x_hat).detach(), dead, kind=kind, coeff=0.5,
                              k_aux=16)  # fmt: skip
        sae.remove_parallel_grads()
        opt.step()
        sae.after_step()
        since = torch.where((out.f != 0).sum(0) > 0, 0, since + len(x))
    held = data.held_out(SITE) / c
    return float((sae.encode(held) == 0).all(0)[:128].float().mean())


def test_preact_loss_revives_latents_that_plain_training_leaves_dead(sparse_sites: Any) -> None:  # fmt: skip
    data = sparse_sites({SITE: 32}, rows=16384, batch=256, n_feat=256, n_active=8)
    assert _train_with_dead_half("none", data) == 1.0  # no gradient reaches them: dead for good
    assert _train_with_dead_half("preact", data) < 0.6  # measured 0.45 after 300 steps
    # AuxK trains their directions on the residual but cannot lift z over a stale θ (measured 1.0)


def test_fast_kernel_and_autograd_agree_with_the_dead_latent_loss(tmp_path: Path, tiny_data: Any) -> None:  # fmt: skip
    if trainer_mod._kernels is None:
        pytest.skip("no kernels")
    spec = [SAESpec(SITE, 64, target_l0=6)]
    kw = dict(total_tokens=64 * 30, batch_size=64, dtype="float64", dead_loss="auxk",
              dead_after_tokens=64 * 3, fast_max_density=1.0, log_every=2, threshold_init=2.0)  # fmt: skip
    (fast,) = train_suite(spec, tiny_data, _cfg(fast=True, **kw), tmp_path / "fast")
    (slow,) = train_suite(spec, tiny_data, _cfg(fast=False, **kw), tmp_path / "slow")
    wf, ws = load_sae(fast).state_dict(), load_sae(slow).state_dict()
    log = [json.loads(ln) for ln in (fast / "train_log.jsonl").read_text().splitlines()]
    assert max(r["dead"] for r in log) > 0  # the loss really ran on some steps
    for k in wf:
        torch.testing.assert_close(wf[k], ws[k], rtol=1e-9, atol=1e-10)
