"""The pages in a real browser: Debian's Chromium driven headless by Playwright, against a live
server on loopback. Screenshots go to test-artifacts/serve/ (gitignored); each test prints where.

Every wait is for an element or a response, never a fixed sleep.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from lmscope.serve.views import act_alpha

TEXT = "The capital of France is Paris, and the capital of Italy is Rome."

playwright_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture
def page(browser, server: str):  # type: ignore[no-untyped-def]
    context = browser.new_context(base_url=server, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(60_000)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, f"JavaScript errors: {errors}"


def shot(page, artifacts: Path, name: str) -> None:  # type: ignore[no-untyped-def]
    path = artifacts / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")


def token_colours(page, selector: str) -> list[tuple[float, float, str]]:  # type: ignore[no-untyped-def]
    """(data-act, rendered background alpha, hover title) of every token span under `selector`."""
    return page.eval_on_selector_all(
        selector,
        """spans => spans.map(s => {
        const m = getComputedStyle(s).backgroundColor.match(/rgba?\\(([^)]*)\\)/)[1].split(',');
        return [Number(s.dataset.act), m.length > 3 ? Number(m[3]) : 1.0, s.title, m.slice(0, 3).join()];
    })""",
    )


def assert_blue_gradient(spans: list, scale: float) -> None:
    assert spans, "no highlighted tokens"
    for act, alpha, title, rgb in spans:
        assert alpha == pytest.approx(act_alpha(act, scale), abs=0.01)
        assert float(title) == pytest.approx(act, abs=1e-3)  # hover shows the value
        assert alpha == 0 or rgb.replace(" ", "") == "37,99,235"
    ranked = sorted(spans, key=lambda s: s[0])
    assert [s[1] for s in ranked] == sorted(s[1] for s in ranked)  # stronger is never paler
    assert max(s[1] for s in spans) > 0.3 and min(s[1] for s in spans) < max(s[1] for s in spans)


def test_overview_sae_and_feature_pages(page, artifacts: Path, client: httpx.Client) -> None:  # type: ignore[no-untyped-def]
    page.goto("/")
    page.wait_for_selector("#saes tbody tr")
    assert page.locator("#saes tbody tr").count() == len(client.get("/api/suite").json()["saes"])
    assert page.locator("svg.frontier circle").count() >= 2
    shot(page, artifacts, "overview")

    page.locator("a.sae-link").nth(1).click()
    page.wait_for_selector("#features tbody a.feature-link")
    name = page.locator("h1").inner_text()
    assert page.url.endswith(f"/sae/{name}")
    assert page.locator("#counts .dead").inner_text() == str(client.get(f"/api/saes/{name}").json()["counts"]["dead"])  # fmt: skip
    assert page.locator("svg.hist rect.bar").count() > 0
    shot(page, artifacts, "sae")

    page.fill("#q", "the")
    page.click("#search button")
    page.wait_for_url("**q=the**")
    page.wait_for_selector("#features tbody tr")
    shot(page, artifacts, "sae-search")

    page.goto(f"/sae/{name}")
    link = page.locator("#features a.feature-link").first
    index = int(link.inner_text().lstrip("#"))
    link.click()
    page.wait_for_selector("#top .ctx .tok")
    record = client.get(f"/api/saes/{name}/features/{index}").json()
    scale = float(page.get_attribute("#top", "data-scale"))
    spans = token_colours(page, "#top .tok")
    assert [s[0] for s in spans] == pytest.approx([a for ex in record["top"] for a in ex["acts"]], abs=1e-3)  # fmt: skip
    assert_blue_gradient(spans, scale)
    assert page.locator("#logits .up li").count() == len(record["logits_up"])
    assert page.locator("#logits .down li").count() == len(record["logits_down"])
    shot(page, artifacts, "feature")

    neighbour = page.locator("#neighbours a").first
    other = neighbour.inner_text()
    neighbour.click()
    page.wait_for_selector("#top")
    assert other.split(" #")[1] in page.locator("h1").inner_text()


def test_inspector_shows_features_per_token_and_highlights_one(
    page, artifacts: Path, client: httpx.Client
) -> None:  # type: ignore[no-untyped-def]
    page.goto("/inspect")
    page.fill("#text", TEXT)
    page.select_option("#sae", "kind:resid_post")
    page.click("#run")
    page.wait_for_selector(".sae-result >> nth=1")
    assert page.locator(".sae-result").count() == 2
    shot(page, artifacts, "inspector")

    page.locator(".sae-result").nth(1).locator(".tok").nth(3).click()
    page.wait_for_selector("#token-detail li button.hl-button")
    feature = page.locator("#token-detail a.feature-link").first.inner_text().lstrip("#")
    page.locator("#token-detail button.hl-button").first.click()
    page.wait_for_selector("#hl-tokens .tok")
    sae = page.input_value("#hl-sae")
    api = client.post("/api/inspect", json={"text": TEXT, "feature_sae": sae, "feature_index": int(feature)}).json()  # fmt: skip
    acts = api["feature"]["acts"]
    spans = token_colours(page, "#hl-tokens .tok")
    assert [s[0] for s in spans] == pytest.approx(acts, abs=1e-3)
    assert_blue_gradient(spans, max(acts))
    shot(page, artifacts, "inspector-highlight")

    page.locator("#hl-title a.feature-link").click()
    page.wait_for_selector("#top")
    assert f"Feature {feature}" in page.locator("h1").inner_text()


def test_steering_playground_generates_side_by_side(
    page, artifacts: Path, client: httpx.Client
) -> None:  # type: ignore[no-untyped-def]
    suite = client.get("/api/suite").json()
    name = suite["saes"][1]["name"]
    page.goto(f"/steer?sae={name}&feature=3&coeff=40")
    page.fill("#prompt", "The capital of France")
    page.fill("#max-new", "8")
    page.click("#add-feature")
    row = page.locator(".steer-row").nth(1)
    row.locator(".s-sae").select_option(suite["saes"][0]["name"])
    row.locator(".s-index").fill("5")
    row.locator(".s-coeff").fill("-10")
    page.click("#generate")
    page.wait_for_selector("#outputs:not([hidden])")
    want = client.post("/api/steer", json={"prompt": "The capital of France", "max_new_tokens": 8,
                                           "features": [{"sae": name, "index": 3, "coeff": 40},
                                                        {"sae": suite["saes"][0]["name"], "index": 5, "coeff": -10}]}).json()  # fmt: skip
    assert page.locator("#baseline").text_content() == want["baseline"]
    assert page.locator("#steered").text_content() == want["steered"]
    shot(page, artifacts, "steering")

    row.locator(".s-index").fill("999")
    page.click("#generate")
    page.wait_for_selector("#error-message:not([hidden])")
    assert "no feature 999" in page.locator("#error-message").inner_text()


def test_user_text_is_shown_as_text_never_run(page, server: str) -> None:  # type: ignore[no-untyped-def]
    evil = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'
    page.goto("/inspect?" + httpx.QueryParams({"text": evil}).__str__())
    assert page.input_value("#text") == evil
    page.select_option("#sae", "kind:resid_post")
    page.click("#run")
    page.wait_for_selector(".sae-result .tok")
    assert page.evaluate("window.pwned") is None
    page.goto("/sae/L0.resid_post-w64-l08?" + httpx.QueryParams({"q": evil}).__str__())
    page.wait_for_selector("#features")
    assert page.evaluate("window.pwned") is None
    assert page.input_value("#q") == evil
