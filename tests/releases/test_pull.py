"""Pull every single-site release family from a local HF-cache layout (offline) into a suite
(cross-layer transcoders and crosscoders: test_pull_multilayer.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from published import (
    jumprelu_params,
    numpy_encode,
    snapshot,
    write_gs1,
    write_gs2,
)

from lmscope.cli import main
from lmscope.errors import ConfigError, SAEError
from lmscope.model import SiteModel, tiny_model
from lmscope.releases.pull import pull
from lmscope.releases.registry import release, releases
from lmscope.suite import Suite

D = 64  # tiny-gemma3's d_model and attn_z width (4 heads × 16)
W = 96  # latents: small for speed; tensor names, shapes' layout and config keys as published


def _acts(site: str) -> torch.Tensor:
    loaded = tiny_model("gemma3")
    ids = loaded.tokenizer(["The capital of France is Paris, and Rome is in Italy."],
                           return_tensors="pt").input_ids  # fmt: skip
    return SiteModel(loaded).run(ids, read=[site], return_logits=False).acts[site][0].detach()


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "hf-cache"


def test_registry_names_every_family_and_saelens_release() -> None:
    fams = {r.family for r in releases()}
    assert fams == {"gemmascope", "gemmascope-transcoder", "gemmascope2", "gemmascope2-clt",
                    "gemmascope2-crosscoder"}  # fmt: skip
    names = {r.name for r in releases()}
    for size in ("270m", "1b", "4b", "12b", "27b"):
        assert f"gemma-scope-2-{size}-it-res-all" in names
    assert {"gemma-scope-2b-pt-res-canonical", "gemma-scope-9b-pt-att", "gemma-scope-2b-pt-transcoders"} <= names  # fmt: skip
    r = release("gemma-scope-2-270m-pt-transcoders-all")
    affine = r.items(layers=[0], widths=["16k"], l0s=["small"])
    assert {it.affine for it in affine} == {True, False}
    assert {(it.kind, it.out_kind) for it in affine} == {("mlp_in", "mlp_out")}
    only = r.items(layers=[0], widths=["16k"], l0s=["small"], affine=True)
    assert [it.folder for it in only] == ["transcoder_all/layer_0_width_16k_l0_small_affine"]
    # Gemma Scope 2 attn_out SAEs read o_proj's input: lmscope's attn_z
    assert {it.kind for it in release("gemma-scope-2-1b-pt-att-all").items()} == {"attn_z"}
    with pytest.raises(ConfigError, match="widths: 16k"):
        release("gemma-scope-2-270m-pt-res-all").items(widths=["3k"])
    with pytest.raises(ConfigError, match="unknown release"):
        release("gemma-scope-nope")


def _gs2_270m(cache: Path) -> dict[str, dict[str, np.ndarray]]:
    """Synthetic google/gemma-scope-2-270m-pt: layers 0-3 × (resid_post, attn_out, mlp_out) and
    affine + plain transcoders, in the published folder names."""
    snap = snapshot(cache, "google/gemma-scope-2-270m-pt")
    rng = np.random.default_rng(0)
    written = {}
    for layer in range(4):
        for group, kind in (("resid_post_all", "resid_post"), ("attn_out_all", "attn_z"), ("mlp_out_all", "mlp_out")):  # fmt: skip
            folder = f"{group}/layer_{layer}_width_16k_l0_small"
            written[folder] = p = jumprelu_params(rng, D, W)
            write_gs2(snap, folder, p, kind=kind, out_kind=None, layer=layer,
                      model="google/gemma-3-270m", l0=20)  # fmt: skip
        for affine in ("", "_affine"):
            folder = f"transcoder_all/layer_{layer}_width_16k_l0_small{affine}"
            p = jumprelu_params(rng, D, W)
            if affine:
                p["affine_skip_connection"] = (0.05 * rng.normal(size=(D, D))).astype(np.float32)
            written[folder] = p
            write_gs2(snap, folder, p, kind="mlp_in", out_kind="mlp_out", layer=layer,
                      model="google/gemma-3-270m", l0=20)  # fmt: skip
    return written


def test_pull_gemma_scope_2_offline_sites_encode_and_eval(cache: Path, tmp_path: Path,
                                                          shared_text_corpus: Path) -> None:  # fmt: skip
    written = _gs2_270m(cache)
    suite = pull("gemma-scope-2-270m-pt-att-all", tmp_path / "s", widths=["16k"], l0s=["small"],
                 layers=[1, 2], model="tiny-gemma3", cache_dir=cache, offline=True, progress=None)  # fmt: skip
    assert suite.sites == ["L1.attn_z", "L2.attn_z"]  # what the configs' hf_hook_point_in say
    pull("gemma-scope-2-270m-pt-transcoders-all", tmp_path / "s", widths=["16k"], layers=[1], l0s=["small"],
         model="tiny-gemma3", cache_dir=cache, offline=True, progress=None)  # fmt: skip
    suite = Suite.open(tmp_path / "s")
    tcs = [e for e in suite.entries if e["out_site"]]
    assert {(e["site"], e["out_site"]) for e in tcs} == {("L1.mlp_in", "L1.mlp_out")}
    assert len(tcs) == 2
    for e in suite.entries:
        sae = suite.load_sae(e["name"]).requires_grad_(False)
        src = sae.cfg.training["source"]
        assert src["repo"] == "google/gemma-scope-2-270m-pt" and src["revision"]
        params = written[src["folder"]]
        x = _acts(e["site"])
        np.testing.assert_allclose(sae.encode(x).double().numpy(), numpy_encode(params, x.numpy()),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
        f = sae.encode(x)
        want = f.double().numpy() @ params["w_dec"] + params["b_dec"]
        if "affine_skip_connection" in params:
            want = want + x.double().numpy() @ params["affine_skip_connection"]
            assert sae.cfg.skip
        np.testing.assert_allclose(sae(x).double().numpy(), want, rtol=1e-5, atol=1e-5)
        assert sae.cfg.training["l0"] == 20.0 and sae.cfg.model == "tiny-gemma3"

    from lmscope.evals import EvalConfig, evaluate_suite

    results = evaluate_suite(suite, EvalConfig(corpus=str(shared_text_corpus), seq_len=32,
                                               tokens=256, progress=False))  # fmt: skip
    assert set(results) == set(suite.names)
    for name in suite.names:
        m = Suite.open(suite.path).entry(name)["metrics"]
        assert m["l0"] > 0 and np.isfinite(m["fvu"])


def test_pull_gemma_scope_1_res_and_transcoders_from_cli(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(1)
    res = snapshot(cache, "google/gemma-scope-2b-pt-res")
    p_res = jumprelu_params(rng, D, W)
    write_gs1(res, "layer_2/width_16k/average_l0_141", p_res)
    tc = snapshot(cache, "google/gemma-scope-2b-pt-transcoders")
    p_tc = jumprelu_params(rng, D, W)
    write_gs1(tc, "layer_3/width_16k/average_l0_54", p_tc, lower=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "gs1"
    for name, layers in (
        ("gemma-scope-2b-pt-res-canonical", "2"),
        ("gemma-scope-2b-pt-transcoders", "3"),
    ):
        rc = main(["pull", name, "--layers", layers, "--widths", "16k", "--model", "tiny-gemma3",
                   "--cache-dir", str(cache), "--out", str(out)])  # fmt: skip
        assert rc == 0
    suite = Suite.open(out)
    assert {(e["site"], e["out_site"]) for e in suite.entries} == {("L2.resid_post", None), ("L3.mlp_in", "L3.mlp_out")}  # fmt: skip
    for e in suite.entries:
        sae = suite.load_sae(e["name"]).requires_grad_(False)
        params = p_res if e["site"] == "L2.resid_post" else p_tc
        x = _acts(e["site"])
        np.testing.assert_allclose(sae.encode(x).double().numpy(), numpy_encode(params, x.numpy()),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
    assert suite.entry(suite.resolve("L2.resid_post"))["training"]["l0"] == 141.0


def test_pull_refuses_a_model_of_other_widths_in_one_line(cache: Path, tmp_path: Path) -> None:
    snap = snapshot(cache, "google/gemma-scope-2-270m-pt")
    p = jumprelu_params(np.random.default_rng(2), 640, 32)  # Gemma 3 270M's d_model
    write_gs2(snap, "resid_post_all/layer_0_width_16k_l0_small", p, kind="resid_post",
              out_kind=None, layer=0, model="google/gemma-3-270m", l0=20)  # fmt: skip
    with pytest.raises(SAEError, match="expects width 640 at L0.resid_post but the model has 64"):
        pull("gemma-scope-2-270m-pt-res-all", tmp_path / "s", layers=[0], widths=["16k"],
             l0s=["small"], model="tiny-gemma3", cache_dir=cache, offline=True, progress=None)  # fmt: skip
    assert not (tmp_path / "s").exists()  # nothing written before every check passed
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty")}
    r = subprocess.run([sys.executable, "-m", "lmscope", "pull", "gemma-scope-2-270m-pt-res-all",
                        "--layers", "0", "--out", str(tmp_path / "t")],
                       env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "local Hugging Face cache" in r.stderr


def test_pull_checks_declared_sites_against_the_registry(cache: Path, tmp_path: Path) -> None:
    snap = snapshot(cache, "google/gemma-scope-2-270m-pt")
    p = jumprelu_params(np.random.default_rng(3), D, 32)
    # a resid_post folder whose config says it reads layer 1: the files and the name disagree
    write_gs2(snap, "resid_post_all/layer_0_width_16k_l0_small", p, kind="resid_post",
              out_kind=None, layer=1, model="google/gemma-3-270m", l0=20)  # fmt: skip
    with pytest.raises(SAEError, match="declares sites L1.resid_post; the registry expects L0.resid_post"):  # fmt: skip
        pull("gemma-scope-2-270m-pt-res-all", tmp_path / "s", layers=[0], widths=["16k"],
             l0s=["small"], model="tiny-gemma3", cache_dir=cache, offline=True, progress=None)  # fmt: skip


def test_releases_cli_lists_a_models_releases(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["releases", "--model", "gemma-3-270m"]) == 0
    out = capsys.readouterr().out
    assert "gemma-scope-2-270m-pt-res-all" in out and "attn_z" in out
    assert "gemma-scope-2-270m-pt-clt" in out and "gemma-scope-2b" not in out


@pytest.mark.slow
def test_pull_onto_the_real_gemma_3_270m(cache: Path, tmp_path: Path) -> None:
    """Published widths of Gemma 3 270M (d_model 640, attn_z 4 × 256 = 1024) land on its sites."""
    from lmscope.model import load_model

    snap = snapshot(cache, "google/gemma-scope-2-270m-pt")
    rng = np.random.default_rng(4)
    written = {}
    for group, kind, out_kind, d in (("resid_post_all", "resid_post", None, 640),
                                     ("attn_out_all", "attn_z", None, 1024),
                                     ("transcoder_all", "mlp_in", "mlp_out", 640)):  # fmt: skip
        folder = f"{group}/layer_6_width_16k_l0_small"
        written[folder] = p = jumprelu_params(rng, d, 32, 640 if out_kind else None)
        p["w_enc"] *= 8.0  # real activations are large: some pre-activations pass θ
        write_gs2(snap, folder, p, kind=kind, out_kind=out_kind, layer=6,
                  model="google/gemma-3-270m", l0=20)  # fmt: skip
    for name in ("gemma-scope-2-270m-pt-res-all", "gemma-scope-2-270m-pt-att-all",
                 "gemma-scope-2-270m-pt-transcoders-all"):  # fmt: skip
        pull(name, tmp_path / "s", layers=[6], widths=["16k"], l0s=["small"], affine=False,
             cache_dir=cache, offline=True, progress=None)  # fmt: skip
    suite = Suite.open(tmp_path / "s")
    assert suite.model == "gemma-3-270m"
    assert {(e["site"], e["d_in"]) for e in suite.entries} == {("L6.resid_post", 640), ("L6.attn_z", 1024), ("L6.mlp_in", 640)}  # fmt: skip
    loaded = load_model("gemma-3-270m", device="cpu")
    ids = loaded.tokenizer(["The capital of France is Paris."], return_tensors="pt").input_ids
    acts = SiteModel(loaded).run(ids, read=suite.sites, return_logits=False).acts
    for e in suite.entries:
        sae = suite.load_sae(e["name"]).requires_grad_(False)
        x = acts[e["site"]][0].detach()
        want = numpy_encode(written[sae.cfg.training["source"]["folder"]], x.numpy())
        np.testing.assert_allclose(sae.encode(x).double().numpy(), want, rtol=1e-4, atol=1e-4)
