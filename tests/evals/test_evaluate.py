"""Each eval metric equals a direct computation on a tiny model, and the fast path (clean stream cached,
only the layers from the site on) equals one plain full forward per SAE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from eval_helpers import identity_sae, random_sae, token_blocks, zero_sae
from torch import Tensor

from lmscope.data import TokenBlock
from lmscope.evals import EvalConfig, evaluate_saes
from lmscope.model import KINDS, LoadedModel, decoder_layers
from lmscope.sae import SAE, SAEConfig, build_sae

LAST = 3  # the tiny models have layers 0-3


def direct_metrics(
    loaded: LoadedModel, sae: SAE, layer: int, blocks: list[TokenBlock]
) -> dict[str, float]:
    """Every metric of a resid_post SAE, straight from the transformers model with a raw torch hook."""
    sae = sae.folded().double()
    block_module = decoder_layers(loaded.model)[layer]
    xs, xhats, fs, ce = [], [], [], {"clean": [], "spliced": [], "zero": [], "kl": []}
    for b in blocks:
        ids, mask = b.input_ids, b.mask
        seen: list[Tensor] = []

        def hook(
            _m: object,
            _a: object,
            out: Tensor,
            how: str,
            seen: list[Tensor] = seen,
            mask: Tensor = mask,
        ) -> Tensor:
            seen.append(out)
            if how == "zero":
                return out.masked_fill(mask[..., None], 0.0)
            return torch.where(mask[..., None], sae(out.double()).float(), out)

        logits = {}
        for how in ("clean", "spliced", "zero"):
            h = (
                None
                if how == "clean"
                else block_module.register_forward_hook(lambda m, a, o, how=how: hook(m, a, o, how))
            )
            with torch.no_grad():
                logits[how] = loaded.model(input_ids=ids).logits.double()
            if h is not None:
                h.remove()
        if not seen:
            continue
        with torch.no_grad():
            x = seen[0][mask].double()
            f = sae.encode(x)
            xs.append(x), fs.append(f), xhats.append(sae.decode(f))  # type: ignore[func-returns-value]
        rows = mask[:, :-1] & mask[:, 1:]
        target = ids[:, 1:][rows]
        for how in ("clean", "spliced", "zero"):
            ce[how].append(F.cross_entropy(logits[how][:, :-1][rows], target, reduction="none"))
        lp_clean = logits["clean"][:, :-1][rows].log_softmax(-1)
        lp = logits["spliced"][:, :-1][rows].log_softmax(-1)
        ce["kl"].append(F.kl_div(lp, lp_clean, log_target=True, reduction="none").sum(-1))
    x, x_hat, f = torch.cat(xs), torch.cat(xhats), torch.cat(fs)
    c = {k: torch.cat(v).mean().item() for k, v in ce.items()}
    freq = (f != 0).double().mean(0)
    return {
        "l0": (f != 0).sum(-1).double().mean().item(),
        "fvu": ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item(),
        "cos_sim": F.cosine_similarity(x, x_hat, dim=-1).mean().item(),
        "mse": (x - x_hat).pow(2).sum(-1).mean().item(),
        "delta_lm_loss": c["spliced"] - c["clean"],
        "kl": c["kl"],
        "ce_clean": c["clean"],
        "ce_spliced": c["spliced"],
        "ce_zero": c["zero"],
        "dead": int((freq == 0).sum()),
        "dense": int((freq > 0.1).sum()),
        "tokens": len(x),
    }


def assert_same_metrics(a: dict[str, float], b: dict[str, float], name: str) -> None:
    """Equal to float32 rounding; CE recovered through its parts, as its denominator (the cost of
    zero-ablation) can be tiny on a random model and amplify rounding."""
    for key, value in b.items():
        if key != "ce_recovered":
            assert a[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (name, key)
    parts = (a["ce_zero"] - a["ce_spliced"]) / (a["ce_zero"] - a["ce_clean"])
    assert a["ce_recovered"] == pytest.approx(parts, rel=1e-9)


@pytest.mark.parametrize("layer", [1, LAST])
def test_every_metric_equals_a_direct_computation_with_a_raw_hook(
    tiny: LoadedModel, layer: int
) -> None:
    blocks = token_blocks(tiny)
    sae = random_sae(tiny, f"L{layer}.resid_post")
    got = evaluate_saes(tiny, {"sae": sae}, blocks)["sae"].scalars
    want = direct_metrics(tiny, sae, layer, blocks)
    assert got["tokens"] == want["tokens"] == sum(b.n_tokens for b in blocks)
    assert got["dead"] == want["dead"] and got["dense"] == want["dense"]
    assert 0 < want["dead"] + want["dense"] < 96, (
        "the random SAE should have live, dead or dense latents"
    )
    for key in (
        "l0",
        "fvu",
        "cos_sim",
        "mse",
        "delta_lm_loss",
        "kl",
        "ce_clean",
        "ce_spliced",
        "ce_zero",
    ):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    # CE recovered from its parts: on a random model zero-ablation can cost almost nothing, and
    # that tiny denominator would amplify float32 rounding
    parts = (got["ce_zero"] - got["ce_spliced"]) / (got["ce_zero"] - got["ce_clean"])
    assert got["ce_recovered"] == pytest.approx(parts, rel=1e-9)
    assert got["explained_variance"] == pytest.approx(1 - want["fvu"], rel=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_the_fast_path_equals_one_full_forward_per_sae_at_every_site_kind(
    tiny: LoadedModel, kind: str
) -> None:
    blocks = token_blocks(tiny)
    saes = {
        f"L{layer}": random_sae(tiny, f"L{layer}.{kind}", seed=layer) for layer in range(LAST + 1)
    }
    fast = evaluate_saes(tiny, saes, blocks)
    ref = evaluate_saes(tiny, saes, blocks, EvalConfig(fast=False))
    for name in saes:
        a, b = fast[name].scalars, ref[name].scalars
        assert a["delta_lm_loss"] != 0
        assert_same_metrics(a, b, name)
        pa, pb = fast[name].arrays["by_position"], ref[name].arrays["by_position"]
        nan = float("nan")
        pa_d, pb_d = ([nan if v is None else v for v in p["delta_lm_loss"]] for p in (pa, pb))
        assert pa_d == pytest.approx(pb_d, rel=1e-3, abs=1e-5, nan_ok=True)


@pytest.mark.parametrize("skip", [False, True])
def test_a_transcoder_is_spliced_at_its_output_site(tiny_gemma3: LoadedModel, skip: bool) -> None:
    blocks = token_blocks(tiny_gemma3)
    cfg = SAEConfig(
        "jumprelu_transcoder",
        d_in=64,
        d_sae=96,
        site="L1.mlp_in",
        out_site="L1.mlp_out",
        model="tiny-gemma3",
        skip=skip,
    )
    tc = build_sae(cfg, torch.Generator().manual_seed(0))
    if skip:
        with torch.no_grad():
            tc.W_skip.normal_(0, 0.05)
    fast = evaluate_saes(tiny_gemma3, {"tc": tc}, blocks)["tc"].scalars
    ref = evaluate_saes(tiny_gemma3, {"tc": tc}, blocks, EvalConfig(fast=False))["tc"].scalars
    assert_same_metrics(fast, ref, "tc")


@pytest.mark.parametrize("site", ["L0.resid_pre", "L1.attn_z", "L2.resid_mid", "L3.resid_post"])
def test_an_identity_sae_gives_zero_delta_lm_loss_kl_and_fvu(tiny: LoadedModel, site: str) -> None:
    s = evaluate_saes(tiny, {"id": identity_sae(tiny, site)}, token_blocks(tiny))["id"].scalars
    assert s["delta_lm_loss"] == pytest.approx(0.0, abs=1e-6)
    assert s["kl"] == pytest.approx(0.0, abs=1e-6)
    assert s["fvu"] == pytest.approx(0.0, abs=1e-10)
    assert s["cos_sim"] == pytest.approx(1.0)
    assert s["ce_recovered"] == pytest.approx(1.0, abs=1e-4)


def test_a_zero_sae_is_zero_ablation_so_it_recovers_no_loss(tiny: LoadedModel) -> None:
    s = evaluate_saes(tiny, {"z": zero_sae(tiny, "L1.resid_post")}, token_blocks(tiny))["z"].scalars
    assert s["ce_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert s["delta_lm_loss"] == pytest.approx(s["ce_zero"] - s["ce_clean"], rel=1e-6)
    assert s["fvu"] > 1  # predicting 0 is worse than predicting the mean
    assert s["cos_sim"] == 0


def test_many_saes_in_one_pass_equal_each_evaluated_alone(tiny_gemma3: LoadedModel) -> None:
    blocks = token_blocks(tiny_gemma3)
    saes = {
        "a": random_sae(tiny_gemma3, "L1.resid_post"),
        "b": random_sae(tiny_gemma3, "L1.resid_post", seed=5),
        "c": random_sae(tiny_gemma3, "L2.mlp_out"),
    }
    together = evaluate_saes(tiny_gemma3, saes, blocks)
    for name, sae in saes.items():
        alone = evaluate_saes(tiny_gemma3, {name: sae}, blocks)[name].scalars
        assert together[name].scalars == pytest.approx(alone, rel=1e-9)


def test_position_arrays_add_up_to_the_means(tiny: LoadedModel) -> None:
    blocks = token_blocks(tiny)
    r = evaluate_saes(tiny, {"s": random_sae(tiny, "L2.resid_post")}, blocks)["s"]
    pos = r.arrays["by_position"]
    seq_len = blocks[0].input_ids.shape[1]
    assert len(pos["delta_lm_loss"]) == len(pos["fvu"]) == seq_len
    assert pos["tokens"][0] == 0 and pos["fvu"][0] is None  # BOS is never evaluated
    assert sum(pos["tokens"]) == r.scalars["tokens"]
    n = sum(pos["loss_tokens"])
    mean = sum(d * k for d, k in zip(pos["delta_lm_loss"], pos["loss_tokens"]) if k) / n
    assert n == r.scalars["loss_tokens"] and mean == pytest.approx(
        r.scalars["delta_lm_loss"], rel=1e-6
    )
    fvu = sum(f * k for f, k in zip(pos["fvu"], pos["tokens"]) if k) / r.scalars["tokens"]
    assert fvu == pytest.approx(r.scalars["fvu"], rel=1e-6)


def test_histograms_count_every_latent_and_every_token(tiny_gemma3: LoadedModel) -> None:
    r = evaluate_saes(
        tiny_gemma3, {"s": random_sae(tiny_gemma3, "L1.resid_post")}, token_blocks(tiny_gemma3)
    )["s"]
    freq = r.arrays["freq_hist"]
    assert sum(freq["counts"]) + freq["dead"] == 96 == len(r.arrays["latent_frequency"])
    assert freq["dead"] == r.scalars["dead"] == sum(f == 0 for f in r.arrays["latent_frequency"])
    l0 = r.arrays["l0_hist"]
    assert sum(l0["counts"]) == r.scalars["tokens"]
    assert (
        l0["edges"][0]
        <= r.scalars["l0_p10"]
        <= r.scalars["l0_median"]
        <= r.scalars["l0_p90"]
        <= r.scalars["l0_max"]
    )
    assert sum(r.arrays["latent_frequency"]) == pytest.approx(r.scalars["l0"], rel=1e-5)


def test_dense_counts_latents_firing_on_more_than_the_threshold(tiny_gemma3: LoadedModel) -> None:
    blocks, sae = token_blocks(tiny_gemma3), random_sae(tiny_gemma3, "L0.resid_post")
    every = evaluate_saes(tiny_gemma3, {"s": sae}, blocks, EvalConfig(dense_threshold=0.0))["s"]
    freq = every.arrays["latent_frequency"]
    assert every.scalars["dense"] == 96 - every.scalars["dead"] == sum(f > 0 for f in freq)
    half = evaluate_saes(tiny_gemma3, {"s": sae}, blocks, EvalConfig(dense_threshold=0.5))["s"]
    assert half.scalars["dense"] == sum(f > 0.5 for f in freq)


def test_recon_tokens_widen_reconstruction_metrics_but_not_the_loss_metrics(tiny_gemma3: LoadedModel) -> None:  # fmt: skip
    """Blocks past `tokens` feed L0/FVU/dead only: those equal a full eval over every block, while
    the loss metrics equal an eval of the first blocks alone."""
    blocks = token_blocks(tiny_gemma3)
    assert len(blocks) >= 3
    saes = {
        "a": random_sae(tiny_gemma3, "L1.resid_post"),
        "m": random_sae(tiny_gemma3, "L2.mlp_out"),
    }
    first = blocks[:2]
    n_first = sum(b.n_tokens for b in first)
    total = sum(b.n_tokens for b in blocks)
    quiet = {"progress": False}
    split = evaluate_saes(tiny_gemma3, saes, blocks, EvalConfig(tokens=n_first, recon_tokens=total, **quiet))  # fmt: skip
    every = evaluate_saes(tiny_gemma3, saes, blocks, EvalConfig(tokens=total, **quiet))
    only = evaluate_saes(tiny_gemma3, saes, first, EvalConfig(tokens=n_first, **quiet))
    for name in saes:
        s, e, o = split[name].scalars, every[name].scalars, only[name].scalars
        for k in ("l0", "fvu", "dead", "dense", "cos_sim"):
            assert s[k] == pytest.approx(e[k], rel=1e-9), k
        for k in ("delta_lm_loss", "kl", "ce_recovered", "loss_tokens"):
            assert s[k] == pytest.approx(o[k], rel=1e-9), k
        assert s["tokens"] == total and s["loss_tokens"] < e["loss_tokens"]
