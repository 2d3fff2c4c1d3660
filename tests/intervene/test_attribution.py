"""Attribution graphs: node attributions are gradient × activation and sum to the site's total;
edges along a linear path are the exact effect of removing a latent; bad targets are errors."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from lmscope.errors import InterventionError
from lmscope.intervene import Ablate, AttributionGraph, attribute, intervene, target_ids
from lmscope.model import LoadedModel, SiteModel
from lmscope.sae import SAE

PROMPT = "The capital of France is"
TARGET = " the"  # one token in the tiny tokenizer
CONTRAST = " of"


def clean_gradient(
    loaded: LoadedModel, site: str, target: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The site's value x and ∂logit[target]/∂x in the plain model, by a replace hook: [T, d] each."""
    ids = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids
    leaf: list[torch.Tensor] = []

    def grab(x: torch.Tensor) -> torch.Tensor:
        leaf.append(x.detach().requires_grad_())
        return leaf[0]

    out = SiteModel(loaded).run(ids, replace={site: grab}).logits
    assert out is not None
    (g,) = torch.autograd.grad(out[0, -1, target], leaf)
    return leaf[0].detach()[0], g[0]


def test_latent_attribution_is_gradient_times_activation(tiny: LoadedModel, random_sae: Callable[..., SAE]) -> None:  # fmt: skip
    site = "L1.resid_post"
    sae = random_sae(tiny, site)
    graph = attribute(tiny, PROMPT, [sae], TARGET, top=10_000)
    x, g = clean_gradient(tiny, site, target_ids(tiny, TARGET)[1][0])
    f = sae.encode(x).detach()
    latents = graph.top_nodes(10_000, kind="latent")
    assert len(latents) == int((f[1:] > 0).sum())  # every active latent, BOS excluded
    for node in latents:
        p, i = node["position"], node["latent"]
        assert node["activation"] == pytest.approx(float(f[p, i]), rel=1e-5)
        expected = float(f[p, i] * (g[p] @ sae.W_dec[i].detach()))
        assert node["attribution"] == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_each_sae_latents_error_and_bias_sum_to_gradient_times_activation(tiny: LoadedModel, random_sae: Callable[..., SAE]) -> None:  # fmt: skip
    sites = ["L0.resid_post", "L1.mlp_out", "L2.attn_z", "L3.resid_post"]
    saes = [random_sae(tiny, s, seed=i) for i, s in enumerate(sites)]
    graph = attribute(tiny, PROMPT, saes, TARGET, max_edges=0)
    target = target_ids(tiny, TARGET)[1][0]
    for total in graph.saes:
        parts = total["latent_total"] + total["error_total"] + total["bias_total"]
        assert parts == pytest.approx(total["site_total"], rel=1e-4, abs=1e-5)
        x, g = clean_gradient(tiny, total["site"], target)
        assert total["site_total"] == pytest.approx(float((x[1:] * g[1:]).sum()), rel=1e-4, abs=1e-5)  # fmt: skip
    errors = [n for n in graph.nodes if n["kind"] == "error" and n["site"] == "L0.resid_post"]
    assert sum(n["attribution"] for n in errors) == pytest.approx(graph.saes[0]["error_total"], rel=1e-4)  # fmt: skip


def test_edges_along_a_linear_path_are_the_exact_change_when_a_latent_is_removed(tiny: LoadedModel, random_sae: Callable[..., SAE]) -> None:  # fmt: skip
    # L0.resid_post is L1.resid_pre: the path between the two SAEs is the identity
    up, down = random_sae(tiny, "L0.resid_post", seed=0), random_sae(tiny, "L1.resid_pre", seed=1)
    graph = attribute(tiny, PROMPT, [up, down], TARGET, top=10_000, max_edges=None)
    ids = tiny.tokenizer(PROMPT, return_tensors="pt").input_ids
    sites = SiteModel(tiny)
    with torch.no_grad():
        z_clean = down.pre_acts(sites.run(ids, read=["L1.resid_pre"], return_logits=False).acts["L1.resid_pre"][0])  # fmt: skip
    edges = [e for e in graph.edges if e["direct"] is not None and ":error" not in e["source"]]
    assert len(edges) >= 10
    edges = edges[:30]
    nodes = {n["id"]: n for n in graph.nodes}
    for e in edges:
        u, d = nodes[e["source"]], nodes[e["target"]]
        with intervene(tiny, [Ablate(up, [u["latent"]], positions=[u["position"]])]), torch.no_grad():  # fmt: skip
            x = sites.run(ids, read=["L1.resid_pre"], return_logits=False).acts["L1.resid_pre"][0]
        change = float(z_clean[d["position"], d["latent"]] - down.pre_acts(x)[d["position"], d["latent"]].detach())  # fmt: skip
        assert e["direct"] == pytest.approx(change, rel=1e-4, abs=1e-5)


def test_outgoing_edges_sum_to_the_attribution_when_every_path_crosses_the_next_sae(tiny: LoadedModel, random_sae: Callable[..., SAE]) -> None:  # fmt: skip
    saes = [random_sae(tiny, "L1.resid_post", seed=0), random_sae(tiny, "L2.resid_post", seed=1)]
    graph = attribute(tiny, PROMPT, saes, (TARGET, CONTRAST), top=10_000, max_edges=None)
    out: dict[str, float] = {}
    for e in graph.edges:
        out[e["source"]] = out.get(e["source"], 0.0) + e["weight"]
    upstream = [n for n in graph.nodes if n["site"] == "L1.resid_post"]
    assert len(upstream) > 20
    for node in upstream:
        assert out.get(node["id"], 0.0) == pytest.approx(node["attribution"], rel=1e-3, abs=1e-5)


def test_a_logit_difference_target_has_the_clean_value(tiny_gemma3: LoadedModel, random_sae: Callable[..., SAE]) -> None:  # fmt: skip
    sae = random_sae(tiny_gemma3, "L2.resid_post")
    graph = attribute(tiny_gemma3, PROMPT, [sae], (TARGET, CONTRAST))
    ids = tiny_gemma3.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        last = tiny_gemma3.model(ids).logits[0, -1]
    (a, b) = target_ids(tiny_gemma3, (TARGET, CONTRAST))[1]
    assert graph.target["value"] == pytest.approx(float(last[a] - last[b]), rel=1e-5)
    assert graph.target["tokens"] == [TARGET, CONTRAST]


def test_the_graph_keeps_the_top_latents_and_round_trips_through_json(tiny_gemma3: LoadedModel, random_sae: Callable[..., SAE], tmp_path) -> None:  # fmt: skip
    saes = [random_sae(tiny_gemma3, "L0.resid_post"), random_sae(tiny_gemma3, "L1.resid_post", seed=1)]  # fmt: skip
    full = attribute(tiny_gemma3, PROMPT, saes, TARGET, top=10_000, max_edges=None)
    graph = attribute(tiny_gemma3, PROMPT, saes, TARGET, top=5, max_edges=7)
    assert [n["id"] for n in graph.top_nodes(5, kind="latent")] == [n["id"] for n in full.top_nodes(5, kind="latent")]  # fmt: skip
    assert len(graph.edges) == 7
    weights = [abs(e["weight"]) for e in graph.top_edges(7)]
    assert weights == sorted(weights, reverse=True)
    path = graph.save(tmp_path / "g.json")
    again = AttributionGraph.load(path)
    assert again.to_json() == graph.to_json() and again.to_json()["format"] == "lmscope.attribution"
    assert "top 3 nodes" in graph.summary(3)


def test_bad_targets_and_sae_sets_are_errors_naming_valid_choices(tiny_gemma3: LoadedModel, random_sae: Callable[..., SAE]) -> None:  # fmt: skip
    sae = random_sae(tiny_gemma3, "L1.resid_post")
    with pytest.raises(InterventionError, match=r"' Paris' is 3 tokens \[' ', 'Par', 'is'\]|' Paris' is 3 tokens"):  # fmt: skip
        attribute(tiny_gemma3, PROMPT, [sae], " Paris")
    with pytest.raises(InterventionError, match="one SAE per site"):
        attribute(tiny_gemma3, PROMPT, [sae, random_sae(tiny_gemma3, "L1.resid_post", seed=2)], TARGET)  # fmt: skip
    with pytest.raises(InterventionError, match="pair"):
        attribute(tiny_gemma3, PROMPT, [sae], (TARGET, CONTRAST, TARGET))  # type: ignore[arg-type]
