"""TopK and BatchTopK: sparsity by selection, BatchTopK's threshold and its JumpReLU form."""

from __future__ import annotations

import torch

from lmscope.sae import JumpReLUSAE


def test_topk_keeps_at_most_k_latents_per_row(make_sae, x) -> None:
    sae = make_sae(architecture="topk", k=4)
    f = sae.encode(x)
    assert int((f != 0).sum(-1).max()) <= 4 and (f >= 0).all()
    z = sae.pre_acts(x)
    kept = z.gather(-1, z.topk(4, dim=-1).indices).relu()
    torch.testing.assert_close(f.sort(-1).values[:, -4:], kept.sort(-1).values)


def test_batchtopk_training_keeps_k_times_batch_latents_over_the_batch(make_sae, x) -> None:
    sae = make_sae(architecture="batchtopk", k=4)
    sae.train()
    out = sae.training_loss(x, sparsity_coeff=0.0)
    assert int((out.f != 0).sum()) == 4 * x.shape[0]
    torch.testing.assert_close(out.l0, torch.tensor(4.0, dtype=torch.float64))
    assert bool((sae.threshold > 0).all())  # the running estimate moved off 0


def test_batchtopk_to_jumprelu_reproduces_batch_selection_when_threshold_separates(
    make_sae, x
) -> None:
    sae = make_sae(architecture="batchtopk", k=4)
    sae.train()
    f_train = sae.training_loss(x, sparsity_coeff=0.0).f
    # place θ between the kB-th and (kB+1)-th largest activation: the threshold is well defined
    vals = sae.pre_acts(x).relu().flatten().sort(descending=True).values
    kb = 4 * x.shape[0]
    with torch.no_grad():
        sae.threshold.fill_(float(vals[kb - 1] + vals[kb]) / 2)
    jr = sae.to_jumprelu()
    assert isinstance(jr, JumpReLUSAE) and jr.cfg.architecture == "jumprelu"
    torch.testing.assert_close(jr.encode(x), f_train)
    torch.testing.assert_close(jr(x), sae.decode(f_train))


def test_batchtopk_inference_equals_its_jumprelu_form_on_any_data(make_sae) -> None:
    sae = make_sae(architecture="batchtopk", k=4)
    sae.eval()
    x = torch.randn(50, 6, dtype=torch.float64)
    jr = sae.to_jumprelu()
    torch.testing.assert_close(jr.encode(x), sae.encode(x), rtol=0, atol=0)
    torch.testing.assert_close(jr.folded(2.0)(x), sae.folded(2.0)(x))


def test_auxk_gives_dead_latents_a_gradient(make_sae, x) -> None:
    sae = make_sae(architecture="topk", k=2)
    dead = torch.zeros(sae.d_sae, dtype=torch.bool)
    dead[:6] = True
    out = sae.training_loss(x, dead_mask=dead, aux_coeff=1.0)
    out.loss.backward()
    assert "auxk" in out.aux and out.aux["auxk"] > 0
    assert sae.W_enc.grad is not None and sae.W_enc.grad[:, :6].abs().sum() > 0
    plain = sae.training_loss(x)
    torch.testing.assert_close(plain.loss, plain.mse)
