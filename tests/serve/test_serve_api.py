"""The JSON API over HTTP, against a live server on loopback: it serves what the suite's files and
the model say, and answers bad requests with a 4xx and a message."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from fastapi import FastAPI

from lmscope.interp import query
from lmscope.suite import Suite

TEXT = "The capital of France is Paris, and the capital of Italy is Rome."


def test_suite_lists_every_sae_with_its_eval_metrics(client: httpx.Client, served_suite: Path) -> None:  # fmt: skip
    suite = Suite.open(served_suite)
    data = client.get("/api/suite").json()
    assert data["model"] == suite.model == "tiny-gemma3"
    assert [s["name"] for s in data["saes"]] == suite.names
    for s, e in zip(data["saes"], suite.entries):
        assert s["metrics"] == e["metrics"] and s["metrics"]["l0"] > 0
        assert (s["site"], s["layer"], s["d_sae"]) == (e["site"], e["layer"], e["d_sae"])
        assert s["canonical"] == suite.is_canonical(e["name"])
    assert data["has_features"] is True


def test_sae_has_frequency_histogram_and_dead_dense_counts(client: httpx.Client, served_suite: Path) -> None:  # fmt: skip
    suite = Suite.open(served_suite)
    name = suite.names[0]
    d = client.get(f"/api/saes/{name}").json()
    hist = d["frequency_histogram"]
    assert len(hist["edges"]) == len(hist["counts"]) + 1
    # every latent is either dead or counted once in the histogram of live frequencies
    assert sum(hist["counts"]) + hist["dead"] == d["d_sae"] == 64
    assert d["counts"] == query.counts(suite, name)


def test_feature_list_pages_in_the_asked_order(client: httpx.Client, served_suite: Path) -> None:
    name = Suite.open(served_suite).names[1]
    first = client.get(f"/api/saes/{name}/features", params={"limit": 10}).json()
    second = client.get(f"/api/saes/{name}/features", params={"limit": 10, "offset": 10}).json()
    densities = [f["density"] for f in first + second]
    assert densities == sorted(densities, reverse=True)
    assert not {f["index"] for f in first} & {f["index"] for f in second}
    by_index = client.get(
        f"/api/saes/{name}/features", params={"order": "index", "limit": 5}
    ).json()
    assert [f["index"] for f in by_index] == [0, 1, 2, 3, 4]


def test_feature_is_the_interp_record(client: httpx.Client, served_suite: Path) -> None:
    suite = Suite.open(served_suite)
    name = suite.names[0]
    got = client.get(f"/api/saes/{name}/features/7").json()
    want = dataclasses.asdict(query.feature(suite, name, 7))
    assert got["top"] == [{**ex} for ex in want["top"]]
    assert got["logits_up"] == [list(t) for t in want["logits_up"]]
    assert got["neighbours"] == [list(t) for t in want["neighbours"]]
    assert got["max_act"] == pytest.approx(want["max_act"])


def test_search_finds_features_by_token_logit_and_id(client: httpx.Client, served_suite: Path) -> None:  # fmt: skip
    suite = Suite.open(served_suite)
    name = suite.names[0]
    rec = query.feature(suite, name, 5)
    token = rec.top[0].tokens[rec.top[0].center]
    hits = client.get("/api/search", params={"q": token, "sae": name, "limit": 200}).json()
    assert 5 in [h["index"] for h in hits] and {h["sae"] for h in hits} == {name}
    up = rec.logits_up[0][0]
    hits = client.get("/api/search", params={"q": up, "by": "logits", "limit": 200}).json()
    assert (name, 5) in [(h["sae"], h["index"]) for h in hits]
    hits = client.get("/api/search", params={"q": f"{name}:5", "by": "id"}).json()
    assert [(h["sae"], h["index"]) for h in hits] == [(name, 5)]


def _direct_latents(suite: Suite, name: str, text: str) -> torch.Tensor:
    """The SAE's latents on `text`, computed here without the server (BOS row dropped)."""
    from lmscope.model import SiteModel

    loaded = suite.load_model(device="cpu")
    ids = loaded.tokenizer(text, add_special_tokens=False).input_ids
    sae = suite.load_sae(name)
    site = suite.entry(name)["site"]
    with torch.inference_mode():
        x = SiteModel(loaded).run(torch.tensor([[loaded.tokenizer.bos_token_id, *ids]]), read=[site],
                                  return_logits=False).acts[site][0, 1:]  # fmt: skip
        return sae.encode(x)


def test_inspect_reports_the_features_the_sae_computes(client: httpx.Client, served_suite: Path) -> None:  # fmt: skip
    suite = Suite.open(served_suite)
    name = suite.names[1]
    r = client.post("/api/inspect", json={"text": TEXT, "saes": [name], "top_k": 4,
                                          "feature_sae": name, "feature_index": 9})  # fmt: skip
    assert r.status_code == 200, r.text
    data = r.json()
    f = _direct_latents(suite, name, TEXT)
    assert len(data["tokens"]) == f.shape[0]
    (got,) = data["saes"]
    assert got["l0"] == (f > 0).sum(1).tolist()
    for t, feats in enumerate(got["top"]):
        want = [i for i in f[t].topk(4).indices.tolist() if f[t, i] > 0]
        assert [x["index"] for x in feats] == want
        assert [x["act"] for x in feats] == pytest.approx(f[t, want].tolist(), abs=1e-3)
    assert data["feature"]["acts"] == pytest.approx(f[:, 9].tolist(), abs=1e-3)


def test_inspect_all_layers_reads_each_layers_canonical_sae(client: httpx.Client, served_suite: Path) -> None:  # fmt: skip
    suite = Suite.open(served_suite)
    data = client.post("/api/inspect", json={"text": TEXT, "kind": "resid_post"}).json()
    assert [s["sae"] for s in data["saes"]] == [suite.resolve(s) for s in suite.sites]
    assert [s["site"] for s in data["saes"]] == ["L0.resid_post", "L1.resid_post"]


def test_steer_matches_generating_with_and_without_the_intervention(client: httpx.Client, served_suite: Path) -> None:  # fmt: skip
    from lmscope.intervene import Steer, compare, generate

    suite = Suite.open(served_suite)
    name = suite.names[1]
    body = {"prompt": "The capital of France", "features": [{"sae": name, "index": 3, "coeff": 40.0}],
            "max_new_tokens": 8}  # fmt: skip
    r = client.post("/api/steer", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    loaded = suite.load_model(device="cpu")
    sae = suite.load_sae(name)
    assert data["baseline"] == generate(loaded, body["prompt"], (), max_new_tokens=8)
    # coefficients are in units of the feature (its max activation, or the site's norm): the
    # raw strength added along the decoder row is coeff × unit, as the reply says
    (feat,) = data["features"]
    assert feat["strength"] == pytest.approx(40.0 * feat["unit"]) and feat["unit"] > 0
    steer = [Steer(sae, 3, feat["strength"])]
    assert data["steered"] == generate(loaded, body["prompt"], steer, max_new_tokens=8)
    assert data["steered"] != data["baseline"]
    nxt = compare(loaded, body["prompt"], steer, top=8)
    assert data["next_token"]["kl"] == pytest.approx(nxt["kl"], rel=1e-4)
    assert [t for t, _ in data["next_token"]["steered"]] == [t for t, _ in nxt["intervened"]]


def test_status_shows_requests_waiting_for_the_model(served_app: FastAPI, client: httpx.Client) -> None:  # fmt: skip
    assert client.get("/api/status").json()["busy"] is False
    result: dict[str, httpx.Response] = {}

    def ask() -> None:
        result["r"] = client.post("/api/inspect", json={"text": TEXT, "kind": "resid_post"})

    with served_app.state.engine._lock:  # the model is busy: a request waits, and status says so
        t = threading.Thread(target=ask)
        t.start()
        deadline = time.monotonic() + 60
        while client.get("/api/status").json()["waiting"] != 1:
            assert time.monotonic() < deadline, "/api/status never reported the waiting request"
    t.join(60)
    assert result["r"].status_code == 200
    assert client.get("/api/status").json()["waiting"] == 0


BAD_GETS = [
    ("/api/saes/no-such-sae", 404, "no SAE 'no-such-sae'"),
    ("/api/saes/no-such-sae/features/1", 404, "no SAE"),
    ("/api/saes/{sae}/features/64", 404, "features 0–63"),
    ("/api/saes/{sae}/features/-1", 404, "no feature -1"),
    ("/api/saes/{sae}/features/abc", 422, "index"),
    ("/api/saes/..%2F..%2Fetc%2Fpasswd/features/1", 404, "no page"),
    ("/api/saes/..%2Fmanifest.json", 404, "no page"),
    ("/api/saes/manifest.json", 404, "no SAE 'manifest.json'"),
    ("/api/saes/%2E%2E", 404, "no SAE '..'"),
    ("/api/saes/{sae}/features?order=random", 422, "unknown order"),
    ("/api/saes/{sae}/features?limit=100000", 422, "limit"),
    ("/api/search?q=the&by=magic", 422, "unknown search kind"),
    ("/api/search?q=%20", 422, "type something"),
    ("/api/search?q=12&by=id", 422, "SAE:number"),
    ("/report/..%2Fmanifest.json", 404, "no report file"),
    ("/report/plots/..%2F..%2Fmanifest.json", 404, "no report file"),
    ("/report/%2Fetc%2Fpasswd", 404, "no report file"),
    ("/report/manifest.json", 404, "no report file"),
    ("/static/..%2F..%2Fsuite.py", 404, ""),
    ("/no/such/page", 404, "no page"),
]


@pytest.mark.parametrize("path, status, message", BAD_GETS)
def test_bad_requests_get_4xx_with_a_clear_message(client: httpx.Client, served_suite: Path, path: str, status: int, message: str) -> None:  # fmt: skip
    r = client.get(path.format(sae=Suite.open(served_suite).names[0]), headers={"accept": "application/json"})  # fmt: skip
    assert r.status_code == status, r.text
    if message:
        assert message in r.json()["error"]
    assert "Traceback" not in r.text and "/work/" not in r.text


@pytest.mark.parametrize(
    "body, message",
    [
        ({"text": "x" * 2001, "kind": "resid_post"}, "at most 2000 characters"),
        ({"text": " ab" * 600, "kind": "resid_post"}, "tokens; the limit is 256"),
        ({"text": "hi", "kind": "resid_post", "top_k": 1000}, "top_k"),
        ({"text": "hi"}, "name the SAEs"),
        ({"text": "hi", "kind": "attn_z"}, "no SAEs on site kind 'attn_z'"),
        ({"text": "hi", "saes": ["../../etc/passwd"]}, "no SAE '../../etc/passwd'"),
        ({"text": "hi", "feature_sae": "{sae}"}, "both feature_sae and feature_index"),
        ({"text": "", "kind": "resid_post"}, "text"),
    ],
)
def test_bad_inspect_requests_are_refused(client: httpx.Client, served_suite: Path, body: dict, message: str) -> None:  # fmt: skip
    name = Suite.open(served_suite).names[0]
    body = {k: (v.format(sae=name) if isinstance(v, str) and k != "text" else v) for k, v in body.items()}  # fmt: skip
    r = client.post("/api/inspect", json=body)
    assert 400 <= r.status_code < 500 and message in r.json()["error"], r.text


@pytest.mark.parametrize(
    "change, message",
    [
        ({"max_new_tokens": 65}, "max_new_tokens"),
        ({"features": []}, "features"),
        ({"features": [{"sae": "nope", "index": 1, "coeff": 1}]}, "no SAE 'nope'"),
        ({"features": [{"sae": "{sae}", "index": 99, "coeff": 1}]}, "no feature 99"),
        ({"features": [{"sae": "{sae}", "index": 1, "coeff": 1e9}]}, "coeff"),
        ({"prompt": "y" * 3000}, "prompt"),
    ],
)
def test_bad_steer_requests_are_refused(client: httpx.Client, served_suite: Path, change: dict, message: str) -> None:  # fmt: skip
    name = Suite.open(served_suite).names[0]
    body = {"prompt": "Hello", "features": [{"sae": name, "index": 1, "coeff": 2.0}], **change}
    for f in body["features"]:
        f["sae"] = f["sae"].format(sae=name)
    r = client.post("/api/steer", json=body)
    assert 400 <= r.status_code < 500 and message in r.json()["error"], r.text


def test_report_files_are_served_from_the_suites_report_only(client: httpx.Client, served_suite: Path) -> None:  # fmt: skip
    listed = client.get("/api/suite").json()["report"]
    on_disk = sorted(p.relative_to(served_suite / "report").as_posix()
                     for p in (served_suite / "report").rglob("*") if p.is_file())  # fmt: skip
    assert "index.html" in listed and any(f.startswith("plots/") for f in listed)
    assert set(listed) <= set(on_disk)
    png = next(f for f in listed if f.endswith(".png") and "frontier" in f)
    r = client.get(f"/report/{png}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == (served_suite / "report" / png).read_bytes()
    assert f'src="/report/{png}"' in client.get("/").text


def test_openapi_documents_every_endpoint(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for p in ["/api/suite", "/api/status", "/api/saes/{sae}", "/api/saes/{sae}/features",
              "/api/saes/{sae}/features/{index}", "/api/search", "/api/inspect", "/api/steer"]:  # fmt: skip
        assert p in paths and all(op.get("summary") for op in paths[p].values())
    page = client.get("/api").text
    assert "/api/inspect" in page and "InspectRequest" in page


def test_without_interpret_feature_requests_say_what_to_run(bare_server: str) -> None:
    with httpx.Client(base_url=bare_server) as c:
        r = c.get("/api/saes/L0.resid_post-w64-l08/features/1")
        assert r.status_code == 409 and "lmscope interpret" in r.json()["error"]
        page = c.get("/sae/L0.resid_post-w64-l08")
        assert page.status_code == 200 and "lmscope interpret" in page.text
        assert "lmscope eval" in c.get("/").text
