"""Matryoshka BatchTopK through the suite trainer: it learns, and is saved as a JumpReLU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmscope.sae import load_sae
from lmscope.train import SAESpec, TrainConfig, train_suite

SITE = "L0.resid_post"


def test_matryoshka_trains_in_the_suite_and_saves_as_jumprelu(tmp_path: Path, sparse_sites: Any) -> None:  # fmt: skip
    data = sparse_sites({SITE: 16}, rows=4096, batch=128, n_feat=64, n_active=4, held_out=1024)
    specs = [SAESpec(SITE, 64, "matryoshka_batchtopk", k=6), SAESpec(SITE, 64, "batchtopk", k=6)]
    cfg = TrainConfig(total_tokens=128 * 400, batch_size=128, lr=1e-3, norm_batches=4,
                      log_every=50, checkpoint_every=0, progress=False)  # fmt: skip
    mat, btk = train_suite(specs, data, cfg, tmp_path)
    sae = load_sae(mat)
    assert sae.cfg.architecture == "jumprelu"
    assert sae.cfg.training["converted_from"] == "matryoshka_batchtopk"
    x = data.held_out(SITE)
    err = (sae(x) - x).pow(2).sum(1).mean() / (x - x.mean(0)).pow(2).sum(1).mean()
    assert float(err) < 0.3
    l0 = float((sae.encode(x) != 0).float().sum(1).mean())
    assert 3 < l0 < 12  # the running threshold keeps inference near k = 6
    # the first prefix (W/16 = 4 latents) alone beats the mean: general features come first
    f = sae.encode(x)
    x4 = f[:, :4] @ sae.W_dec[:4] + sae.b_dec
    assert float((x4 - x).pow(2).sum(1).mean()) < float((x - x.mean(0)).pow(2).sum(1).mean())
