"""The graph explorer's server side: `/api/graph` is the engine's pruned graph with labels, saved
graphs keep their annotations under `<suite>/graphs/`, steering from a graph is `clamp_features`,
and a suite without transcoders says what it needs."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from lmscope.circuits import attribute, clamp_features, load_graph, prune, scores
from lmscope.circuits.export import graph_json, save_graph
from lmscope.interp import query
from lmscope.model import tiny_model
from lmscope.sae import SAEConfig, build_sae, load_sae, save_sae
from lmscope.serve.app import create_app
from lmscope.serve.engine import Limits
from lmscope.serve.graphs import NO_TRANSCODERS, transcoder_names
from lmscope.suite import Suite, record_training
from tests.circuits.conftest import PROMPT, random_transcoders

WIDTH = 24


def graph_suite_at(path: Path) -> Path:
    """A tiny-gemma3 suite of random per-layer transcoders, interpreted and labelled (`explain`);
    built once at ``path`` (the browser tests share it)."""
    if path.is_dir():
        return path
    from lmscope.interp.explain import explain
    from lmscope.interp.pipeline import InterpretConfig, interpret

    tmp = path.with_name(path.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tcs = random_transcoders(tiny_model("gemma3"), width=WIDTH)
    folders = [
        save_sae(tc, tmp / f"L{i}.mlp_in-to-L{i}.mlp_out-{WIDTH}") for i, tc in enumerate(tcs)
    ]
    record_training(tmp, folders, model="tiny-gemma3", seq_len=32)
    interpret(tmp, InterpretConfig(tokens=4096, device="cpu"), progress=False)
    explain(tmp, progress=False)
    tmp.rename(path)  # whole or absent: a failed build is redone
    return path


@pytest.fixture(scope="session")
def graph_suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return graph_suite_at(tmp_path_factory.getbasetemp() / "graph-suite")


@pytest.fixture(scope="module")
def api(graph_suite: Path) -> Iterator[TestClient]:
    with TestClient(create_app(graph_suite, device="cpu")) as c:
        yield c


@pytest.fixture(scope="module")
def built(api: TestClient) -> dict:
    r = api.post("/api/graph", json={"prompt": PROMPT})
    assert r.status_code == 200, r.text
    return r.json()


def _direct(suite: Suite) -> tuple:
    loaded = suite.load_model(device="cpu")
    names = sorted((e for e in suite.entries), key=lambda e: e["layer"])
    tcs = [load_sae(suite.path / e["name"]) for e in names]
    return loaded, tcs, [e["name"] for e in names]


def test_graph_is_the_engines_pruned_graph_with_each_features_label(
    built: dict, graph_suite: Path
) -> None:
    suite = Suite.open(graph_suite)
    loaded, tcs, names = _direct(suite)
    graph = attribute(loaded, PROMPT, tcs)
    kept = prune(graph, 0.8, 0.98)
    want = graph_json(graph, kept, model=suite.model)
    assert [n["id"] for n in built["nodes"]] == [n["id"] for n in want["nodes"]]
    assert len(built["edges"]) == len(want["edges"]) == built["explorer"]["edges_shown"]
    assert built["scores"]["replacement"] == pytest.approx(scores(graph)[0], rel=1e-4)
    assert built["explorer"]["influence_total"] == pytest.approx(
        float(kept.influence.clamp(min=0).sum()), rel=1e-4
    )
    assert built["explorer"]["saes"] == names
    assert len(built["key"]) == 16
    feats = [n for n in built["nodes"] if n["kind"] == "feature"]
    assert feats and all(n["sae"] == names[n["layer"]] for n in feats)
    labels = query.labels(suite, [(n["sae"], n["latent"]) for n in feats])
    assert [n["label"] for n in feats] == [
        labels.get((n["sae"], n["latent"]), (None,))[0] for n in feats
    ]
    assert sum(n["label"] is not None for n in feats) > len(feats) // 2


def test_saved_graph_keeps_its_annotations_and_reloads(
    api: TestClient, built: dict, graph_suite: Path
) -> None:
    feats = [n["id"] for n in built["nodes"] if n["kind"] == "feature"]
    notes = {
        "node_threshold": 0.42,
        "pinned": [feats[0]],
        "supernodes": [{"name": "fox", "nodes": feats[1:3]}],
    }
    r = api.post(
        "/api/graphs", json={"name": "Quick fox!", "key": built["key"], "annotations": notes}
    )
    assert r.status_code == 200, r.text
    assert r.json()["slug"] == "quick-fox" and r.json()["path"] == "graphs/quick-fox.json"
    on_disk = load_graph(graph_suite / "graphs" / "quick-fox.json")  # an lmscope.graph document
    assert on_disk["annotations"] == {**notes, "name": "Quick fox!", "saved": r.json()["saved"]}
    assert on_disk["nodes"] == built["nodes"] and on_disk["edges"] == built["edges"]
    listed = {g["slug"]: g for g in api.get("/api/graphs").json()}
    assert {"name": "Quick fox!", "prompt": PROMPT, "nodes": len(built["nodes"])}.items() <= listed[
        "quick-fox"
    ].items()
    again = api.get("/api/graphs/quick-fox").json()
    assert again["annotations"]["supernodes"] == notes["supernodes"]
    assert again["nodes"] == built["nodes"] and again["key"] == built["key"]
    page = api.get("/graph", params={"saved": "quick-fox"})
    assert page.status_code == 200 and 'data-saved="quick-fox"' in page.text
    assert 'href="/graph?saved=quick-fox"' in api.get("/graph").text
    # saving again under the same name replaces it
    notes["node_threshold"] = 0.5
    api.post("/api/graphs", json={"name": "Quick fox!", "key": built["key"], "annotations": notes})
    assert (
        load_graph(graph_suite / "graphs" / "quick-fox.json")["annotations"]["node_threshold"]
        == 0.5
    )


def test_saving_refuses_unknown_graphs_nodes_and_names(api: TestClient, built: dict) -> None:
    notes = {"node_threshold": 0.5, "pinned": [], "supernodes": []}
    r = api.post("/api/graphs", json={"name": "x", "key": "0" * 16, "annotations": notes})
    assert r.status_code == 409 and "build it again" in r.json()["error"]
    bad = {**notes, "pinned": ["F9.9.9"]}
    r = api.post("/api/graphs", json={"name": "x", "key": built["key"], "annotations": bad})
    assert r.status_code == 422 and "F9.9.9" in r.json()["error"]
    r = api.post("/api/graphs", json={"name": "!!", "key": built["key"], "annotations": notes})
    assert r.status_code == 422 and "letter or digit" in r.json()["error"]
    r = api.post(
        "/api/graphs",
        json={"name": "x", "key": built["key"], "annotations": {**notes, "pinned": ["../x"]}},
    )
    assert r.status_code == 422
    assert api.get("/api/graphs/..%2Fmanifest").status_code == 404
    assert api.get("/api/graphs/nope").status_code == 404
    assert api.get("/graph", params={"saved": "nope"}).status_code == 404


def test_a_graph_from_lmscope_attribute_in_graphs_reloads(
    api: TestClient, graph_suite: Path
) -> None:
    suite = Suite.open(graph_suite)
    loaded, tcs, names = _direct(suite)
    graph = attribute(loaded, "Hello there", tcs)
    save_graph(graph_suite / "graphs" / "from-cli.json", graph_json(graph, model=suite.model))
    doc = api.get("/api/graphs/from-cli").json()
    assert doc["explorer"]["saes"] == names and len(doc["key"]) == 16
    assert all(
        n["label"] is None or isinstance(n["label"], str)
        for n in doc["nodes"]
        if n["kind"] == "feature"
    )


def test_steering_from_the_graph_is_clamp_features_on_the_model(
    api: TestClient, built: dict, graph_suite: Path
) -> None:
    suite = Suite.open(graph_suite)
    loaded, tcs, _ = _direct(suite)
    top = sorted(
        (n for n in built["nodes"] if n["kind"] == "feature"), key=lambda n: -n["influence"]
    )[:2]
    values = {
        (top[0]["layer"], top[0]["position"], top[0]["latent"]): 0.0,
        (top[1]["layer"], top[1]["position"], top[1]["latent"]): 3 * top[1]["activation"],
    }
    body = {
        "prompt": PROMPT,
        "features": [
            {"layer": k[0], "position": k[1], "latent": k[2], "value": v} for k, v in values.items()
        ],
    }
    r = api.post("/api/graph/steer", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    from lmscope.intervene import encode_prompt

    ids = encode_prompt(loaded, PROMPT)
    before = torch.softmax(clamp_features(loaded, tcs, ids, {}), -1)
    after = torch.softmax(clamp_features(loaded, tcs, ids, values), -1)
    assert [t["token_id"] for t in data["before"]] == before.topk(10).indices.tolist()
    assert [t["probability"] for t in data["after"]] == pytest.approx(
        after.topk(10).values.tolist(), abs=1e-5
    )
    assert [t["other"] for t in data["after"]] == pytest.approx(
        before[after.topk(10).indices].tolist(), abs=1e-5
    )
    assert data["kl"] > 0
    body["features"][0]["position"] = 60
    r = api.post("/api/graph/steer", json=body)
    assert r.status_code == 400 and "out of range" in r.json()["error"]


def test_graph_page_starts_from_a_url_and_is_linked_from_nav_and_inspector(api: TestClient) -> None:
    page = api.get("/graph", params={"prompt": PROMPT}).text
    assert 'data-autostart="1"' in page and PROMPT in page and "/static/graph.js" in page
    assert 'id="node-threshold"' in page and 'id="group"' in page and 'id="save"' in page
    assert 'data-autostart=""' in api.get("/graph").text
    assert '<a href="/graph"' in api.get("/").text
    assert 'id="trace-link" href="/graph?prompt=' in api.get("/inspect").text


def test_long_prompts_are_refused_before_any_graph_is_built(graph_suite: Path) -> None:
    with TestClient(create_app(graph_suite, device="cpu", limits=Limits(max_graph_tokens=4))) as c:
        r = c.post("/api/graph", json={"prompt": PROMPT})
    assert r.status_code == 422 and "at most 4" in r.json()["error"]


def test_a_suite_without_transcoders_says_what_it_needs(tmp_path: Path) -> None:
    loaded = tiny_model("gemma3")
    cfg = SAEConfig(
        "jumprelu",
        d_in=int(loaded.model.config.get_text_config().hidden_size),
        d_sae=32,
        site="L0.resid_post",
        model="tiny-gemma3",
    )
    folder = save_sae(build_sae(cfg), tmp_path / "suite" / "L0.resid_post-32")
    record_training(tmp_path / "suite", [folder], model="tiny-gemma3", seq_len=32)
    app = create_app(tmp_path / "suite", device="cpu")
    assert transcoder_names(app.state.engine) == []
    with TestClient(app) as c:
        page = c.get("/graph")
        assert page.status_code == 200
        assert f'<p id="no-transcoders" class="error">{NO_TRANSCODERS}</p>' in page.text
        assert 'id="graph-form"' not in page.text
        r = c.post("/api/graph", json={"prompt": PROMPT})
        assert r.status_code == 409 and r.json()["error"] == NO_TRANSCODERS
        assert c.get("/api/graphs").json() == []
    assert not (tmp_path / "suite" / "graphs").exists()
