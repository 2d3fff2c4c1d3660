"""A pulled Gemma Scope 2 folder exports back to the same files; `--source` reads a plain local copy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from published import jumprelu_params, write_gs2
from safetensors.numpy import load_file

from lmscope.releases.pull import pull
from lmscope.sae import export_sae


def test_pulled_folders_export_back_to_gemma_scope_2(tmp_path: Path) -> None:
    repo = tmp_path / "gemma-scope-2-270m-pt"  # a local copy: no HF cache involved
    rng = np.random.default_rng(7)
    folders = {"attn_out_all/layer_1_width_16k_l0_small": ("attn_z", None),
               "transcoder_all/layer_2_width_16k_l0_small_affine": ("mlp_in", "mlp_out")}  # fmt: skip
    for folder, (kind, out_kind) in folders.items():
        p = jumprelu_params(rng, 64, 40)
        if out_kind:
            p["affine_skip_connection"] = (0.1 * rng.normal(size=(64, 64))).astype(np.float32)
        write_gs2(repo, folder, p, kind=kind, out_kind=out_kind,
                  layer=int(folder.split("layer_")[1][0]), model="google/gemma-3-270m", l0=20)  # fmt: skip
    suite = pull("gemma-scope-2-270m-pt-att-all", tmp_path / "s", layers=[1], l0s=["small"],
                 widths=["16k"], model="tiny-gemma3", source=repo, progress=None)  # fmt: skip
    pull("gemma-scope-2-270m-pt-transcoders-all", tmp_path / "s", layers=[2], l0s=["small"],
         widths=["16k"], affine=True, model="tiny-gemma3", source=repo, progress=None)  # fmt: skip
    suite = type(suite).open(suite.path)
    assert len(suite.entries) == 2
    for e in suite.entries:
        sae = suite.load_sae(e["name"])
        src = sae.cfg.training["source"]
        assert src["revision"] is None  # a local copy has none
        back = export_sae(sae, tmp_path / "back" / e["name"], "gemmascope2")
        want, got = load_file(str(repo / src["folder"] / "params.safetensors")), load_file(str(back / "params.safetensors"))  # fmt: skip
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
        c_want = json.loads((repo / src["folder"] / "config.json").read_text())
        c_got = json.loads((back / "config.json").read_text())
        for k in ("hf_hook_point_in", "hf_hook_point_out", "width", "architecture", "l0", "affine_connection", "type"):  # fmt: skip
            assert c_got[k] == c_want[k], k
