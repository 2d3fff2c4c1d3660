"""normalise = "per_dim": every dimension scaled to equal variance, folded exactly at save."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lmscope.sae import load_sae
from lmscope.train import SAESpec, TrainConfig, TrainingInterrupted, train_suite

SITE = "L0.resid_post"


def _cfg(**kw: object) -> TrainConfig:
    base: dict[str, object] = dict(total_tokens=128 * 200, batch_size=128, lr=1e-3, norm_batches=4,
                                   log_every=20, checkpoint_every=0, progress=False, fast=False,
                                   normalise="per_dim")  # fmt: skip
    return TrainConfig(**{**base, **kw})  # type: ignore[arg-type]


def _one_loud_dimension(sparse_sites: Any) -> Any:
    data = sparse_sites({SITE: 16}, rows=4096, batch=128, n_feat=64, n_active=4, held_out=1024)
    data.pool[SITE][:, 3] *= 30.0  # one dimension holds most of the variance, as on Gemma 3
    return data


def test_per_dim_sae_reconstructs_the_quiet_dimensions(tmp_path: Path, sparse_sites: Any) -> None:
    data = _one_loud_dimension(sparse_sites)
    spec = [SAESpec(SITE, 64, target_l0=6)]
    (per_dim,) = train_suite(spec, data, _cfg(), tmp_path / "per_dim")
    (centred,) = train_suite(spec, data, _cfg(normalise="centred"), tmp_path / "centred")
    x = data.held_out(SITE)
    quiet = [j for j in range(16) if j != 3]

    def quiet_fvu(path: Path) -> float:
        err = (load_sae(path)(x) - x)[:, quiet].pow(2).sum(1).mean()
        return float(err / (x[:, quiet] - x[:, quiet].mean(0)).pow(2).sum(1).mean())

    sae = load_sae(per_dim)
    assert sae.cfg.is_folded and sae.cfg.training["normalise"] == "per_dim"
    assert quiet_fvu(per_dim) < 0.8 * quiet_fvu(centred)


def test_per_dim_resume_equals_uninterrupted(tmp_path: Path, sparse_sites: Any) -> None:
    data = _one_loud_dimension(sparse_sites)
    spec = [SAESpec(SITE, 64, target_l0=6)]
    (a,) = train_suite(spec, data, _cfg(total_tokens=128 * 40), tmp_path / "a")
    with pytest.raises(TrainingInterrupted):
        train_suite(spec, data, _cfg(total_tokens=128 * 40, max_steps=15), tmp_path / "b")
    (b,) = train_suite(spec, data, _cfg(total_tokens=128 * 40), tmp_path / "b", resume=True)
    wa, wb = load_sae(a).state_dict(), load_sae(b).state_dict()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
