"""The suite trainer: target L0, one pass for many SAEs, exact resume, folding, checkpoints."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from lmscope.errors import ConfigError
from lmscope.sae import SAE, load_sae
from lmscope.train import (
    SAESpec,
    TrainConfig,
    TrainingInterrupted,
    suite_from_dict,
    train_suite,
)
from lmscope.train import trainer as trainer_mod
from lmscope.train.schedules import capped_warmup, lambda_scale, lr_scale

SparseSites = Any  # tests/train/conftest.py: SparseSites (the `sparse_sites` fixture)
SITE = "L0.resid_post"
# The sparse kernel warns "Sparse CSR ... beta" per call; pytest's per-test warning capture makes
# each of those calls slow, so ignore it here (the kernel filters it outside pytest).
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR:UserWarning")


def quick(**kw: object) -> TrainConfig:
    base: dict[str, object] = dict(
        total_tokens=64 * 60, batch_size=64, lr=1e-3, norm_batches=4, log_every=10,
        checkpoint_every=0, progress=False, fast=False, fast_max_density=1.0,
    )  # fmt: skip
    # fast=False: at these tiny widths autograd beats the sparse kernel; the kernel has its own
    # equivalence test below and the resume test runs through it.
    return TrainConfig(**{**base, **kw})  # type: ignore[arg-type]


def fvu(x_hat: Tensor, x: Tensor) -> float:
    return float((x_hat.detach() - x).pow(2).sum(1).mean() / (x - x.mean(0)).pow(2).sum(1).mean())


def l0(sae: SAE, x: Tensor) -> float:
    return float((sae.encode(x) != 0).float().sum(1).mean())


def weights(path: Path) -> dict[str, Tensor]:
    return dict(load_sae(path).state_dict())


# --- target L0 -------------------------------------------------------------------------------


@pytest.mark.parametrize("from_data", [False, True], ids=["theta0_fixed", "theta0_from_data"])
def test_target_l0_is_reached_within_ten_percent(
    tmp_path: Path, sparse_sites: Any, from_data: bool
) -> None:
    data = sparse_sites({SITE: 32}, rows=16384, batch=256, n_feat=512, n_active=8)
    spec = SAESpec(SITE, width=256, target_l0=16)
    cfg = quick(
        total_tokens=256 * 2500,
        batch_size=256,
        norm_batches=8,
        log_every=100,
        threshold_init_from_data=from_data,
    )
    (path,) = train_suite([spec], data, cfg, tmp_path)
    sae = load_sae(path)
    summary = sae.cfg.training
    assert abs(summary["l0"] / 16 - 1) < 0.10, summary
    assert abs(l0(sae, data.held_out(SITE)) / 16 - 1) < 0.10  # the saved SAE, on unseen rows
    assert summary["fvu"] < 0.3


def test_threshold_from_data_starts_every_latent_firing_at_the_target_rate(
    sparse_sites: Any,
) -> None:
    data = sparse_sites({SITE: 32}, rows=8192, batch=256, n_feat=512, n_active=8)
    spec = SAESpec(SITE, width=256, target_l0=16)
    stats = trainer_mod.calibrate(data, [SITE], 8)
    assert stats[SITE].sample is not None and stats[SITE].sample.shape == (2048, 32)
    for from_data in (False, True):
        cfg = quick(threshold_init_from_data=from_data, threshold_init=0.001)
        run = trainer_mod._Run(spec, cfg, {SITE: 32}, [stats[SITE].scale(cfg.normalise)] * 2)
        run.init_from_data(stats)
        x = run._scaled_in(data.held_out(SITE))  # unseen rows
        fires = (run.sae.encode(x) != 0).float()
        if not from_data:  # θ₀ = 0.001: about half the latents fire on any row
            assert fires.sum(1).mean() > 4 * 16
            continue
        theta = run.sae.get_parameter("threshold")
        assert torch.all(theta >= 0.001)
        # each latent fires on ≈ 16/256 of rows, so L0 starts at the target, and none is silent
        assert abs(float(fires.sum(1).mean()) / 16 - 1) < 0.15
        assert float((fires.sum(0) > 0).float().mean()) == 1.0
        rate = fires.mean(0)
        assert float(rate.max()) < 4 * 16 / 256


def test_target_l0_is_reached_on_a_small_language_models_activations(
    tmp_path: Path, text_corpus: Path
) -> None:
    """The same promise on real activations: a tiny Gemma 3's L2.resid_post over real text."""
    from lmscope.activations.harvest import HarvestConfig, harvest
    from lmscope.model import tiny_model

    corpus = text_corpus
    cfg = HarvestConfig(model="tiny-gemma3", sites="L2.resid_post", corpus=str(corpus), tokens=16384,
                        seq_len=64, batch_size=16, shard_rows=4096)  # fmt: skip
    store = harvest(cfg, str(tmp_path / "store"), loaded=tiny_model("gemma3"), progress=False)
    data = trainer_mod.store_data(store, ["L2.resid_post"], 256, seed=0)
    spec = SAESpec("L2.resid_post", width=256, target_l0=12)
    tcfg = quick(total_tokens=256 * 2000, batch_size=256, norm_batches=8, log_every=100)
    (path,) = train_suite([spec], data, tcfg, tmp_path / "suite")
    summary = load_sae(path).cfg.training
    assert abs(summary["l0"] / 12 - 1) < 0.10, summary
    assert abs(l0(load_sae(path), store.read_rows("L2.resid_post")) / 12 - 1) < 0.10


def test_topk_hits_k_by_construction(tmp_path: Path, tiny_data: SparseSites) -> None:
    (path,) = train_suite([SAESpec(SITE, 64, "topk", k=5)], tiny_data, quick(), tmp_path)
    sae = load_sae(path)
    assert sae.cfg.training["l0"] == pytest.approx(5, abs=0.01)
    assert l0(sae, tiny_data.held_out(SITE)) <= 5


# --- one pass, many SAEs ---------------------------------------------------------------------


def test_each_sae_of_a_suite_learns_its_own_site(tmp_path: Path, sparse_sites: Any) -> None:
    a, b, c = "L0.resid_post", "L1.resid_post", "L1.mlp_out"
    data = sparse_sites({a: 16, b: 16}, linked={c: (b, 12)}, rows=4096, batch=128, n_feat=64,
                       n_active=4, held_out=1024)  # fmt: skip
    specs = [
        SAESpec(a, 64, target_l0=6),
        SAESpec(b, 64, "topk", k=6),
        SAESpec(b, 64, "relu", sparsity_coeff=1e-3),
        SAESpec("L1.resid_post", 64, "jumprelu_transcoder", target_l0=8, out_site=c),
        SAESpec(a, 64, "batchtopk", k=6),
    ]
    paths = train_suite(specs, data, quick(total_tokens=128 * 600, batch_size=128), tmp_path)
    assert [p.name for p in paths] == [s.folder for s in specs]
    sae = {p.name: load_sae(p) for p in paths}
    xa, xb, xc = (data.held_out(s) for s in (a, b, c))
    own_a, own_b = sae[specs[0].folder], sae[specs[1].folder]
    assert fvu(own_a(xa), xa) < 0.5 < fvu(own_a(xb), xb)  # trained on a, useless on b
    assert fvu(own_b(xb), xb) < 0.5 < fvu(own_b(xa), xa)
    assert fvu(sae[specs[3].folder](xb), xc) < 0.5  # the transcoder predicts c from b
    assert sae[specs[4].folder].cfg.architecture == "jumprelu"  # batchtopk saved in inference form
    for p in paths:
        log = [json.loads(line) for line in (p / "train_log.jsonl").read_text().splitlines()]
        assert log[-1]["step"] == 600 and {"loss", "mse", "l0", "fvu", "dead", "lambda"} <= set(
            log[-1]
        )


def test_folded_sae_reconstructs_raw_activations_as_in_training(
    tmp_path: Path, tiny_data: SparseSites
) -> None:
    spec = SAESpec(SITE, 64, target_l0=6)
    (path,) = train_suite([spec], tiny_data, quick(total_tokens=64 * 400), tmp_path)
    sae = load_sae(path)
    assert sae.cfg.is_folded and sae.cfg.training["input_scale"] > 1  # C folded, raw units in/out
    x = tiny_data.held_out(SITE)
    assert fvu(sae(x), x) == pytest.approx(sae.cfg.training["fvu"], rel=0.3, abs=0.03)
    assert sae.cfg.training["fvu"] < 0.5


def test_decoder_rows_are_unit_norm_after_training(tmp_path: Path, tiny_data: SparseSites) -> None:
    specs = [SAESpec(SITE, 64, target_l0=6), SAESpec(SITE, 64, "relu", target_l0=6)]
    for p in train_suite(specs, tiny_data, quick(), tmp_path):
        norms = load_sae(p).W_dec.norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_b_dec_starts_at_the_data_mean(tmp_path: Path, tiny_data: SparseSites) -> None:
    # one step at lr≈0: the saved (folded) b_dec is the raw mean of the site
    cfg = quick(total_tokens=64, lr=1e-12, norm_batches=32)
    (path,) = train_suite([SAESpec(SITE, 64, target_l0=6)], tiny_data, cfg, tmp_path)
    mean = tiny_data.pool[SITE][: tiny_data.rows].mean(0)
    assert torch.allclose(load_sae(path).b_dec, mean, atol=0.05 * float(mean.norm()))


# --- exact resume ----------------------------------------------------------------------------


def test_resume_after_stop_ends_with_identical_weights(
    tmp_path: Path, tiny_data: SparseSites
) -> None:
    specs = [SAESpec(SITE, 64, target_l0=6), SAESpec(SITE, 64, "topk", k=4)]
    cfg = quick(checkpoint_every=25, fast=True)
    straight = train_suite(specs, tiny_data, cfg, tmp_path / "a")
    stop_early = quick(checkpoint_every=25, fast=True, max_steps=33)
    with pytest.raises(TrainingInterrupted, match="max_steps=33"):
        train_suite(specs, tiny_data, stop_early, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "checkpoint.json").read_text())["step"] == 33
    resumed = train_suite(specs, tiny_data, cfg, tmp_path / "b", resume=True)
    for p, q in zip(straight, resumed, strict=True):
        wp, wq = weights(p), weights(q)
        assert all(torch.equal(wp[k], wq[k]) for k in wp)
        assert (p / "train_log.jsonl").read_text() == (q / "train_log.jsonl").read_text()
        assert json.loads((p / "config.json").read_text()) == json.loads(
            (q / "config.json").read_text()
        )
    assert not (tmp_path / "b" / "checkpoint.json").exists()  # cleaned up once finished
    mtime = (resumed[0] / "weights.safetensors").stat().st_mtime_ns
    assert train_suite(specs, tiny_data, cfg, tmp_path / "b", resume=True) == resumed
    assert (resumed[0] / "weights.safetensors").stat().st_mtime_ns == mtime  # nothing retrained


def test_training_ends_cleanly_when_the_data_runs_out(
    tmp_path: Path, tiny_data: SparseSites
) -> None:
    def twelve_batches(start: int) -> Iterator[dict[str, Tensor]]:
        yield from itertools.islice(tiny_data(start), max(0, 12 - start))

    (path,) = train_suite([SAESpec(SITE, 64, target_l0=6)], twelve_batches, quick(), tmp_path)
    summary = load_sae(path).cfg.training
    assert summary["steps"] == 12 and summary["tokens"] == 12 * 64
    log = (path / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [10, 12]


def test_sigterm_writes_a_checkpoint_and_resume_matches(
    tmp_path: Path, tiny_data: SparseSites
) -> None:
    def killed_at_20(start: int) -> Iterator[dict[str, Tensor]]:
        for i, batch in enumerate(tiny_data(start), start):
            if i == 20:
                os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-run, like `kill <pid>`
            yield batch

    spec = [SAESpec(SITE, 64, target_l0=6)]
    with pytest.raises(TrainingInterrupted, match="signal at step 21"):
        train_suite(spec, killed_at_20, quick(), tmp_path / "b")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    commit = json.loads((tmp_path / "b" / "checkpoint.json").read_text())
    assert commit["step"] == 21 and commit["saes"] == [spec[0].folder]
    resumed = train_suite(spec, tiny_data, quick(), tmp_path / "b", resume=True)
    (straight,) = train_suite(spec, tiny_data, quick(), tmp_path / "a")
    wa, wb = weights(straight), weights(resumed[0])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_fresh_run_refuses_to_overwrite_a_checkpoint(
    tmp_path: Path, tiny_data: SparseSites
) -> None:
    spec = [SAESpec(SITE, 64, target_l0=6)]
    with pytest.raises(TrainingInterrupted):
        train_suite(spec, tiny_data, quick(max_steps=5), tmp_path)
    with pytest.raises(ConfigError, match="resume=True"):
        train_suite(spec, tiny_data, quick(), tmp_path)
    with pytest.raises(ConfigError, match="lr"):
        train_suite(spec, tiny_data, quick(lr=2e-3), tmp_path, resume=True)


# --- fast path -------------------------------------------------------------------------------


def test_fast_kernel_and_autograd_give_the_same_weights(
    tmp_path: Path, tiny_data: SparseSites
) -> None:
    if trainer_mod._kernels is None:
        pytest.skip("lmscope.train.kernels is not there yet")
    spec = [SAESpec(SITE, 64, target_l0=6)]
    cfg = dict(total_tokens=64 * 30, dtype="float64")
    (fast,) = train_suite(spec, tiny_data, quick(fast=True, **cfg), tmp_path / "fast")
    (slow,) = train_suite(spec, tiny_data, quick(fast=False, **cfg), tmp_path / "slow")
    wf, ws = weights(fast), weights(slow)
    for k in wf:
        torch.testing.assert_close(wf[k], ws[k], rtol=1e-9, atol=1e-10)


def test_fast_path_reuses_its_gradient_buffers_and_steps_with_fused_adam(
    tiny_data: SparseSites,
) -> None:
    if trainer_mod._kernels is None:
        pytest.skip("lmscope.train.kernels is not there yet")
    run = trainer_mod._Run(SAESpec(SITE, 64, target_l0=6), quick(fast=True), {SITE: 16}, [1.0, 1.0])
    assert run.fast and run.opt.param_groups[0]["fused"]
    run.prev_l0 = 0.0  # take the kernel from the first step
    batches = tiny_data(0)
    ptrs = []
    for step in range(3):
        run.train_step(next(batches), step)
        ptrs.append((run.sae.W_enc.grad.data_ptr(), run.sae.W_dec.grad.data_ptr()))
        norms = run.sae.W_dec.norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)
    assert ptrs[0] == ptrs[1] == ptrs[2]


def test_fast_path_update_does_not_depend_on_the_kernels_grad_layout(
    tmp_path: Path, tiny_data: SparseSites, monkeypatch: pytest.MonkeyPatch
) -> None:
    # fused Adam reads param and grad as flat memory: a transposed-layout grad must be laid out
    # like its param before the step, or the update is silently wrong
    kernels = trainer_mod._kernels
    if kernels is None:
        pytest.skip("lmscope.train.kernels is not there yet")
    spec, cfg = [SAESpec(SITE, 64, target_l0=6)], quick(fast=True, total_tokens=64 * 20)
    (plain,) = train_suite(spec, tiny_data, cfg, tmp_path / "a")
    step_grads = kernels.jumprelu_step_grads

    def transposed_layout(*args: Any, **kw: Any) -> Any:
        o = step_grads(*args, **kw)
        g = o.grad_W_enc.t().contiguous().t()  # same values, column-major
        return dataclasses.replace(o, grad_W_enc=g)

    monkeypatch.setattr(kernels, "jumprelu_step_grads", transposed_layout)
    (odd,) = train_suite(spec, tiny_data, cfg, tmp_path / "b")
    wa, wb = weights(plain), weights(odd)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_plain_adam_is_used_where_fused_is_not_available(
    tmp_path: Path, tiny_data: SparseSites, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, cfg = [SAESpec(SITE, 64, target_l0=6)], quick(fast=True, total_tokens=64 * 20)
    (fused,) = train_suite(spec, tiny_data, cfg, tmp_path / "fused")
    monkeypatch.setattr(trainer_mod._Run, "FUSED_ADAM_DEVICES", frozenset())
    run = trainer_mod._Run(spec[0], cfg, {SITE: 16}, [1.0, 1.0])
    assert not run.opt.param_groups[0]["fused"]
    (plain,) = train_suite(spec, tiny_data, cfg, tmp_path / "plain")
    wf, wp = weights(fused), weights(plain)
    for k in wf:  # the same Adam, rounded differently
        torch.testing.assert_close(wf[k], wp[k], rtol=1e-4, atol=1e-5)


# --- config and schedules --------------------------------------------------------------------


def test_suite_config_expands_the_cross_product_with_folder_safe_names() -> None:
    import tomllib

    toml = """
    [train]
    total_tokens = 1_000_000
    lr = 3e-4

    [[sae]]
    sites = ["resid_post", "mlp_out"]
    layers = "0-2"
    widths = [16384, "64k"]
    target_l0 = [32, 64]

    [[sae]]
    architecture = "jumprelu_transcoder"
    sites = ["mlp_in"]
    out_site = "mlp_out"
    layers = 6
    widths = 16384
    target_l0 = 64

    [[sae]]
    architecture = "topk"
    sites = ["L6.attn_z"]
    widths = 4096
    k = 32
    """
    specs, cfg = suite_from_dict(tomllib.loads(toml))
    assert cfg.lr == 3e-4 and cfg.adam_betas == (0.0, 0.999)
    assert len(specs) == 3 * 2 * 2 * 2 + 1 + 1
    assert specs[0].name == "L0.resid_post/w16384/l0_32"
    assert specs[0].folder == "L0.resid_post-w16384-l032"
    assert any(s.width == 65536 for s in specs)
    assert specs[-2].folder == "L6.mlp_in-to-L6.mlp_out-jumprelu_transcoder-w16384-l064"
    assert specs[-1].name == "L6.attn_z/topk/w4096/k_32"
    with pytest.raises(ConfigError, match="valid"):
        suite_from_dict({"sae": [{"sites": ["L0.resid_post"], "widths": 8, "target": 4}]})
    with pytest.raises(ConfigError, match="kind in"):
        SAESpec("L0.resid", 16, target_l0=4)
    with pytest.raises(ConfigError, match="exactly one"):
        SAESpec(SITE, 16)


def test_warmups_follow_the_recipe_and_shrink_for_short_runs() -> None:
    assert capped_warmup(1000, 1_000_000, 0.1) == 1000
    assert capped_warmup(10_000, 2000, 0.1) == 200
    assert lr_scale(0, 10**6, 1000) == pytest.approx(0.1)
    assert lr_scale(500, 10**6, 1000) == pytest.approx(0.55)
    assert lr_scale(1000, 10**6, 1000) == 1.0
    assert lr_scale(10**6 - 1, 10**6, 1000, decay_frac=0.2) < 1e-6
    assert lambda_scale(0, 10_000) == 0 and lambda_scale(5_000, 10_000) == 0.5
    assert lambda_scale(20_000, 10_000) == 1.0
    assert math.isclose(lr_scale(900_000, 10**6, 1000, decay_frac=0.2), 0.5)


# --- through a real activation store ---------------------------------------------------------


def test_trains_from_an_activation_store(tmp_path: Path, tiny_data: SparseSites) -> None:
    store_mod = pytest.importorskip("lmscope.activations.store")
    x = tiny_data.pool[SITE][: tiny_data.rows]
    url = str(tmp_path / "acts")
    with store_mod.StoreWriter(url, sites={SITE: 16}, model_name="synthetic", shard_rows=512) as w:
        for block in x.split(256):
            ids = torch.arange(block.shape[0]).reshape(1, -1)
            w.append({SITE: block.reshape(1, -1, 16)}, ids)
    store = store_mod.ActivationStore(url)
    data = trainer_mod.store_data(store, [SITE], 64)
    (path,) = train_suite([SAESpec(SITE, 64, target_l0=6)], data, quick(), tmp_path / "out")
    assert load_sae(path).cfg.training["steps"] == 60


def test_threshold_steering_reaches_target_l0_in_a_short_run(
    tmp_path: Path, sparse_sites: Any
) -> None:
    """Few steps and θ₀ far from the answer: acting on θ directly still lands on L0*."""
    data = sparse_sites({SITE: 32}, rows=16384, batch=256, n_feat=512, n_active=8)
    spec = SAESpec(SITE, width=256, target_l0=24)
    cfg = quick(total_tokens=256 * 400, batch_size=256, norm_batches=8, log_every=50)
    (path,) = train_suite([spec], data, cfg, tmp_path)
    sae = load_sae(path)
    assert abs(sae.cfg.training["l0"] / 24 - 1) < 0.10, sae.cfg.training
    assert abs(l0(sae, data.held_out(SITE)) / 24 - 1) < 0.15


def test_dense_steps_take_the_autograd_path_and_sparse_steps_the_kernel(
    tiny_data: SparseSites, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel is slower than autograd when many latents fire: it waits for L0 ≤ density·W."""
    kernels = trainer_mod._kernels
    if kernels is None:
        pytest.skip("lmscope.train.kernels is not there yet")
    calls: list[int] = []
    real = kernels.jumprelu_step_grads
    monkeypatch.setattr(
        kernels, "jumprelu_step_grads", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    run = trainer_mod._Run(SAESpec(SITE, 64, target_l0=6), quick(fast=True, fast_max_density=0.25),
                           {SITE: 16}, [1.0, 1.0])  # fmt: skip
    batches = tiny_data(0)
    run.train_step(next(batches), 0)  # no L0 measured yet: autograd
    assert calls == []
    run.prev_l0 = 40.0  # > 0.25 × 64
    run.train_step(next(batches), 1)
    assert calls == []
    run.prev_l0 = 10.0
    run.train_step(next(batches), 2)
    assert calls == [1]
