"""`explain` through a real OpenAI-compatible server with a real model: `transformers serve` (a
FastAPI server, transformers' `serving` extra) running the cached Gemma 3 270M, explaining and
scoring 20 latents of the tiny suite with detection and fuzzing. A small proxy between client and
server records every request and the latent it is for (the client's `X-Lmscope-Item` header).

The run is killed after a few latents and started again: the rerun must not ask anything about a
latent the first run finished. The model is a tiny base model, so its labels are poor and its
yes/no lists often malformed: this checks the protocol, the prompts, the retries and the recorded
failures end to end, not label quality.

Skipped without `transformers[serving]` (openai, fastapi, uvicorn). Slow on a CPU: about 5
requests per latent (a label, and each scorer's list asked twice when the reply is not one), and on
the shared 2-core development VM under load ~5 a request took ~20-30 s (BENCHMARKS.md,
"Explanations"), so the whole test took far more than the 3 minutes aimed at there.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from interp_support import Interpreted

from lmscope.interp.explain import local_server
from lmscope.interp.explain.client import TAG_HEADER
from lmscope.interp.explain.local_server import MODEL
from lmscope.suite import Suite

# ~99 requests at ~26 s each on a 2-core CPU (44 min measured): far past the suite's 15-minute
# budget, so it runs only when asked: LMSCOPE_TEST_SERVER=1 pytest tests/interp/test_explain_server.py
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("LMSCOPE_TEST_SERVER") != "1",
        reason="a real transformers-serve run takes ~45 min on 2 cores; set LMSCOPE_TEST_SERVER=1",
    ),
]

N_LATENTS = 20
N_KILL = 3  # latents the first run finishes before it is killed


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`transformers serve` pinned to the cached model, on a free loopback port; its base URL."""
    if not local_server.available():
        pytest.skip("needs transformers' serving extra: pip install 'transformers[serving]' (openai, fastapi, uvicorn)")  # fmt: skip
    srv = local_server.LocalServer(tmp_path_factory.mktemp("serve"))
    with srv:
        yield srv.base_url


class Proxy(ThreadingHTTPServer):
    """Forwards every request to `upstream` and records (path, X-Lmscope-Item tag) as it arrives."""

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), ProxyHandler)
        self.upstream = upstream.rstrip("/")
        self.lock = threading.Lock()
        self.log: list[tuple[str, str | None]] = []
        self.in_flight = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def posts(self) -> list[str | None]:
        with self.lock:
            return [tag for path, tag in self.log if path.endswith("/chat/completions")]

    def settle(self) -> None:
        """Wait until no request is in flight (those of a killed client still reach the server)."""
        while True:
            with self.lock:
                if self.in_flight == 0:
                    return
            time.sleep(0.2)


class ProxyHandler(BaseHTTPRequestHandler):
    server: Proxy

    def log_message(self, *args: Any) -> None:
        pass

    def _forward(self, body: bytes | None) -> None:
        srv = self.server
        with srv.lock:
            srv.log.append((self.path, self.headers.get(TAG_HEADER)))
            srv.in_flight += 1
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "authorization")}  # fmt: skip
            req = urllib.request.Request(srv.upstream + self.path.removeprefix("/v1"), data=body, headers=headers)  # fmt: skip
            try:
                with urllib.request.urlopen(req, timeout=300) as r:
                    status, data = r.status, r.read()
            except urllib.error.HTTPError as e:
                status, data = e.code, e.read()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass  # the client went away (killed)
        finally:
            with srv.lock:
                srv.in_flight -= 1

    def do_GET(self) -> None:
        self._forward(None)

    def do_POST(self) -> None:
        self._forward(self.rfile.read(int(self.headers["Content-Length"])))


@pytest.fixture()
def proxy(server: str) -> Iterator[Proxy]:
    p = Proxy(server)
    thread = threading.Thread(target=p.serve_forever, daemon=True)
    thread.start()
    yield p
    p.shutdown()
    p.server_close()


def _rows(suite: Suite, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(suite.features_db, timeout=30) as conn:
        return conn.execute(sql).fetchall()


def _finished(suite: Suite, explainer: str) -> set[tuple[int, int]]:
    rows = _rows(suite, f"SELECT sae, idx FROM scores WHERE explainer = '{explainer}' GROUP BY sae, idx HAVING COUNT(*) = 2")  # fmt: skip
    return {(s, i) for s, i in rows}


def _latent(tag: str | None) -> tuple[int, int]:
    assert tag is not None, "every chat request names its latent"
    sae, idx, _ = tag.split(":")
    return int(sae), int(idx)


def test_a_real_server_explains_and_scores_20_latents_and_a_killed_run_resumes(
    proxy: Proxy, interpreted: Interpreted, tmp_path: Path
) -> None:
    shutil.copytree(interpreted.suite.path, tmp_path / "suite")
    suite = Suite.open(tmp_path / "suite")
    name = suite.names[0]
    explainer = f"openai:{MODEL}"
    cmd = [sys.executable, "-m", "lmscope", "explain", str(suite.path), "--saes", name,
           "--explainer", f"openai:{proxy.url}#{MODEL}", "--latents", str(N_LATENTS),
           "--items", "2", "--concurrency", "1", "--timeout", "300"]  # fmt: skip
    t0 = time.perf_counter()
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 1200
    while (
        len(_finished(suite, explainer)) < N_KILL
        and first.poll() is None
        and time.time() < deadline
    ):
        time.sleep(0.2)
    first.kill()
    first.wait()
    assert first.returncode != 0, "the first run was to be killed mid-way, not to finish"
    proxy.settle()
    finished = _finished(suite, explainer)
    labelled = {(s, i) for s, i in _rows(suite, f"SELECT sae, idx FROM explanations WHERE explainer = '{explainer}'")}  # fmt: skip
    first_posts = proxy.posts()
    assert N_KILL <= len(finished) < N_LATENTS
    assert finished <= {_latent(t) for t in first_posts}

    with proxy.lock:
        proxy.log.clear()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - t0
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Traceback" not in again.stderr
    posts = proxy.posts()
    asked = [_latent(t) for t in posts]
    # nothing about a finished latent was asked again; labels were asked only where missing
    assert not finished & set(asked)
    assert not labelled & {_latent(t) for t in posts if t and t.endswith(":explain")}
    summary = again.stdout.strip().splitlines()[-1]
    assert f"{len(finished)} already done" in summary and f"{len(posts)} requests" in summary

    # every one of the 20 latents ends with a label and both scores (a value, or a recorded failure)
    assert len(_finished(suite, explainer)) == N_LATENTS
    labels = _rows(suite, f"SELECT label FROM explanations WHERE explainer = '{explainer}'")
    assert len(labels) == N_LATENTS and all(lab.strip() for (lab,) in labels)
    scores = _rows(suite, f"SELECT scorer, judge, value, n, error FROM scores WHERE explainer = '{explainer}'")  # fmt: skip
    assert len(scores) == 2 * N_LATENTS
    for _scorer, judge, value, n, error in scores:
        assert judge == explainer and n <= 2
        assert (value is not None and 0.0 <= value <= 1.0) or (value is None and (error or n == 0))
    total = len(first_posts) + len(posts)
    print(f"\n{N_LATENTS} latents, {total} requests in {seconds:.1f} s: {total / seconds:.2f} requests/s, "
          f"{seconds / N_LATENTS:.1f} s/latent; {sum(v is None for _, _, v, _, _ in scores)} scores failed; "
          f"labels e.g. {[lab for (lab,) in labels[:3]]}")  # fmt: skip
