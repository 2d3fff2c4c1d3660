"""Splice, steer, clamp and ablate: what each does to the site and the output, and how they compose."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from lmscope.errors import InterventionError, SiteError
from lmscope.intervene import (
    Ablate,
    Clamp,
    Splice,
    Steer,
    compare,
    generate,
    generate_ids,
    intervene,
    latent_means,
)
from lmscope.model import LoadedModel, SiteModel
from lmscope.sae import SAE, SAEConfig, build_sae

PROMPT = "The capital of France is"


def read(loaded: LoadedModel, ids: torch.Tensor, site: str) -> torch.Tensor:
    """The value at `site` as the model sees it (inside `intervene`: after the interventions)."""
    with torch.no_grad():
        return SiteModel(loaded).run(ids, read=[site], return_logits=False).acts[site][0]


def logits(loaded: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(ids).logits[0]


SITES = ["L1.resid_post", "L2.mlp_out", "L1.attn_z", "L2.resid_mid"]


def active_latent(sae: SAE, x: torch.Tensor, position: int) -> int:
    f = sae.encode(x[position])
    assert (f > 0).any(), "the random SAE should have an active latent here"
    return int(f.argmax())


def test_splice_with_error_term_leaves_logits_unchanged(
    tiny: LoadedModel, ids: torch.Tensor, random_sae: Callable[..., SAE]
) -> None:
    saes = [random_sae(tiny, s, seed=i) for i, s in enumerate(SITES)]
    clean = logits(tiny, ids)
    with intervene(tiny, [Splice(s) for s in saes]):
        spliced = logits(tiny, ids)
    torch.testing.assert_close(spliced, clean, rtol=0, atol=1e-6)


def test_splice_without_error_term_is_the_reconstruction_except_at_bos(tiny: LoadedModel, ids: torch.Tensor, random_sae: Callable[..., SAE]) -> None:  # fmt: skip
    site = "L1.resid_post"
    sae = random_sae(tiny, site)
    x = read(tiny, ids, site)
    with intervene(tiny, [Splice(sae, error=False)]):
        spliced = read(tiny, ids, site)
        changed = logits(tiny, ids)
    torch.testing.assert_close(spliced[1:], sae(x[1:]).detach())
    torch.testing.assert_close(spliced[0], x[0])  # BOS keeps its value
    assert not torch.allclose(changed, logits(tiny, ids))


def test_clamping_a_latent_to_its_own_value_is_a_no_op(
    tiny: LoadedModel, ids: torch.Tensor, random_sae: Callable[..., SAE]
) -> None:
    site = "L1.resid_post"
    sae = random_sae(tiny, site)
    x = read(tiny, ids, site)
    i = active_latent(sae, x, 3)
    own = float(sae.encode(x[3])[i].detach())
    clean = logits(tiny, ids)
    with intervene(tiny, [Splice(sae), Clamp(sae, i, own, positions=[3])]):
        clamped = logits(tiny, ids)
    torch.testing.assert_close(clamped, clean, rtol=0, atol=1e-6)
    with intervene(tiny, [Clamp(sae, i, own + 5.0, positions=[3])]):
        assert not torch.allclose(logits(tiny, ids), clean)


@pytest.mark.parametrize("site", ["L1.resid_post", "L2.resid_mid", "L1.attn_z", "L0.mlp_out"])
def test_steering_moves_the_site_by_exactly_coeff_times_the_decoder_row(tiny: LoadedModel, ids: torch.Tensor, site: str, random_sae: Callable[..., SAE]) -> None:  # fmt: skip
    sae = random_sae(tiny, site)
    clean = read(tiny, ids, site)
    with intervene(tiny, [Steer(sae, 5, 3.5, positions=[2, 4])]):
        steered = read(tiny, ids, site)
    expected = torch.zeros_like(clean)
    expected[[2, 4]] = 3.5 * sae.W_dec[5].detach()
    torch.testing.assert_close(steered - clean, expected, atol=1e-5, rtol=0)


def test_steering_without_positions_skips_bos(
    tiny: LoadedModel, ids: torch.Tensor, random_sae: Callable[..., SAE]
) -> None:
    sae = random_sae(tiny, "L1.resid_post")
    clean = read(tiny, ids, "L1.resid_post")
    with intervene(tiny, [Steer(sae, 5, -2.0)]):
        steered = read(tiny, ids, "L1.resid_post")
    torch.testing.assert_close(steered[0], clean[0])
    torch.testing.assert_close(steered[1:] - clean[1:], (-2.0 * sae.W_dec[5].detach()).expand(len(clean) - 1, -1), atol=1e-5, rtol=0)  # fmt: skip


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_ablating_changes_the_output_exactly_as_a_manual_hook_does(tiny: LoadedModel, ids: torch.Tensor, mode: str, random_sae: Callable[..., SAE]) -> None:  # fmt: skip
    site = "L1.resid_post"
    sae = random_sae(tiny, site)
    latents = [1, 7, 20]
    mean = torch.rand(sae.cfg.d_sae, generator=torch.Generator().manual_seed(3))

    def manual(x: torch.Tensor) -> torch.Tensor:
        f = sae.encode(x)
        target = mean[latents] if mode == "mean" else torch.zeros(len(latents))
        delta = (target - f[..., latents]) @ sae.W_dec[latents]
        delta[:, 0] = 0  # BOS is left alone
        return x + delta

    with torch.no_grad():
        expected = SiteModel(tiny).run(ids, replace={site: manual}).logits[0]
    with intervene(tiny, [Ablate(sae, latents, mode=mode, mean=mean if mode == "mean" else None)]):
        ablated = logits(tiny, ids)
    torch.testing.assert_close(ablated, expected)
    assert not torch.allclose(ablated, logits(tiny, ids))


def test_latent_edits_on_one_sae_apply_in_list_order(
    tiny_gemma3: LoadedModel, random_sae: Callable[..., SAE]
) -> None:
    site = "L1.resid_post"
    sae = random_sae(tiny_gemma3, site)
    ids = tiny_gemma3.tokenizer(PROMPT, return_tensors="pt").input_ids
    x = read(tiny_gemma3, ids, site)
    f = sae.encode(x).detach()
    w = sae.W_dec.detach()
    with intervene(tiny_gemma3, [Clamp(sae, 4, 9.0), Ablate(sae, [4])]):
        ablated_last = read(tiny_gemma3, ids, site)
    with intervene(tiny_gemma3, [Ablate(sae, [4]), Clamp(sae, 4, 9.0)]):
        clamped_last = read(tiny_gemma3, ids, site)
    torch.testing.assert_close(ablated_last[1:], x[1:] - f[1:, 4:5] * w[4], atol=1e-5, rtol=0)
    torch.testing.assert_close(clamped_last[1:], x[1:] + (9.0 - f[1:, 4:5]) * w[4], atol=1e-5, rtol=0)  # fmt: skip


def test_splice_steer_and_clamp_compose_on_one_sae(
    tiny_gemma3: LoadedModel, random_sae: Callable[..., SAE]
) -> None:
    site = "L2.resid_post"
    sae = random_sae(tiny_gemma3, site)
    ids = tiny_gemma3.tokenizer(PROMPT, return_tensors="pt").input_ids
    x = read(tiny_gemma3, ids, site)
    with intervene(tiny_gemma3, [Splice(sae, error=False), Steer(sae, 3, 2.0), Clamp(sae, 9, 4.0)]):  # fmt: skip
        got = read(tiny_gemma3, ids, site)
    f = sae.encode(x).detach()
    f[:, 9] = 4.0
    expected = sae.decode(f).detach() + 2.0 * sae.W_dec[3].detach()
    torch.testing.assert_close(got[1:], expected[1:], atol=1e-5, rtol=1e-5)


def _greedy_without_cache(loaded: LoadedModel, ids: torch.Tensor, n: int) -> list[int]:
    out = ids
    with torch.no_grad():
        for _ in range(n):
            nxt = loaded.model(out, use_cache=False).logits[0, -1].argmax()
            out = torch.cat([out, nxt.view(1, 1)], dim=1)
    return out[0, ids.shape[1] :].tolist()


def test_positions_count_absolute_positions_during_cached_generation(tiny: LoadedModel, ids: torch.Tensor, random_sae: Callable[..., SAE]) -> None:  # fmt: skip
    sae = random_sae(tiny, "L1.resid_post")
    t = ids.shape[1]
    steer = [Steer(sae, 2, 40.0, positions=[t + 1, t + 3])]  # two generated tokens only
    clean = generate_ids(tiny, ids, max_new_tokens=6).tolist()
    with intervene(tiny, steer):
        cached = generate_ids(tiny, ids, max_new_tokens=6).tolist()
        reference = _greedy_without_cache(tiny, ids, 6)
    assert cached == reference
    assert cached[:2] == clean[:2] and cached != clean  # before t + 1 nothing changed


def test_hf_generate_sees_the_interventions(
    tiny: LoadedModel, ids: torch.Tensor, random_sae: Callable[..., SAE]
) -> None:
    sae = random_sae(tiny, "L2.resid_post")
    with intervene(tiny, [Steer(sae, 0, 30.0)]):
        ours = generate_ids(tiny, ids, max_new_tokens=5).tolist()
        with torch.no_grad():
            hf = tiny.model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)  # fmt: skip
    assert hf[0, ids.shape[1] :].tolist() == ours


def test_hooks_are_removed_on_exit_even_after_an_error(
    tiny_gemma3: LoadedModel, random_sae: Callable[..., SAE]
) -> None:
    sae = random_sae(tiny_gemma3, "L1.resid_post")
    ids = tiny_gemma3.tokenizer(PROMPT, return_tensors="pt").input_ids
    clean = logits(tiny_gemma3, ids)
    with pytest.raises(RuntimeError), intervene(tiny_gemma3, [Steer(sae, 0, 30.0)]):
        raise RuntimeError("boom")
    torch.testing.assert_close(logits(tiny_gemma3, ids), clean, rtol=0, atol=0)
    hooks = intervene(tiny_gemma3, [Steer(sae, 0, 30.0)]).attach()
    assert not torch.allclose(logits(tiny_gemma3, ids), clean)
    hooks.remove()
    torch.testing.assert_close(logits(tiny_gemma3, ids), clean, rtol=0, atol=0)


def test_generation_is_seeded_and_greedy_at_temperature_zero(
    tiny_gemma3: LoadedModel, random_sae: Callable[..., SAE]
) -> None:
    sae = random_sae(tiny_gemma3, "L1.resid_post")
    steer = [Steer(sae, 1, 20.0)]
    a = generate(tiny_gemma3, PROMPT, steer, temperature=1.0, seed=1, max_new_tokens=12)
    assert a == generate(tiny_gemma3, PROMPT, steer, temperature=1.0, seed=1, max_new_tokens=12)
    assert a != generate(tiny_gemma3, PROMPT, steer, temperature=1.0, seed=2, max_new_tokens=12)
    greedy = generate(tiny_gemma3, PROMPT, steer, max_new_tokens=12)
    assert greedy != generate(tiny_gemma3, PROMPT, (), max_new_tokens=12)
    assert greedy == generate(tiny_gemma3, PROMPT, steer, max_new_tokens=12, seed=5)


def test_compare_reports_top_tokens_and_kl(
    tiny_gemma3: LoadedModel, random_sae: Callable[..., SAE]
) -> None:
    sae = random_sae(tiny_gemma3, "L3.resid_post")
    same = compare(tiny_gemma3, PROMPT, [Splice(sae)], top=4)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["clean"] == same["intervened"]
    moved = compare(tiny_gemma3, PROMPT, [Steer(sae, 0, 50.0)], top=4)
    assert moved["kl"] > 1e-3
    probs = [p for _, p in moved["clean"]]
    assert len(probs) == 4 and probs == sorted(probs, reverse=True)


def test_latent_means_average_ordinary_tokens(
    tiny_gemma3: LoadedModel, random_sae: Callable[..., SAE]
) -> None:
    sae = random_sae(tiny_gemma3, "L1.resid_post")
    texts = [PROMPT, "def add(a, b):"]
    mean = latent_means(tiny_gemma3, sae, texts)
    acts = [read(tiny_gemma3, tiny_gemma3.tokenizer(t, return_tensors="pt").input_ids, "L1.resid_post")[1:] for t in texts]  # fmt: skip
    torch.testing.assert_close(mean, sae.encode(torch.cat(acts)).mean(0).detach())


def test_bad_interventions_are_errors_naming_valid_choices(
    tiny_gemma3: LoadedModel, random_sae: Callable[..., SAE]
) -> None:
    sae = random_sae(tiny_gemma3, "L1.resid_post")
    with pytest.raises(InterventionError, match="valid latents: 0-31"):
        Steer(sae, 32, 1.0)
    with pytest.raises(InterventionError, match="valid latents: 0-31"):
        Ablate(sae, [3, -1])
    with pytest.raises(InterventionError, match="valid: zero, mean"):
        Ablate(sae, [3], mode="resample")
    with pytest.raises(InterventionError, match="needs mean="):
        Ablate(sae, [3], mode="mean")
    far = build_sae(SAEConfig("jumprelu", d_in=64, d_sae=8, site="L9.resid_post"))
    with pytest.raises(SiteError, match="layers 0-3"):
        intervene(tiny_gemma3, [Steer(far, 0, 1.0)])
    with pytest.raises(InterventionError, match="at most one SAE"):
        other = random_sae(tiny_gemma3, "L1.resid_post", seed=1)
        intervene(tiny_gemma3, [Splice(sae, error=False), Splice(other, error=False)])
