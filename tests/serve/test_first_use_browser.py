"""Issue 16, defects 10 and 11: what a first-time user meets in the browser. The steering page's
defaults visibly steer, and the inspector's first result shows coloured tokens."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
from test_serve_browser import page, token_colours  # noqa: F401  (fixtures)

from lmscope.serve.engine import DEFAULT_STEER_COEFF


def run_default_steering(page) -> float:  # type: ignore[no-untyped-def]  # noqa: F811
    """Open the steering page, generate with its defaults untouched; the KL it shows."""
    page.goto("/steer")
    assert float(page.input_value(".s-coeff")) == DEFAULT_STEER_COEFF
    page.click("#generate")
    page.wait_for_selector("#outputs:not([hidden])")
    assert page.locator("#steered").text_content() != page.locator("#baseline").text_content()
    return float(re.search(r"KL ([0-9.]+)", page.locator("#kl").inner_text()).group(1))  # type: ignore[union-attr]


def test_steering_defaults_change_the_continuation(page) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    # the tiny random model's near-flat logits cap any KL near 0.035; Gemma's test below asks > 0.1
    assert run_default_steering(page) > 0.01


@pytest.fixture(scope="module")
def gemma_server(gemma_270m, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """A one-SAE suite on Gemma 3 270M (L3.resid_post, briefly trained), interpreted, served."""
    from lmscope.activations.stream import stream_batches
    from lmscope.interp.pipeline import InterpretConfig, interpret
    from lmscope.serve.app import create_app, serve_in_thread
    from lmscope.suite import record_training
    from lmscope.train import SAESpec, TrainConfig, train_suite

    out = tmp_path_factory.mktemp("gemma") / "suite"
    site = "L3.resid_post"
    cfg = TrainConfig(total_tokens=256 * 40, batch_size=256, lr=1e-3, lr_warmup_steps=5,
                      lambda_warmup_steps=10, norm_batches=4, progress=False, log_every=20)  # fmt: skip
    data = stream_batches(gemma_270m, [site], cfg.batch_size, corpus="default", seq_len=64)
    folders = train_suite([SAESpec(site, 512, target_l0=32, model="gemma-3-270m")], data, cfg, out)
    record_training(out, folders, model="gemma-3-270m", corpus="default", seq_len=64)
    interpret(out, InterpretConfig(tokens=2048, device="cpu"), loaded=gemma_270m, progress=False)
    with serve_in_thread(create_app(out, device="cpu")) as url:
        yield url


@pytest.mark.slow
def test_steering_defaults_visibly_steer_gemma(browser, gemma_server: str) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    context = browser.new_context(base_url=gemma_server)
    context.set_default_timeout(300_000)
    try:
        assert run_default_steering(context.new_page()) > 0.1
    finally:
        context.close()


def test_steering_coefficient_is_in_units_of_the_features_max_activation(client: httpx.Client) -> None:  # fmt: skip
    name = client.get("/api/suite").json()["saes"][0]["name"]
    top = client.get(f"/api/saes/{name}/features", params={"order": "max_act", "limit": 1}).json()
    feature = top[0]
    r = client.post("/api/steer", json={"prompt": "The capital of France", "max_new_tokens": 2,
                                        "features": [{"sae": name, "index": feature["index"], "coeff": 2}]})  # fmt: skip
    (f,) = r.json()["features"]
    assert f["unit_of"] == "max_act" and f["unit"] == pytest.approx(feature["max_act"], rel=1e-6)
    assert f["strength"] == pytest.approx(2 * feature["max_act"], rel=1e-6)


def test_inspector_first_result_shows_coloured_tokens(page) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    page.goto("/inspect")
    assert page.input_value("#text")  # something to inspect without typing
    assert page.input_value("#sae") == "kind:resid_post"
    page.click("#run")
    page.wait_for_selector(".sae-result .tok")
    spans = token_colours(page, ".sae-result .tok")
    alphas = [alpha for _, alpha, _, _ in spans]
    assert max(alphas) > 0.5 and sum(a > 0.1 for a in alphas) >= len(alphas) // 4
    assert page.locator(".sae-result .tok[data-feature]").count() > 0
    assert "top feature #" in page.locator(".sae-result .tok[data-feature]").first.get_attribute(
        "title"
    )  # type: ignore[operator]


@pytest.mark.parametrize("path", ["/api/saes/{sae}/features?offset=99999999999999999999",
                                  "/sae/{sae}?offset=99999999999999999999"])  # fmt: skip
def test_a_huge_offset_is_a_422_not_a_500(client: httpx.Client, path: str) -> None:
    name = client.get("/api/suite").json()["saes"][0]["name"]
    r = client.get(path.format(sae=name))
    assert r.status_code == 422
    assert "Content-Security-Policy" in r.headers


def test_a_500_carries_the_security_headers(served_suite) -> None:  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from lmscope.serve.app import create_app

    app = create_app(served_suite, device="cpu")

    @app.get("/api/boom")
    def boom() -> None:
        raise RuntimeError("boom")

    r = TestClient(app, raise_server_exceptions=False).get("/api/boom")
    assert r.status_code == 500 and "boom" in r.json()["error"]
    assert r.headers["Content-Security-Policy"].startswith("default-src 'self'")
    assert r.headers["X-Content-Type-Options"] == "nosniff"
