"""Sites read and replace the places DESIGN.md names, on every architecture, in one forward pass."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor

from lmscope.errors import ModelError, SiteError
from lmscope.model import KINDS, LoadedModel, Site, SiteModel, parse_sites

EVERY_SITE = [f"L{layer}.{kind}" for layer in range(4) for kind in KINDS]
Batch = tuple[Tensor, Tensor]


def read_all(loaded: LoadedModel, batch: Batch) -> dict[str, Tensor]:
    with torch.no_grad():
        return SiteModel(loaded).run(*batch, read=EVERY_SITE, return_logits=False).acts


def clean_logits(loaded: LoadedModel, batch: Batch) -> Tensor:
    with torch.no_grad():
        return loaded.model(input_ids=batch[0], attention_mask=batch[1]).logits


# --- names --------------------------------------------------------------------------------------


def test_a_site_prints_as_layer_dot_kind() -> None:
    assert str(Site(6, "resid_post")) == "L6.resid_post"


def test_parse_sites_expands_ranges_and_sorts_in_forward_order() -> None:
    sites = parse_sites("L0-2.resid_post, L1.attn_z,L0.resid_post", n_layers=18)
    assert [str(s) for s in sites] == [
        "L0.resid_post",
        "L1.attn_z",
        "L1.resid_post",
        "L2.resid_post",
    ]


def test_parse_sites_all_layers_and_all_kinds() -> None:
    assert len(parse_sites("all.mlp_out", n_layers=18)) == 18
    assert [s.kind for s in parse_sites("L3.*", n_layers=18)] == list(KINDS)
    assert parse_sites([Site(2, "attn_z"), "L2.attn_z"], n_layers=4) == [Site(2, "attn_z")]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("L6.resid", "valid kinds: resid_pre, attn_z"),
        ("L18.resid_post", "layers 0-17"),
        ("L3-1.attn_z", "first <= last"),
        ("layer6.resid_post", "e.g. L6.resid_post"),
        ("", "e.g. L6.resid_post"),
    ],
)
def test_parse_sites_rejects_bad_specs_naming_valid_choices(spec: str, message: str) -> None:
    with pytest.raises(SiteError, match=message):
        parse_sites(spec, n_layers=18)


def test_site_dim_is_heads_times_head_dim_for_attn_z_and_d_model_elsewhere(
    tiny: LoadedModel,
) -> None:
    sm = SiteModel(tiny)
    assert sm.n_layers == 4
    assert [sm.site_dim(f"L0.{kind}") for kind in KINDS] == [64] * 7


def test_an_architecture_without_adapter_is_a_model_error(tiny: LoadedModel) -> None:
    with pytest.raises(ModelError, match="supported: gemma3, gemma2, llama"):
        SiteModel(dataclasses.replace(tiny, arch="t5"))


# --- identities between sites (DESIGN.md) --------------------------------------------------------


def test_resid_post_is_the_next_layers_resid_pre(tiny: LoadedModel, tiny_batch: Batch) -> None:
    acts = read_all(tiny, tiny_batch)
    for layer in range(3):
        assert torch.equal(acts[f"L{layer}.resid_post"], acts[f"L{layer + 1}.resid_pre"])


def test_resid_mid_is_resid_pre_plus_attn_out(tiny: LoadedModel, tiny_batch: Batch) -> None:
    acts = read_all(tiny, tiny_batch)
    for layer in range(4):
        expected = acts[f"L{layer}.resid_pre"] + acts[f"L{layer}.attn_out"]
        assert torch.equal(acts[f"L{layer}.resid_mid"], expected)


def test_resid_post_is_resid_mid_plus_mlp_out(tiny: LoadedModel, tiny_batch: Batch) -> None:
    acts = read_all(tiny, tiny_batch)
    for layer in range(4):
        expected = acts[f"L{layer}.resid_mid"] + acts[f"L{layer}.mlp_out"]
        assert torch.equal(acts[f"L{layer}.resid_post"], expected)


def test_attn_out_is_the_output_projection_of_attn_z(tiny: LoadedModel, tiny_batch: Batch) -> None:
    acts = read_all(tiny, tiny_batch)
    for layer, block in enumerate(SiteModel(tiny).layers):
        z = acts[f"L{layer}.attn_z"]
        with torch.no_grad():
            if tiny.arch.startswith(
                "gemma"
            ):  # Gemma normalises attention's output before adding it
                expected = block.post_attention_layernorm(block.self_attn.o_proj(z))
            elif tiny.arch == "gpt2":
                expected = block.attn.c_proj(z)
            else:
                expected = block.self_attn.o_proj(z)
        torch.testing.assert_close(acts[f"L{layer}.attn_out"], expected, rtol=1e-6, atol=1e-6)


def test_mlp_in_is_the_pre_mlp_norm_of_resid_mid(tiny: LoadedModel, tiny_batch: Batch) -> None:
    acts = read_all(tiny, tiny_batch)
    norm_name = {"gemma3": "pre_feedforward_layernorm", "gemma2": "pre_feedforward_layernorm"}
    for layer, block in enumerate(SiteModel(tiny).layers):
        norm = getattr(
            block,
            norm_name.get(tiny.arch, "ln_2" if tiny.arch == "gpt2" else "post_attention_layernorm"),
        )
        with torch.no_grad():
            expected = norm(acts[f"L{layer}.resid_mid"])
        assert torch.equal(acts[f"L{layer}.mlp_in"], expected)


def test_unembed_of_the_last_resid_post_gives_the_logits(
    tiny: LoadedModel, tiny_batch: Batch
) -> None:
    sm = SiteModel(tiny)
    with torch.no_grad():
        result = sm.run(*tiny_batch, read=["L3.resid_post"])
        lens = sm.unembed(result.acts["L3.resid_post"])
        by_matrix = sm.final_norm(result.acts["L3.resid_post"]) @ sm.unembedding
    assert result.logits is not None
    torch.testing.assert_close(lens, result.logits, rtol=1e-5, atol=1e-5)
    if tiny.arch != "gemma2":  # Gemma 2 soft-caps its logits after the unembedding
        torch.testing.assert_close(by_matrix, result.logits, rtol=1e-5, atol=1e-5)


# --- replacing ----------------------------------------------------------------------------------


def test_reading_every_site_leaves_the_logits_unchanged(
    tiny: LoadedModel, tiny_batch: Batch
) -> None:
    with torch.no_grad():
        result = SiteModel(tiny).run(*tiny_batch, read=EVERY_SITE)
    assert result.logits is not None
    assert torch.equal(result.logits, clean_logits(tiny, tiny_batch))


def test_replacing_every_site_by_a_copy_of_itself_leaves_the_logits_unchanged(
    tiny: LoadedModel, tiny_batch: Batch
) -> None:
    replace = {site: lambda x: x.clone() for site in EVERY_SITE}
    with torch.no_grad():
        result = SiteModel(tiny).run(*tiny_batch, replace=replace)
    assert result.logits is not None
    assert torch.equal(result.logits, clean_logits(tiny, tiny_batch))


def test_a_replacement_changes_what_follows_and_nothing_before(
    tiny: LoadedModel, tiny_batch: Batch
) -> None:
    clean = read_all(tiny, tiny_batch)
    with torch.no_grad():
        result = SiteModel(tiny).run(
            *tiny_batch, read=EVERY_SITE, replace={"L1.attn_out": lambda x: 2 * x}
        )
    for name in [
        "L0.resid_post",
        "L1.resid_pre",
        "L1.attn_z",
        "L1.attn_out",
    ]:  # attn_out: read before
        assert torch.equal(result.acts[name], clean[name]), name
    for name in ["L1.resid_mid", "L1.mlp_out", "L3.resid_post"]:
        assert not torch.allclose(result.acts[name], clean[name]), name
    assert result.logits is not None and not torch.allclose(
        result.logits, clean_logits(tiny, tiny_batch)
    )


def test_replacing_resid_mid_equals_adding_the_same_change_to_attn_out(
    tiny: LoadedModel, tiny_batch: Batch
) -> None:
    change = torch.randn(tiny_batch[0].shape + (64,), generator=torch.Generator().manual_seed(0))
    sm = SiteModel(tiny)
    with torch.no_grad():
        via_mid = sm.run(
            *tiny_batch,
            read=["L1.mlp_out", "L1.resid_post"],
            replace={"L1.resid_mid": lambda x: x + change},
        )
        via_attn = sm.run(
            *tiny_batch, read=["L1.resid_mid"], replace={"L1.attn_out": lambda x: x + change}
        )
    assert via_mid.logits is not None and via_attn.logits is not None
    torch.testing.assert_close(via_mid.logits, via_attn.logits, rtol=1e-5, atol=1e-5)
    new_mid = via_attn.acts["L1.resid_mid"]
    expected = new_mid + via_mid.acts["L1.mlp_out"]
    torch.testing.assert_close(via_mid.acts["L1.resid_post"], expected, rtol=1e-5, atol=1e-5)


def test_a_replacement_of_the_wrong_shape_is_a_site_error(
    tiny: LoadedModel, tiny_batch: Batch
) -> None:
    with pytest.raises(SiteError, match="expected"):
        SiteModel(tiny).run(*tiny_batch, replace={"L0.mlp_out": lambda x: x[..., :3]})


def test_hooks_are_removed_even_when_a_replacement_raises(
    tiny: LoadedModel, tiny_batch: Batch
) -> None:
    def boom(x: Tensor) -> Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        SiteModel(tiny).run(*tiny_batch, read=EVERY_SITE, replace={"L2.resid_mid": boom})
    for module in tiny.model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_gradients_flow_through_a_replacement_outside_no_grad(
    tiny: LoadedModel, tiny_batch: Batch
) -> None:
    shift = torch.zeros(64, requires_grad=True)
    result = SiteModel(tiny).run(*tiny_batch, replace={"L1.resid_post": lambda x: x + shift})
    assert result.logits is not None
    (grad,) = torch.autograd.grad(
        result.logits.sum(), shift
    )  # not .backward(): the model is shared
    assert grad.abs().sum() > 0


def test_runs_under_inference_mode(tiny: LoadedModel, tiny_batch: Batch) -> None:
    with torch.inference_mode():
        result = SiteModel(tiny).run(
            *tiny_batch, read=["L2.resid_mid"], replace={"L1.resid_mid": lambda x: x * 0.5}
        )
    assert result.acts["L2.resid_mid"].shape == (*tiny_batch[0].shape, 64)


# --- stopping early -----------------------------------------------------------------------------


def count_calls(loaded: LoadedModel) -> tuple[list[int], list[int], list]:
    layer_calls: list[int] = []
    head_calls: list[int] = []
    handles = [
        layer.register_forward_pre_hook(lambda *_, i=i: layer_calls.append(i))
        for i, layer in enumerate(SiteModel(loaded).layers)
    ]
    head = loaded.model.get_output_embeddings()
    handles.append(head.register_forward_pre_hook(lambda *_: head_calls.append(1)))
    return layer_calls, head_calls, handles


def test_without_logits_the_pass_stops_after_the_last_layer_read(
    tiny: LoadedModel, tiny_batch: Batch
) -> None:
    clean = read_all(tiny, tiny_batch)
    layer_calls, head_calls, handles = count_calls(tiny)
    try:
        with torch.no_grad():
            result = SiteModel(tiny).run(
                *tiny_batch, read=["L1.resid_post", "L0.attn_z"], return_logits=False
            )
    finally:
        for handle in handles:
            handle.remove()
    assert result.logits is None
    assert layer_calls == [0, 1] and head_calls == []
    for name, act in result.acts.items():
        assert torch.equal(act, clean[name])


def test_stop_after_layer_runs_exactly_the_layers_up_to_it(
    tiny: LoadedModel, tiny_batch: Batch
) -> None:
    layer_calls, head_calls, handles = count_calls(tiny)
    try:
        with torch.no_grad():
            result = SiteModel(tiny).run(
                *tiny_batch, read=["L0.mlp_in"], stop_after_layer=2, return_logits=False
            )
    finally:
        for handle in handles:
            handle.remove()
    assert set(result.acts) == {"L0.mlp_in"}
    assert layer_calls == [0, 1, 2] and head_calls == []


def test_stop_after_layer_rejects_logits_and_later_reads(tiny_gemma3: LoadedModel) -> None:
    sm = SiteModel(tiny_gemma3)
    ids = torch.tensor([[2, 70, 71]])
    with pytest.raises(SiteError, match="return_logits=False"):
        sm.run(ids, stop_after_layer=1)
    with pytest.raises(SiteError, match="L3.resid_pre"):
        sm.run(ids, read=["L3.resid_pre"], stop_after_layer=1, return_logits=False)
    with pytest.raises(SiteError, match="valid: 0-3"):
        sm.run(ids, stop_after_layer=4, return_logits=False)
