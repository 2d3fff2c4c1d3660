"""A scope pulled from synthetic Gemma Scope 2 270m folders (layers 0-3 × resid_post, attn_out,
mlp_out, plus transcoders) on a stand-in tiny model with the same site widths: eval, interpret,
served in Chromium (Playwright), and `lmscope attribute` on its transcoders."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from published import jumprelu_params, snapshot, write_gs2

from lmscope.releases.pull import pull
from lmscope.suite import Suite

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
        "--disable-background-networking", "--disable-component-update"]  # fmt: skip
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "releases"
GROUPS = (("resid_post_all", "resid_post", None, "gemma-scope-2-270m-pt-res-all"),
          ("attn_out_all", "attn_z", None, "gemma-scope-2-270m-pt-att-all"),
          ("mlp_out_all", "mlp_out", None, "gemma-scope-2-270m-pt-mlp-all"),
          ("transcoder_all", "mlp_in", "mlp_out", "gemma-scope-2-270m-pt-transcoders-all"))  # fmt: skip

playwright_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def pulled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lmscope.evals import EvalConfig, evaluate_suite
    from lmscope.interp.pipeline import InterpretConfig, interpret

    tmp = tmp_path_factory.mktemp("pulled")
    snap = snapshot(tmp / "cache", "google/gemma-scope-2-270m-pt")
    rng = np.random.default_rng(0)
    for group, kind, out_kind, _ in GROUPS:
        for layer in range(4):
            for affine in ("", "_affine") if out_kind else ("",):
                params = jumprelu_params(rng, 64, 96)
                if affine:
                    params["affine_skip_connection"] = (0.05 * rng.normal(size=(64, 64))).astype(np.float32)  # fmt: skip
                write_gs2(snap, f"{group}/layer_{layer}_width_16k_l0_small{affine}", params, kind=kind,
                          out_kind=out_kind, layer=layer, model="google/gemma-3-270m", l0=20)  # fmt: skip
    out = tmp / "suite"
    for _, _, _, name in GROUPS:
        pull(name, out, layers=[0, 1, 2, 3], widths=["16k"], l0s=["small"], model="tiny-gemma3",
             cache_dir=tmp / "cache", offline=True, progress=None)  # fmt: skip
    suite = Suite.open(out)
    evaluate_suite(suite, EvalConfig(tokens=512, progress=False))
    interpret(out, InterpretConfig(tokens=1024, device="cpu"), progress=False)
    return out


@pytest.fixture(scope="module")
def server(pulled: Path) -> Iterator[str]:
    from lmscope.serve.app import create_app, serve_in_thread

    with serve_in_thread(create_app(pulled, device="cpu")) as url:
        yield url


def test_pulled_scope_serves_in_the_browser(pulled: Path, server: str) -> None:
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}; run scripts/setup.sh (apt-get install chromium)")
    suite = Suite.open(pulled)
    assert len(suite.names) == 20  # 4 layers × 3 SAE sites + plain and affine transcoders
    assert set(suite.sites) == {f"L{la}.{k}" for la in range(4) for k in ("resid_post", "attn_z", "mlp_out", "mlp_in")}  # fmt: skip
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page(base_url=server, viewport={"width": 1280, "height": 900})
        page.set_default_timeout(60_000)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto("/")
        page.wait_for_selector("#saes tbody tr")
        assert page.locator("#saes tbody tr").count() == 20
        page.screenshot(path=str(ARTIFACTS / "pulled-overview.png"), full_page=True)
        name = suite.resolve("L2.attn_z")
        page.goto(f"/sae/{name}")
        page.wait_for_selector("#features tbody a.feature-link")
        assert name in page.locator("h1").inner_text()
        page.locator("#features a.feature-link").first.click()
        page.wait_for_selector("#top .ctx .tok")
        assert page.locator("#top .ctx .tok").count() > 0
        page.screenshot(path=str(ARTIFACTS / "pulled-feature.png"), full_page=True)
        browser.close()
    assert not errors, f"JavaScript errors: {errors}"


def test_attribute_cli_runs_on_the_pulled_transcoders(pulled: Path, tmp_path: Path) -> None:
    saes = ",".join(f"L{la}.mlp_in" for la in range(4))
    r = subprocess.run([sys.executable, "-m", "lmscope", "attribute", "The capital of France is",
                        "--suite", str(pulled), "--saes", saes, "--target", " the",
                        "--out", str(tmp_path / "graph.json")],
                       capture_output=True, text=True, timeout=300, env={**os.environ})  # fmt: skip
    assert r.returncode == 0, r.stderr
    import json

    graph = json.loads((tmp_path / "graph.json").read_text())
    assert [s["site"] for s in graph["saes"]] == [f"L{la}.mlp_out" for la in range(4)]
    assert any(n["kind"] == "latent" for n in graph["nodes"])
