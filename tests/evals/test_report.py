"""`lmscope report`: a static HTML page with every plot and every SAE, opened from disk in a real
(headless) Chromium, with a screenshot kept under test-artifacts/."""

from __future__ import annotations

import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from lmscope.evals import EvalConfig, evaluate_suite, plots, write_report
from lmscope.model import LoadedModel
from lmscope.suite import Suite

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []
        self.rows = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.srcs.append(dict(attrs)["src"] or "")
        if tag == "tr":
            self.rows += 1


@pytest.fixture
def evaluated_suite(suite_copy: Path) -> Suite:
    evaluate_suite(Suite.open(suite_copy), EvalConfig(tokens=500))
    return Suite.open(suite_copy)


def test_the_report_links_every_plot_by_a_relative_path_and_lists_every_sae(
    evaluated_suite: Suite,
) -> None:
    index = write_report(evaluated_suite)
    assert index == evaluated_suite.path / "report" / "index.html"
    page = _Links()
    page.feed(index.read_text())
    assert page.rows == 1 + len(evaluated_suite.names)  # header + one row per SAE
    n_saes = len(evaluated_suite.names)
    # frontiers (2 per site kind), 6 across layers, one histogram per SAE, 2 by position
    assert len(page.srcs) == 2 + 6 + n_saes + 2
    for src in page.srcs:
        assert not re.match(r"^(/|[a-z]+:)", src), f"{src} is not a relative link"
        assert (index.parent / src).read_bytes().startswith(b"\x89PNG")
    assert index.read_text().count('class="canonical"') == len(
        evaluated_suite.manifest["canonical"]
    )


def test_unevaluated_saes_are_listed_without_metrics(suite_copy: Path) -> None:
    suite = Suite.open(suite_copy)
    evaluate_suite(suite, EvalConfig(tokens=300), names=[suite.names[0]])
    html = write_report(Suite.open(suite_copy)).read_text()
    assert suite.names[1] in html and "—" in html


def test_plot_functions_return_reusable_figures(evaluated_suite: Suite) -> None:
    from lmscope.evals.results import read_eval

    entries = evaluated_suite.entries
    records = [read_eval(evaluated_suite.path / n) for n in evaluated_suite.names]
    figures = [
        plots.frontier(entries, "fvu"),
        plots.across_layers(entries, "kl"),
        plots.frequency_histogram(records[0]),
        plots.by_position(records, "kl"),
        plots.frontier([], "delta_lm_loss"),
    ]
    for fig in figures:
        assert plots.png_bytes(fig).startswith(b"\x89PNG")
    lines = figures[0].axes[0].get_lines()
    assert len(lines) == len(evaluated_suite.sites)  # one line per (site, width)


def browse(index: Path, screenshot: Path) -> dict[str, Any]:
    """Open the report from disk in headless Chromium; what loaded, and a full-page screenshot."""
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="pip install playwright (scripts/setup.sh)"
    )
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine; scripts/setup.sh installs Debian's chromium")
    args = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-quic",
    ]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("requestfailed", lambda r: errors.append(f"failed: {r.url}"))
            page.goto(index.resolve().as_uri())
            page.wait_for_load_state("load")
            images = page.evaluate(
                "Array.from(document.images).map(i => ({src: i.getAttribute('src'), "
                "ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth}))"
            )
            rows = page.locator("#saes tbody tr").count()
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return {"images": images, "rows": rows, "errors": errors}


def assert_renders(
    index: Path, suite: Suite, screenshot: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seen = browse(index, screenshot)
    with capsys.disabled():
        print(f"\nreport screenshot: {screenshot}")
    assert seen["errors"] == []
    assert len(seen["images"]) >= 10
    broken = [i["src"] for i in seen["images"] if not i["ok"]]
    assert broken == [], f"plots that did not render: {broken}"
    assert seen["rows"] == len(suite.names)
    assert screenshot.stat().st_size > 10_000


def test_the_report_renders_in_a_real_browser(
    evaluated_suite: Suite, capsys: pytest.CaptureFixture[str]
) -> None:
    index = write_report(evaluated_suite)
    assert_renders(index, evaluated_suite, ARTIFACTS / "report-tiny-gemma3.png", capsys)


def _gemma_suite(out: Path, loaded: LoadedModel) -> Suite:
    """Three small JumpReLU SAEs on the real Gemma 3 270M (two sites, two sparsities), briefly trained."""
    from lmscope.activations.stream import stream_batches
    from lmscope.suite import record_training
    from lmscope.train import SAESpec, TrainConfig, train_suite

    specs = [
        SAESpec("L3.resid_post", 256, target_l0=32, model=loaded.name),
        SAESpec("L3.resid_post", 256, target_l0=128, model=loaded.name),
        SAESpec("L9.resid_post", 256, target_l0=64, model=loaded.name),
    ]
    cfg = TrainConfig(
        total_tokens=128 * 30,
        batch_size=128,
        lr=1e-3,
        lr_warmup_steps=5,
        lambda_warmup_steps=10,
        norm_batches=2,
        progress=False,
        log_every=10,
    )
    data = stream_batches(loaded, ["L3.resid_post", "L9.resid_post"], cfg.batch_size, seq_len=64)
    folders = train_suite(specs, data, cfg, out)
    return record_training(out, folders, model=loaded.name, seq_len=64)


@pytest.mark.slow
def test_the_report_of_a_gemma_270m_suite_renders_in_a_real_browser(
    gemma_270m: LoadedModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    torch.set_num_threads(1)
    suite = _gemma_suite(tmp_path / "suite", gemma_270m)
    results = evaluate_suite(suite, EvalConfig(tokens=200, batch_size=2), loaded=gemma_270m)
    for r in results.values():
        assert r.scalars["delta_lm_loss"] > 0 and 0 < r.scalars["fvu"] and r.scalars["kl"] > 0
    suite = Suite.open(suite.path)
    index = write_report(suite)
    assert_renders(index, suite, ARTIFACTS / "report-gemma-3-270m.png", capsys)
