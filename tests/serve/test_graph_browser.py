"""The graph explorer in a real browser (Debian's Chromium, headless, via Playwright) against a
live server over a tiny suite of transcoders: hover, prune, pin, group, steer, save, reload.

Screenshots go to test-artifacts/serve/ (gitignored). Every wait is for an element or a page.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lmscope.interp import query
from lmscope.serve.app import create_app, serve_in_thread
from lmscope.suite import Suite
from tests.serve.test_graph_api import PROMPT, graph_suite_at

playwright_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def graph_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    suite = graph_suite_at(tmp_path_factory.getbasetemp() / "graph-suite")
    with serve_in_thread(create_app(suite, device="cpu")) as url:
        yield url, suite


@pytest.fixture
def context(browser, graph_server):  # type: ignore[no-untyped-def]
    ctx = browser.new_context(base_url=graph_server[0], viewport={"width": 1400, "height": 1000})
    ctx.set_default_timeout(60_000)
    errors: list[str] = []
    ctx.on("page", lambda pg: pg.on("pageerror", lambda e: errors.append(str(e))))
    yield ctx
    ctx.close()
    assert not errors, f"JavaScript errors: {errors}"


def shot(page, artifacts: Path, name: str) -> None:  # type: ignore[no-untyped-def]
    path = artifacts / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")


def node_count(page) -> int:  # type: ignore[no-untyped-def]
    shown = int(page.get_attribute("#node-count", "data-nodes"))
    assert page.locator("#graph-svg g.node").count() == shown
    return shown


def set_slider(page, value: float) -> None:  # type: ignore[no-untyped-def]
    page.eval_on_selector(
        "#node-threshold",
        "(s, v) => { s.value = v; s.dispatchEvent(new Event('input')); }",
        str(value),
    )


def test_explore_prune_group_steer_save_and_reload(context, graph_server, artifacts: Path) -> None:  # type: ignore[no-untyped-def]
    url, suite_path = graph_server
    suite = Suite.open(suite_path)
    page = context.new_page()
    page.goto("/graph?prompt=" + PROMPT.replace(" ", "+"))
    page.wait_for_selector("#graph-svg g.node.feature")
    assert "replacement score" in page.inner_text("#graph-scores")
    full = node_count(page)
    shot(page, artifacts, "graph")

    # hover: the feature's label (lmscope explain), then its top contexts
    ids = page.eval_on_selector_all("#graph-svg g.node.feature", "gs => gs.map(g => g.dataset.id)")
    names = {e["layer"]: e["name"] for e in suite.entries}
    keys = {i: (names[int(i[1:].split(".")[0])], int(i.split(".")[2])) for i in ids}
    labels = query.labels(suite, list(keys.values()))
    labelled = next(i for i in ids if keys[i] in labels)
    page.hover(f'#graph-svg g.node[data-id="{labelled}"]')
    page.wait_for_selector("#graph-tooltip:not([hidden]) .tt-label")
    assert page.inner_text("#graph-tooltip .tt-label") == labels[keys[labelled]][0]
    page.wait_for_selector("#graph-tooltip .tt-contexts .ctx")
    ends = "ls => ls.map(l => [l.dataset.source, l.dataset.target])"
    hot = page.eval_on_selector_all("#graph-svg.focus line.hot", ends)
    assert hot and all(labelled in pair for pair in hot)  # its own edges stand out
    shot(page, artifacts, "graph-hover")

    # the pruning slider: fewer nodes at a lower threshold, all of them back at the top
    top = float(page.get_attribute("#node-threshold", "max"))
    set_slider(page, 0.05)
    assert node_count(page) < full
    set_slider(page, top)
    assert node_count(page) == full
    set_slider(page, 0.6)
    at_06 = node_count(page)
    assert at_06 <= full

    # pin two features (shift-click), group them into a named supernode
    first, second = page.eval_on_selector_all(
        "#graph-svg g.node.feature", "gs => gs.slice(0, 2).map(g => g.dataset.id)"
    )
    for node in (first, second):
        page.click(f'#graph-svg g.node[data-id="{node}"]', modifiers=["Shift"])
    assert page.locator("#pinned li[data-id]").count() == 2
    page.fill("#supernode-name", "fox circuit")
    page.click("#group")
    page.wait_for_selector('#graph-svg g.supernode[data-name="fox circuit"]')
    assert page.locator("#pinned li[data-id]").count() == 0
    assert "fox circuit" in page.inner_text("#supernodes")

    # steer from the graph: ablate one pinned feature, compare the next token
    page.click(f'#graph-svg g.node[data-id="{first}"]', modifiers=["Shift"])
    page.click("#steer")
    page.wait_for_selector("#steer-result:not([hidden])")
    assert page.locator("#steer-before li").count() == page.locator("#steer-after li").count() == 10
    shot(page, artifacts, "graph-grouped")

    # save, then reload from its URL: the graph, the slider, the pin and the supernode are back
    page.fill("#save-name", "Fox graph")
    page.click("#save")
    page.wait_for_selector("#saved-link")
    saved = suite_path / "graphs" / "fox-graph.json"
    assert saved.is_file()
    page.goto("/graph?saved=fox-graph")
    page.wait_for_selector('#graph-svg g.supernode[data-name="fox circuit"]')
    assert page.input_value("#node-threshold") == "0.6"
    assert page.locator("#pinned li[data-id]").count() == 1
    assert node_count(page) == at_06
    assert page.locator('#saved-graphs a[href="/graph?saved=fox-graph"]').count() == 1
    shot(page, artifacts, "graph-reloaded")

    # a click on a feature opens its page
    with context.expect_page() as opened:
        page.click(f'#graph-svg g.node[data-id="{second}"]')
    feature = opened.value
    feature.wait_for_selector("#top")
    sae, latent = keys[second]
    assert feature.url.endswith(f"/sae/{sae}/feature/{latent}")


def test_inspector_traces_its_text(context) -> None:  # type: ignore[no-untyped-def]
    page = context.new_page()
    page.goto("/inspect")
    page.fill("#text", "Hello there")
    page.click("#trace-link")
    page.wait_for_selector("#graph-svg g.node.token")
    assert page.input_value("#graph-prompt") == "Hello there"
    assert "prompt=Hello%20there" in page.url
