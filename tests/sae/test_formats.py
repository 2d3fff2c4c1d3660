"""SAE files: native save/load, export to every format and back, and import of foreign files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lmscope.errors import SAEError
from lmscope.sae import FORMATS, detect_format, export_sae, import_sae, load_sae, save_sae

# (variant id, format) pairs a format cannot express
REFUSED = {("topk", "gemmascope"), ("topk", "gemmascope2"), ("skip_transcoder", "gemmascope")}


def _variant_id(variant: dict[str, object]) -> str:
    if variant["architecture"] == "jumprelu_transcoder":
        return "skip_transcoder" if variant.get("skip") else "transcoder"
    return str(variant["architecture"])


def test_native_round_trip_keeps_everything_including_the_training_state(
    make_sae, tmp_path
) -> None:
    sae = make_sae(architecture="batchtopk", k=4, input_scale=2.0, training={"steps": 7})
    path = save_sae(sae, tmp_path / "sae")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "weights.safetensors"]
    back = load_sae(path)
    assert back.cfg == sae.cfg
    for k, v in sae.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_native_save_replaces_an_existing_folder_and_leaves_no_temp_files(
    make_sae, tmp_path
) -> None:
    save_sae(make_sae(architecture="relu"), tmp_path / "sae")
    save_sae(make_sae(architecture="jumprelu", seed=1), tmp_path / "sae")
    assert load_sae(tmp_path / "sae").cfg.architecture == "jumprelu"
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_round_trips_to_identical_outputs(make_sae, variant, fmt, tmp_path) -> None:
    scale: dict[str, float] = {"input_scale": 3.0}
    if "transcoder" in str(variant["architecture"]):
        scale["output_scale"] = 0.5
    sae = make_sae(dtype="float32", **variant, **scale)
    sae.eval()
    if (_variant_id(variant), fmt) in REFUSED:
        with pytest.raises(SAEError, match=f"format '{fmt}'"):
            export_sae(sae, tmp_path / "out", fmt)
        return
    path = export_sae(sae, tmp_path / "out", fmt)
    assert detect_format(path) == fmt
    back = import_sae(path)
    ref = sae if fmt == "native" else sae.folded()
    x = 4 * torch.randn(40, 6, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(back.encode(x), ref.encode(x), rtol=0, atol=0)
    torch.testing.assert_close(back(x), ref(x), rtol=0, atol=0)
    assert back.cfg.site == sae.cfg.site and back.cfg.model == sae.cfg.model
    if fmt != "native":
        assert back.cfg.is_folded


def test_unknown_format_is_an_error_naming_the_valid_ones(make_sae, tmp_path) -> None:
    with pytest.raises(SAEError, match="valid: native, saelens, gemmascope, gemmascope2"):
        export_sae(make_sae(architecture="jumprelu"), tmp_path / "x", "onnx")


def test_refusal_names_formats_that_can_express_the_architecture(make_sae, tmp_path) -> None:
    with pytest.raises(SAEError, match="use one of: native, saelens"):
        export_sae(make_sae(architecture="topk", k=2), tmp_path / "x", "gemmascope2")
    assert not (tmp_path / "x").exists()


def test_gemmascope2_files_follow_the_published_layout(make_sae, tmp_path) -> None:
    sae = make_sae(architecture="jumprelu_transcoder", d_out=5, skip=True, out_site="L2.mlp_out")
    path = export_sae(sae, tmp_path / "gs2", "gemmascope2")
    from safetensors.torch import load_file

    keys = set(load_file(str(path / "params.safetensors")))
    assert keys == {"w_enc", "w_dec", "b_enc", "b_dec", "threshold", "affine_skip_connection"}
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["hf_hook_point_in"] == "model.layers.2.pre_feedforward_layernorm.output"
    assert cfg["hf_hook_point_out"] == "model.layers.2.post_feedforward_layernorm.output"
    assert cfg["type"] == "transcoder" and cfg["affine_connection"] is True


def test_imports_a_gemmascope1_npz_with_published_key_names(tmp_path) -> None:
    g = np.random.default_rng(0)
    p = {"W_enc": g.normal(size=(6, 10)), "W_dec": g.normal(size=(10, 6)), "b_enc": g.normal(size=10),
         "b_dec": g.normal(size=6), "threshold": np.abs(g.normal(size=10))}  # fmt: skip
    np.savez(tmp_path / "params.npz", **{k: v.astype(np.float32) for k, v in p.items()})
    sae = import_sae(tmp_path)
    x = torch.randn(8, 6)
    z = x @ torch.tensor(p["W_enc"], dtype=torch.float32) + torch.tensor(
        p["b_enc"], dtype=torch.float32
    )
    f = z.relu() * (z > torch.tensor(p["threshold"], dtype=torch.float32))
    torch.testing.assert_close(sae.encode(x), f)
    assert sae.cfg.architecture == "jumprelu" and not sae.cfg.apply_b_dec_to_input


def test_imports_a_saelens_sae_that_subtracts_b_dec_by_folding_it(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    w = {"W_enc": torch.randn(6, 10, generator=g), "W_dec": torch.randn(10, 6, generator=g),
         "b_enc": torch.randn(10, generator=g), "b_dec": torch.randn(6, generator=g)}  # fmt: skip
    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    cfg = {"architecture": "standard", "d_in": 6, "d_sae": 10, "dtype": "float32",
           "apply_b_dec_to_input": True, "normalize_activations": "none",
           "metadata": {"model_name": "gpt2", "hook_name": "blocks.3.hook_resid_pre"}}  # fmt: skip
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    sae = import_sae(tmp_path)
    x = torch.randn(8, 6)
    f = ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).relu()
    torch.testing.assert_close(sae.encode(x), f, rtol=1e-5, atol=1e-5)
    assert sae.cfg.architecture == "relu" and sae.cfg.site == "L3.resid_pre"


def test_import_from_a_hugging_face_path_uses_the_hub_and_guesses_the_site(
    tmp_path, monkeypatch
) -> None:
    import huggingface_hub

    sub = "layer_20/width_16k/average_l0_71"
    (tmp_path / sub).mkdir(parents=True)
    arrays = {"W_enc": np.ones((4, 8)), "W_dec": np.ones((8, 4)), "b_enc": np.zeros(8),
              "b_dec": np.zeros(4), "threshold": np.ones(8)}  # fmt: skip
    np.savez(tmp_path / sub / "params.npz", **{k: v.astype(np.float32) for k, v in arrays.items()})
    calls = []

    def fake_download(repo_id: str, allow_patterns: list[str] | None = None) -> str:
        calls.append((repo_id, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    sae = import_sae(f"google/gemma-scope-2b-pt-res/{sub}")
    assert calls == [("google/gemma-scope-2b-pt-res", [f"{sub}/*"])]
    assert sae.cfg.site == "L20.resid_post" and sae.cfg.model == "google/gemma-2-2b"


def test_import_offline_gives_an_actionable_error(monkeypatch) -> None:
    import huggingface_hub

    def offline(*a: object, **k: object) -> str:
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(SAEError, match="could not download .* or pass a local folder"):
        import_sae("google/gemma-scope-2b-pt-res/layer_0/width_16k/average_l0_1")


def test_folders_without_an_sae_are_errors(tmp_path) -> None:
    with pytest.raises(SAEError, match="no SAE found"):
        import_sae(tmp_path)
    with pytest.raises(SAEError, match="not an lmscope SAE folder"):
        load_sae(tmp_path)
