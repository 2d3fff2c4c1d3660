"""SAELens and lmscope load the same local files (published layouts, and lmscope's SAELens export)
and agree on latents and outputs to 1e-5 relative, for every SAE type both support.

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
from published import jumprelu_params, snapshot, write_gs1, write_gs2  # noqa: E402

from lmscope.sae import SAEConfig, build_sae, export_sae, import_sae  # noqa: E402

D, W = 64, 96


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


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
    np.save(tmp_path / "x.npy", x)
    for s in specs:
        s["x"] = str(tmp_path / "x.npy")
    (tmp_path / "specs.json").write_text(json.dumps(specs))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    r = subprocess.run([sys.executable, str(Path(__file__).parent / "saelens_side.py"),
                        str(tmp_path / "specs.json"), str(tmp_path / "out.npz")],
                       env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = np.load(tmp_path / "out.npz")
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
