"""SAELens and lmscope load the same local files (published layouts, and lmscope's SAELens export)
and agree on latents and outputs to 1e-5 relative, for every SAE type both support.

That includes Gemma Scope 2 cross-layer transcoders, which SAELens 6.54 reads one layer at a time:
its gemma_3 loader, given ``clt/<folder>/params_layer_<i>`` as the folder name, reads the published
``clt/<folder>/params_layer_<i>.safetensors`` as a single-layer JumpReLU (skip) transcoder at
``blocks.i.hook_mlp_in`` → ``hook_mlp_out`` whose decoder is ``w_dec`` summed over its output-layer
axis. SAELens' pretrained_saes.yaml lists no GS2 CLT release, so the test calls that loader directly
(as for the other folders); it looks for a ``params_layer_<i>/config.json`` that the published layout
does not have and infers the config from the names instead (the folder's own config.json is never
read). So SAELens can load the real files; what it computes for a CLT layer is compared below.
Its summed decoder runs over every output layer, the anti-causal slices ``w_dec[:, m < i]`` that the
files hold included, where lmscope (and circuit-tracer) use only ``m ≥ i``: on real files the two
differ unless those slices are zero, which we could not check without downloading one.

SAELens is a test dependency only (the `bench` extra, e.g. `.venv-bench`); skipped without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sae_lens")

sys.path.insert(0, str(Path(__file__).parents[1] / "releases"))
from published import (  # noqa: E402
    jumprelu_params,
    multilayer_config,
    multilayer_params,
    snapshot,
    write_gs1,
    write_gs2,
    write_gs2_multilayer,
)

from lmscope.sae import SAEConfig, build_sae, export_sae, import_sae  # noqa: E402
from lmscope.sae.multilayer import load_multilayer  # noqa: E402

D, W = 64, 96


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def _saelens(specs: list[dict], x: np.ndarray, tmp_path: Path, cache: Path) -> dict[str, np.ndarray]:  # fmt: skip
    """Run saelens_side.py (offline, on the HF cache ``cache``) on ``specs`` with input ``x``."""
    np.save(tmp_path / "x.npy", x)
    for s in specs:
        s["x"] = str(tmp_path / "x.npy")
    (tmp_path / "specs.json").write_text(json.dumps(specs))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    r = subprocess.run([sys.executable, str(Path(__file__).parent / "saelens_side.py"),
                        str(tmp_path / "specs.json"), str(tmp_path / "out.npz")],
                       env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return dict(np.load(tmp_path / "out.npz"))


def test_saelens_and_lmscope_agree_on_every_sae_type(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    cache = tmp_path / "cache"
    gs2 = snapshot(cache, "google/gemma-scope-2-270m-pt")
    specs, ours = [], {}
    for folder, kind, out_kind, affine in (
        ("resid_post_all/layer_0_width_16k_l0_small", "resid_post", None, False),
        ("attn_out_all/layer_1_width_16k_l0_small", "attn_z", None, False),
        ("mlp_out_all/layer_2_width_16k_l0_small", "mlp_out", None, False),
        ("transcoder_all/layer_3_width_16k_l0_small", "mlp_in", "mlp_out", False),
        ("transcoder_all/layer_3_width_16k_l0_small_affine", "mlp_in", "mlp_out", True),
    ):
        p = jumprelu_params(rng, D, W)
        if affine:
            p["affine_skip_connection"] = (0.1 * rng.normal(size=(D, D))).astype(np.float32)
        layer = int(folder.split("layer_")[1].split("_")[0])
        path = write_gs2(gs2, folder, p, kind=kind, out_kind=out_kind, layer=layer,
                         model="google/gemma-3-270m", l0=20)  # fmt: skip
        specs.append({"name": folder, "how": "hf", "loader": "gemma_3",
                      "repo": "google/gemma-scope-2-270m-pt", "folder": folder})  # fmt: skip
        ours[folder] = import_sae(path)
    for repo, folder, loader, lower in (
        ("google/gemma-scope-2b-pt-res", "layer_2/width_16k/average_l0_141", "gemma_2", False),
        ("google/gemma-scope-2b-pt-transcoders", "layer_3/width_16k/average_l0_54", "gemma_2_transcoder", True),
    ):  # fmt: skip
        path = write_gs1(snapshot(cache, repo), folder, jumprelu_params(rng, D, W), lower=lower)
        tc = "transcoders" in repo
        # SAELens hard-codes Gemma 2 2B's widths for these repos: override them to the files'
        over = {"d_in": D, "d_sae": W, **({"d_out": D} if tc else {})}
        specs.append({"name": repo, "how": "hf", "loader": loader, "repo": repo,
                      "folder": folder, "overrides": over})  # fmt: skip
        hints = {"site": "L3.mlp_in", "out_site": "L3.mlp_out"} if tc else {"site": "L2.resid_post"}  # fmt: skip
        ours[repo] = import_sae(path, hints=hints)
    # lmscope's own SAELens export of each architecture SAELens reads
    g = torch.Generator().manual_seed(0)
    for arch, extra in (("jumprelu", {}), ("topk", {"k": 8}), ("relu", {}),
                        ("jumprelu_transcoder", {"d_out": D, "out_site": "L1.mlp_out", "skip": True})):  # fmt: skip
        site = "L1.mlp_in" if arch.endswith("transcoder") else "L1.resid_post"
        sae = build_sae(SAEConfig(arch, d_in=D, d_sae=W, site=site, **extra), generator=g)
        with torch.no_grad():
            sae.b_dec.normal_(0, 0.1, generator=g)
            sae.b_enc.normal_(0, 0.1, generator=g)
            if extra.get("skip"):
                sae.W_skip.normal_(0, 0.1, generator=g)
        path = export_sae(sae, tmp_path / f"export-{arch}", "saelens")
        specs.append({"name": f"export-{arch}", "how": "disk", "path": str(path)})
        ours[f"export-{arch}"] = import_sae(path)
    x = (2.0 * rng.normal(size=(32, D))).astype(np.float32)
    theirs = _saelens(specs, x, tmp_path, cache)
    xt = torch.from_numpy(x)
    report = {}
    for name, sae in ours.items():
        with torch.no_grad():
            f, y = sae.encode(xt).numpy(), sae(xt).numpy()
        assert (f > 0).any() and (f == 0).any(), name  # the JumpReLU gap is exercised
        report[name] = (str(theirs[name + "/arch"]), _rel(f, theirs[name + "/f"]), _rel(y, theirs[name + "/y"]))  # fmt: skip
    print(json.dumps(report, indent=1))
    for name, (arch, rf, ry) in report.items():
        assert rf <= 1e-5 and ry <= 1e-5, (name, arch, rf, ry)


def test_saelens_and_lmscope_agree_on_a_clt_layer(tmp_path: Path) -> None:
    """Every layer of a Gemma Scope 2 CLT (plain and ``_affine``), in the published layout under
    gemma-scope-2-270m-pt's folder names, read by SAELens layer by layer and by lmscope whole."""
    rng = np.random.default_rng(1)
    cache = tmp_path / "cache"
    repo, n, w = "google/gemma-scope-2-270m-pt", 4, 24  # 4 layers × 24 latents, d_model D
    snap = snapshot(cache, repo)
    ours, specs = {}, []
    for folder, affine in (("clt/width_262k_l0_medium", False),
                           ("clt/width_262k_l0_medium_affine", True)):  # fmt: skip
        # every w_dec slice is random, the anti-causal ones [l > m] too: the files hold them all
        path = write_gs2_multilayer(snap, folder, multilayer_params(rng, n, D, w, affine),
                                    multilayer_config("mlp_in", "mlp_out", list(range(n)), n * w,
                                                      "google/gemma-3-270m", 50, affine, "clt"))  # fmt: skip
        ours[folder] = load_multilayer(path)
        for i in range(n):
            specs.append({"name": f"{folder}/{i}", "how": "hf", "loader": "gemma_3",
                          "repo": repo, "folder": f"{folder}/params_layer_{i}"})  # fmt: skip
    x = (2.0 * rng.normal(size=(32, D))).astype(np.float32)  # layer i's input (its mlp_in)
    theirs = _saelens(specs, x, tmp_path, cache)
    xt = torch.from_numpy(x)
    report = {}
    for folder, ml in ours.items():
        assert ml.kind == "clt" and (ml.skip is not None) == folder.endswith("_affine")
        for i in range(n):
            name = f"{folder}/{i}"
            with torch.no_grad():
                f = ml.encode_layer(xt, i)
                # SAELens' "reconstruction" of CLT layer i: layer i's latents through its decoders
                # into every output layer, summed into one vector (the anti-causal slices m < i
                # included, which lmscope's causal CLT never uses), plus output layer i's b_dec and,
                # for _affine folders, layer i's skip of x. It is not a reconstruction of any one
                # site: lmscope's output m sums the decoders of layers ≤ m into mlp_out of layer m
                # (``MultiLayerSAE.decode_layer``); the two coincide only for a 1-layer CLT.
                y = f @ ml.w_dec[i].sum(1) + ml.b_dec[i]
                if ml.skip is not None:
                    y = y + xt @ ml.skip[i]
            f, y = f.numpy(), y.numpy()
            assert (f > 0).any() and (f == 0).any(), name  # the JumpReLU gap is exercised
            arch = str(theirs[name + "/arch"])
            assert arch == ("jumprelu_skip_transcoder" if ml.skip is not None else "jumprelu_transcoder")  # fmt: skip
            report[name] = (arch, _rel(f, theirs[name + "/f"]), _rel(y, theirs[name + "/y"]))
    print(json.dumps(report, indent=1))
    for name, (arch, rf, ry) in report.items():
        assert rf <= 1e-5 and ry <= 1e-5, (name, arch, rf, ry)
