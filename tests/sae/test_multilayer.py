"""Gemma Scope 2 CLTs and crosscoders: the per-layer files load, compute as a direct numpy
reading of the files says (a CLT causally: output layer m sums the decoders of layers l <= m), and
write back byte-for-byte equal tensors; the native folder round-trips too."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

sys.path.insert(0, str(Path(__file__).parents[1] / "releases"))
from published import snapshot, write_gs2_multilayer  # noqa: E402

from lmscope.errors import SAEError  # noqa: E402
from lmscope.sae.multilayer import load_multilayer, save_multilayer  # noqa: E402


def _layers(rng: np.random.Generator, n: int, d: int, w: int, affine: bool) -> list[dict[str, np.ndarray]]:  # fmt: skip
    out = []
    for _ in range(n):
        p = {"w_enc": rng.normal(size=(d, w)) / np.sqrt(d), "b_enc": 0.1 * rng.normal(size=w),
             "threshold": rng.uniform(0.05, 0.4, size=w),
             "w_dec": rng.normal(size=(w, n, d)) / np.sqrt(w), "b_dec": 0.1 * rng.normal(size=d)}  # fmt: skip
        if affine:
            p["affine_skip_connection"] = 0.1 * rng.normal(size=(d, d))
        out.append({k: v.astype(np.float32) for k, v in p.items()})
    return out


@pytest.mark.parametrize("folder, affine", [("clt/width_262k_l0_medium_affine", True),
                                            ("crosscoder/layer_7_13_17_22_width_262k_l0_medium", False)])  # fmt: skip
def test_multilayer_matches_numpy_and_round_trips(
    tmp_path: Path, folder: str, affine: bool
) -> None:
    rng = np.random.default_rng(0)
    n, d, w = 4, 16, 24
    per = _layers(rng, n, d, w, affine)
    path = write_gs2_multilayer(snapshot(tmp_path, "google/gemma-scope-2-1b-pt"), folder, per)
    sae = load_multilayer(path)
    x = rng.normal(size=(5, n, d)).astype(np.float32)
    f = sae.encode(torch.from_numpy(x)).numpy()
    y = sae(torch.from_numpy(x)).numpy()
    want_f = np.zeros((5, n, w))
    want_y = np.zeros((5, n, d))
    for m in range(n):  # straight from the files: layer l encodes, every layer decodes into m
        z = x[:, m] @ per[m]["w_enc"] + per[m]["b_enc"]
        want_f[:, m] = np.maximum(z, 0) * (z > per[m]["threshold"])
    causal = folder.startswith("clt/")  # a CLT's layer m sums layers l <= m, a crosscoder's all
    for m in range(n):
        src = range(m + 1) if causal else range(n)
        want_y[:, m] = per[m]["b_dec"] + sum(want_f[:, l] @ per[l]["w_dec"][:, m] for l in src)  # noqa: E741
        if affine:
            want_y[:, m] += x[:, m] @ per[m]["affine_skip_connection"]
    np.testing.assert_allclose(f, want_f, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
    assert (f > 0).any() and (f == 0).any()
    assert sae.kind == folder.split("/")[0]
    assert sae.layers == ((7, 13, 17, 22) if sae.kind == "crosscoder" else tuple(range(n)))
    back = save_multilayer(sae, tmp_path / "export")  # export back to Gemma Scope 2
    for i in range(n):
        a, b = load_file(str(back / f"params_layer_{i}.safetensors")), per[i]
        assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_multilayer_refuses_incomplete_folders(tmp_path: Path) -> None:
    per = _layers(np.random.default_rng(1), 3, 8, 4, False)
    path = write_gs2_multilayer(tmp_path, "clt/width_262k_l0_big", per)
    (path / "params_layer_1.safetensors").unlink()
    with pytest.raises(SAEError, match="not 0…1"):
        load_multilayer(path)
    with pytest.raises(SAEError, match="holds no params_layer"):
        load_multilayer(tmp_path)


def test_native_folder_round_trips_and_registers_in_a_suite(tmp_path: Path) -> None:
    from lmscope.sae.multilayer import is_multilayer, load_native, save_native
    from lmscope.suite import Suite

    per = _layers(np.random.default_rng(2), 3, 8, 5, True)
    sae = load_multilayer(write_gs2_multilayer(tmp_path / "gs", "clt/width_16k_l0_big_affine", per))
    sae.model, sae.training = "tiny-gemma3", {"l0": 12.0}
    suite = Suite.create(tmp_path / "suite", model="tiny-gemma3")
    path = save_native(sae, suite.path / "clt-L0-2")
    assert is_multilayer(path) and not list(suite.path.glob(".*tmp*"))  # atomic: no temp left
    suite.register([path])
    again = Suite.open(suite.path)
    assert again.names == [] and again.multilayer_names == ["clt-L0-2"]
    e = again.entry("clt-L0-2")
    assert (e["multilayer"], e["sites"], e["d_sae_total"]) == ("clt", ["L0.mlp_in", "L1.mlp_in", "L2.mlp_in"], 15)  # fmt: skip
    back = again.load_multilayer("clt-L0-2")
    for k in ("w_enc", "b_enc", "threshold", "w_dec", "b_dec", "skip"):
        assert torch.equal(getattr(back, k), getattr(sae, k)), k
    assert (back.kind, back.layers, back.model, back.training) == ("clt", (0, 1, 2), "tiny-gemma3", {"l0": 12.0})  # fmt: skip
    assert load_native(path).config() == sae.config()
