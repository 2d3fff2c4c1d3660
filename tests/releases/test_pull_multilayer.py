"""Pull Gemma Scope 2 cross-layer transcoders and crosscoders from a local HF-cache layout (offline)
into a suite: the sites the files declare, encode/decode equal to numpy on the files, eval, export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from published import (
    multilayer_config,
    multilayer_params,
    numpy_multilayer,
    snapshot,
    write_gs2_multilayer,
)
from safetensors.numpy import load_file
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from lmscope.cli import main
from lmscope.errors import SAEError
from lmscope.model import SiteModel, load_model
from lmscope.model.tiny import tiny_tokenizer
from lmscope.releases.pull import pull
from lmscope.sae.multilayer import save_multilayer
from lmscope.suite import Suite

D = 64  # the stand-in model's d_model
N = 26  # Gemma 3 1B's layers: the 1b CLT spans all of them, its crosscoder reads 7, 13, 17, 22
CROSS = [7, 13, 17, 22]
REPO = "google/gemma-scope-2-1b-pt"
CLT_FOLDER = "clt/width_262k_l0_medium_affine"
CC_FOLDER = "crosscoder/layer_7_13_17_22_width_262k_l0_medium"
W_CLT, W_CC = 6, 12  # latents per layer: small for speed (262k = 26 × 10,080 in the release)
PROMPT = "The capital of France is Paris, and Rome is in Italy."


@pytest.fixture(scope="module")
def deep_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 26-layer Gemma 3 of d_model 64, saved as a model folder: a stand-in for Gemma 3
    1B with its layer count (the tiny models have 4 layers)."""
    folder = tmp_path_factory.mktemp("deep") / "gemma3-26"
    pattern = ["sliding_attention"] * 5 + ["full_attention"]
    cfg = Gemma3TextConfig(vocab_size=384, hidden_size=D, intermediate_size=128,
                           num_hidden_layers=N, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, max_position_embeddings=512, query_pre_attn_scalar=16,
                           sliding_window=8, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                           layer_types=[pattern[i % 6] for i in range(N)])  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Gemma3ForCausalLM(cfg).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def published(tmp_path: Path) -> tuple[Path, dict[str, list[dict[str, np.ndarray]]]]:
    """An HF cache holding the 1b CLT (affine) and crosscoder folders in the published layout."""
    cache = tmp_path / "hf-cache"
    snap = snapshot(cache, REPO)
    rng = np.random.default_rng(0)
    clt = multilayer_params(rng, N, D, W_CLT, affine=True)
    write_gs2_multilayer(snap, CLT_FOLDER, clt,
                         multilayer_config("mlp_in", "mlp_out", list(range(N)), N * W_CLT,
                                           "google/gemma-3-1b-pt", 50, True, "clt"))  # fmt: skip
    cc = multilayer_params(rng, len(CROSS), D, W_CC, affine=False)
    write_gs2_multilayer(snap, CC_FOLDER, cc,
                         multilayer_config("resid_post", "resid_post", CROSS, len(CROSS) * W_CC,
                                           "google/gemma-3-1b-pt", 50, False, "crosscoder"))  # fmt: skip
    return cache, {CLT_FOLDER: clt, CC_FOLDER: cc}


def _acts(model: str, sites: list[str]) -> np.ndarray:
    """[T, n, d]: the prompt's activations at ``sites``, stacked."""
    loaded = load_model(model)
    ids = loaded.tokenizer([PROMPT], return_tensors="pt").input_ids
    acts = SiteModel(loaded).run(ids, read=sites, return_logits=False).acts
    return torch.stack([acts[s][0] for s in sites], 1).detach().numpy()


def test_pull_clt_and_crosscoder_offline_sites_compute_eval_export(
    published: tuple[Path, dict[str, list[dict[str, np.ndarray]]]],
    deep_tiny: Path,
    tmp_path: Path,
    shared_text_corpus: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache, files = published
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "suite"
    for name, extra in (("gemma-scope-2-1b-pt-clt", ["--affine", "yes"]),
                        ("gemma-scope-2-1b-pt-crosscoder", [])):  # fmt: skip
        rc = main(["pull", name, "--widths", "262k", "--l0", "medium", *extra, "--model",
                   str(deep_tiny), "--cache-dir", str(cache), "--out", str(out)])  # fmt: skip
        assert rc == 0
    suite = Suite.open(out)
    assert suite.names == [] and len(suite.multilayer_names) == 2
    by_kind = {e["multilayer"]: e for e in suite.multilayer_entries}
    # the sites the files declare: a CLT's params_layer_i is layer i's mlp_in → mlp_out, the
    # crosscoder's i-th file the i-th layer its folder name lists
    assert by_kind["clt"]["sites"] == [f"L{i}.mlp_in" for i in range(N)]
    assert by_kind["clt"]["out_sites"] == [f"L{i}.mlp_out" for i in range(N)]
    assert by_kind["crosscoder"]["sites"] == [f"L{i}.resid_post" for i in CROSS]
    assert by_kind["crosscoder"]["out_sites"] == by_kind["crosscoder"]["sites"]
    assert (by_kind["clt"]["d_sae_total"], by_kind["crosscoder"]["d_sae_total"]) == (N * W_CLT, 4 * W_CC)  # fmt: skip
    assert by_kind["clt"]["skip"] and not by_kind["crosscoder"]["skip"]
    for kind, e in by_kind.items():
        sae = suite.load_multilayer(e["name"])
        src = sae.training["source"]
        assert src["repo"] == REPO and src["revision"] and sae.model == str(deep_tiny)
        per = files[src["folder"]]
        x = _acts(str(deep_tiny), e["sites"])
        want_f, want_y = numpy_multilayer(per, x, causal=kind == "clt")
        f = sae.encode(torch.from_numpy(x))
        np.testing.assert_allclose(f.double().numpy(), want_f, rtol=1e-5, atol=1e-5)
        assert (f > 0).any() and (f == 0).any()
        np.testing.assert_allclose(sae(torch.from_numpy(x)).double().numpy(), want_y, rtol=1e-4, atol=1e-4)  # fmt: skip
        # export back to Gemma Scope 2: the same files, tensor for tensor, and the same config
        back = save_multilayer(sae, tmp_path / "back" / kind)
        for i, p in enumerate(per):
            got = load_file(str(back / f"params_layer_{i}.safetensors"))
            assert set(got) == set(p) and all(np.array_equal(got[k], p[k]) for k in p)
        folder = cache / f"models--{REPO.replace('/', '--')}" / "snapshots"
        published_cfg = next(folder.glob(f"*/{src['folder']}/config.json"))
        assert json.loads((back / "config.json").read_text()) == json.loads(published_cfg.read_text())  # fmt: skip

    from lmscope.evals import EvalConfig, evaluate_suite

    results = evaluate_suite(suite, EvalConfig(corpus=str(shared_text_corpus), seq_len=32,
                                               tokens=256, progress=False))  # fmt: skip
    assert set(results) == set(suite.multilayer_names)
    suite = Suite.open(out)
    for e in suite.multilayer_entries:
        m = e["metrics"]
        assert m["l0"] > 0 and np.isfinite(m["fvu"]) and m["kl"] > 0
        assert np.isfinite(m["delta_lm_loss"]) and np.isfinite(m["ce_recovered"])
        doc = json.loads((out / e["name"] / "eval.json").read_text())
        assert doc["by_layer"]["sites"] == e["sites"] and len(doc["by_layer"]["l0"]) == len(e["sites"])  # fmt: skip
        assert m["l0"] == pytest.approx(sum(doc["by_layer"]["l0"]))
    # serve and interpret read per-site SAEs: a suite of only CLTs/crosscoders is one clear line
    from lmscope.errors import ConfigError
    from lmscope.interp.pipeline import interpret
    from lmscope.serve.app import create_app

    for run in (lambda: create_app(out), lambda: interpret(out)):
        with pytest.raises(ConfigError, match="only cross-layer transcoders or crosscoders") as e:
            run()
        assert "\n" not in str(e.value)


def test_pull_refuses_a_clt_of_another_depth_or_width_in_one_line(
    deep_tiny: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "hf-cache"
    snap = snapshot(cache, REPO)
    rng = np.random.default_rng(1)
    write_gs2_multilayer(snap, "clt/width_262k_l0_medium", multilayer_params(rng, 4, D, 4, False))
    with pytest.raises(SAEError, match="holds 4 layers; the registry expects 26 \\(0-25\\)"):
        pull("gemma-scope-2-1b-pt-clt", tmp_path / "s", widths=["262k"], l0s=["medium"],
             affine=False, model=str(deep_tiny), cache_dir=cache, offline=True, progress=None)  # fmt: skip
    write_gs2_multilayer(snap, "clt/width_524k_l0_medium", multilayer_params(rng, N, 32, 4, False))
    with pytest.raises(SAEError, match="expects width 32 at L0.mlp_in and 32 at L0.mlp_out but the model has 64"):  # fmt: skip
        pull("gemma-scope-2-1b-pt-clt", tmp_path / "s", widths=["524k"], l0s=["medium"],
             affine=False, model=str(deep_tiny), cache_dir=cache, offline=True, progress=None)  # fmt: skip
    assert not (tmp_path / "s").exists()  # nothing written before every check passed
