"""Labels (`lmscope explain`) in the API and in a real browser: beside features on feature pages,
SAE lists, inspector token details, neighbours and the steering picker; search by a label word;
sort by score."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from test_serve_browser import page, shot  # noqa: F401 (fixtures)

TEXT = "The capital of France is Paris, and the capital of Italy is Rome."


def _labelled(client: httpx.Client) -> tuple[str, dict]:
    name = client.get("/api/suite").json()["saes"][0]["name"]
    rows = client.get(f"/api/saes/{name}/features", params={"order": "score", "limit": 64}).json()
    return name, rows[0]


def test_api_lists_labels_sorted_by_score_and_finds_them_by_word(client: httpx.Client) -> None:
    name, best = _labelled(client)
    rows = client.get(f"/api/saes/{name}/features", params={"order": "score", "limit": 64}).json()
    scores = [r["score"] for r in rows if r["score"] is not None]
    assert scores == sorted(scores, reverse=True) and best["label"]
    detail = client.get(f"/api/saes/{name}/features/{best['index']}").json()
    assert detail["label"] == best["label"] and detail["explanations"][0]["judge"] == "simulator"
    word = re.findall(r"\w+", best["label"])[0]
    hits = client.get(
        "/api/search", params={"q": word, "by": "label", "sae": name, "limit": 200}
    ).json()
    assert {"sae": name, "index": best["index"]} in [
        {"sae": h["sae"], "index": h["index"]} for h in hits
    ]
    got = client.get("/api/labels", params={"f": [f"{name}:{best['index']}", f"{name}:0"]}).json()
    assert got[0] == {
        "sae": name,
        "index": best["index"],
        "label": best["label"],
        "score": best["score"],
    }
    assert client.get("/api/labels", params={"f": "nonsense"}).status_code == 422
    assert client.get("/api/labels", params={"f": "nope:1"}).status_code == 404


def test_inspector_result_carries_each_features_label(client: httpx.Client) -> None:
    name = client.get("/api/suite").json()["saes"][0]["name"]
    data = client.post("/api/inspect", json={"text": TEXT, "saes": [name]}).json()
    feats = [f for fs in data["saes"][0]["top"] for f in fs]
    labels = client.get(
        "/api/labels", params={"f": [f"{name}:{f['index']}" for f in feats[:20]]}
    ).json()
    assert [f["label"] for f in feats[:20]] == [lab["label"] for lab in labels]
    assert any(f["label"] for f in feats)


def test_labels_in_the_browser_feature_page_inspector_and_search(
    page,  # noqa: F811 (the fixture imported above)
    artifacts: Path,
    client: httpx.Client,
) -> None:  # type: ignore[no-untyped-def]
    name, best = _labelled(client)
    page.goto(f"/sae/{name}/feature/{best['index']}")
    assert page.locator("#label b.label").inner_text() == best["label"]
    assert "detection" in page.locator("#label").inner_text()
    shot(page, artifacts, "feature-label")

    # search by a word of the label finds the feature, its label shown in the results
    word = re.findall(r"\w+", best["label"])[0]
    page.goto(f"/sae/{name}")
    page.fill("#q", word)
    page.select_option("#by", "label")
    page.click("#search button[type=submit]")
    page.wait_for_selector("#features tbody tr")
    row = page.locator(
        "#features tbody tr", has=page.locator(f"a[href$='/feature/{best['index']}']")
    )
    assert row.count() == 1 and row.locator("td.label").inner_text() == best["label"]
    assert all(
        word.casefold() in t.casefold()
        for t in page.locator("#features td.label").all_inner_texts()
    )
    shot(page, artifacts, "label-search")

    # inspector: a token's details list its features with their labels
    page.goto("/inspect")
    page.fill("#text", TEXT)
    page.select_option("#sae", name)
    page.click("#run")
    page.wait_for_selector(".sae-result")
    page.locator(".sae-result .tok").nth(3).click()
    page.wait_for_selector("#token-detail li")
    shown = page.locator("#token-detail li .label").all_inner_texts()
    api = client.post("/api/inspect", json={"text": TEXT, "saes": [name]}).json()
    want = [f["label"] for f in api["saes"][0]["top"][3] if f["label"]]
    assert shown == want and shown
    shot(page, artifacts, "inspector-labels")

    # the steering picker shows the chosen feature's label
    page.goto(f"/steer?sae={name}&feature={best['index']}&coeff=4")
    pytest.importorskip("playwright.sync_api").expect(page.locator(".s-label").first).to_have_text(
        best["label"]
    )


def test_sae_page_sorts_by_score(client: httpx.Client) -> None:
    name, best = _labelled(client)
    html = client.get(f"/sae/{name}", params={"order": "score"}).text
    assert 'class="here">score' in html.replace("\n", "")
    first = re.search(r'/feature/(\d+)"', html)
    assert first is not None and int(first.group(1)) == best["index"]


@pytest.mark.parametrize("q", [":", "%", "\"'"])
def test_label_search_takes_any_text(client: httpx.Client, q: str) -> None:
    assert client.get("/api/search", params={"q": q, "by": "label"}).status_code == 200
