"""Fixtures for the web app: the tiny suite evaluated and interpreted, served on a free loopback port."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from lmscope.serve.app import create_app, serve_in_thread

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "serve"


@pytest.fixture(scope="session")
def served_suite(tiny_suite: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny suite after the real `eval`, `interpret` (with `explain`) and `report` stages."""
    from lmscope.evals.evaluate import EvalConfig
    from lmscope.evals.report import write_report
    from lmscope.evals.results import evaluate_path
    from lmscope.interp.explain import explain
    from lmscope.interp.pipeline import InterpretConfig, interpret
    from lmscope.suite import Suite

    out = tmp_path_factory.mktemp("served") / "suite"
    shutil.copytree(tiny_suite, out)
    evaluate_path(out, EvalConfig(tokens=2048), device="cpu")
    interpret(out, InterpretConfig(tokens=4096, device="cpu"), progress=False)
    explain(out, progress=False)  # labels and scores, as `lmscope build` makes them
    write_report(Suite.open(out))
    return out


@pytest.fixture(scope="session")
def bare_suite(tiny_suite: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny suite straight from training: no metrics, no feature database."""
    out = tmp_path_factory.mktemp("bare") / "suite"
    shutil.copytree(tiny_suite, out)
    return out


@pytest.fixture(scope="session")
def served_app(served_suite: Path) -> FastAPI:
    return create_app(served_suite, device="cpu")


@pytest.fixture(scope="session")
def server(served_app: FastAPI) -> Iterator[str]:
    """The app over `served_suite`, on a free port of 127.0.0.1; yields its base URL."""
    with serve_in_thread(served_app) as url:
        yield url


@pytest.fixture(scope="session")
def bare_server(bare_suite: Path) -> Iterator[str]:
    with serve_in_thread(create_app(bare_suite, device="cpu")) as url:
        yield url


@pytest.fixture
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


# Debian's chromium, driven by Playwright. Without the background-networking flags Chromium keeps
# dialling out, which this machine refuses.
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-sync", "--disable-background-networking",
                 "--disable-component-update"]  # fmt: skip


@pytest.fixture(scope="module")  # per module: two live sync_playwright()s in one thread clash
def browser() -> Iterator[object]:
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).is_file():
        if os.environ.get("CI"):
            pytest.fail(f"no Chromium at {CHROMIUM}; scripts/setup.sh installs Debian's chromium")
        pytest.skip(f"no Chromium at {CHROMIUM}; run scripts/setup.sh (apt-get install chromium)")
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()
