"""`explain` through an OpenAI-compatible server: a small local one speaking the protocol (loopback
only) that records every request. A killed run is not asked again for what it finished; 429s and
5xx are retried; a server that is down, lacks the model or answers garbage is one line."""

from __future__ import annotations

import json
import multiprocessing
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from interp_support import Interpreted

from lmscope.cli import main
from lmscope.interp.explain import ExplainError
from lmscope.interp.explain.llm import parse_answers
from lmscope.interp.explain.run import explain
from lmscope.suite import Suite


class FakeChat(ThreadingHTTPServer):
    """Answers chat completions: a unique label per explanation request, alternating 0/1
    judgements; `fail` statuses are answered first, then `garbage_after` requests pass."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.fail: list[int] = []
        self.garbage_after: int | None = None
        self.bad_answers = False
        self.empty_labels = False
        self.delay = 0.0
        self.n_labels = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def prompts(self, kind: str) -> list[str]:
        with self.lock:
            return [r["prompt"] for r in self.requests if r["kind"] == kind]


class Handler(BaseHTTPRequestHandler):
    server: FakeChat

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})

    def do_POST(self) -> None:
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        # the first user turn says what is asked (a second one only reminds of the format)
        prompt = [m["content"] for m in body["messages"] if m["role"] == "user"][0]
        kind = "explain" if prompt.startswith("Excerpts:") else "judge"
        time.sleep(srv.delay)
        with srv.lock:
            srv.requests.append(
                {"kind": kind, "prompt": prompt, "schema": "response_format" in body,
                 "tag": self.headers.get("X-Lmscope-Item"), "turns": len(body["messages"])}
            )  # fmt: skip
            n = len(srv.requests)
            status = srv.fail.pop(0) if srv.fail else 200
            garbage = srv.garbage_after is not None and n > srv.garbage_after
            if kind == "explain" and status == 200 and not garbage:
                srv.n_labels += 1
                label = f'fires on "word{srv.n_labels}"'
        if status != 200:
            return self._send(status, {"error": "busy"}, {"Retry-After": "0"})
        if body["model"] != "fake":
            return self._send(404, {"error": {"message": f"model {body['model']} not found"}})
        if garbage:
            return self._send(200, "<html>gateway</html>")
        if kind == "explain":
            content = "\n  " if srv.empty_labels else label
        else:
            k = len(re.findall(r"(?m)^\d+\. ", prompt))
            content = (
                "I think so"
                if srv.bad_answers
                else json.dumps({"answers": [i % 2 for i in range(k)]})
            )
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(content.split())}
        self._send(
            200,
            {"choices": [{"message": {"role": "assistant", "content": content}}], "usage": usage},
        )


@pytest.fixture()
def chat() -> Iterator[FakeChat]:
    srv = FakeChat()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture()
def suite(interpreted: Interpreted, tmp_path: Path) -> Suite:
    shutil.copytree(interpreted.suite.path, tmp_path / "suite")
    return Suite.open(tmp_path / "suite")


def _labels(suite: Suite) -> dict[tuple[int, int], str]:
    with sqlite3.connect(suite.features_db) as conn:
        rows = conn.execute(
            "SELECT sae, idx, label FROM explanations WHERE explainer = 'openai:fake'"
        )
        return {(s, i): lab for s, i, lab in rows}


def _finished(suite: Suite) -> set[tuple[int, int]]:
    with sqlite3.connect(suite.features_db) as conn:
        rows = conn.execute("SELECT sae, idx FROM scores WHERE explainer = 'openai:fake' GROUP BY sae, idx HAVING COUNT(*) = 2")  # fmt: skip
        return {(s, i) for s, i in rows}


def test_an_llm_explains_and_judges_through_the_protocol(suite: Suite, chat: FakeChat) -> None:
    report = explain(suite, explainer=f"openai:{chat.url}#fake", latents=3, progress=False)
    n = 3 * len(suite.names)
    assert report.labelled == n and len(_labels(suite)) == n == len(_finished(suite))
    assert report.judge == "openai:fake" and report.requests == len(chat.requests)
    assert len(chat.prompts("explain")) == n and 0 < len(chat.prompts("judge")) <= 2 * n
    assert all("<<" in p for p in chat.prompts("explain"))  # activating tokens are marked
    assert all(r["schema"] for r in chat.requests if r["kind"] == "judge")
    assert report.prompt_tokens > 0 and report.completion_tokens > 0
    labels = set(_labels(suite).values())
    assert all(any(lab in p for lab in labels) for p in chat.prompts("judge"))


def test_a_killed_run_never_asks_again_for_a_latent_it_finished(
    suite: Suite, chat: FakeChat
) -> None:
    chat.delay = 0.05
    spec = f"openai:{chat.url}#fake"
    proc = multiprocessing.get_context("fork").Process(
        target=explain,
        args=(suite,),
        kwargs={"explainer": spec, "latents": 10, "concurrency": 2, "progress": False},
    )
    proc.start()
    deadline = time.time() + 60
    while len(_finished(suite)) < 4 and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.join()
    assert proc.exitcode != 0  # killed, not finished
    finished, labelled = _finished(suite), _labels(suite)
    assert 4 <= len(finished) < 10 * len(suite.names)
    n = -1
    while n != len(chat.requests):  # requests the dead run had in flight land before the rerun's
        n = len(chat.requests)
        time.sleep(0.3)
    chat.requests.clear()
    report = explain(suite, explainer=spec, latents=10, concurrency=2, progress=False)
    total = 10 * len(suite.names)
    assert report.skipped == len(finished) and report.labelled == total - len(finished)
    # the rerun asked for exactly the labels that were missing, and judged no finished latent
    assert len(chat.prompts("explain")) == total - len(labelled)
    done_labels = {labelled[k] for k in finished}
    assert not [
        p for p in chat.prompts("judge") if any(f"Feature: {lab}\n" in p for lab in done_labels)
    ]
    assert len(_finished(suite)) == total


def test_429_and_5xx_are_retried(suite: Suite, chat: FakeChat) -> None:
    chat.fail = [429, 503, 500]
    report = explain(
        suite, explainer=f"openai:{chat.url}#fake", latents=1, concurrency=1, progress=False
    )
    assert report.labelled == len(suite.names) and report.requests == len(chat.requests)
    assert len(chat.prompts("explain")) == len(suite.names) + 3  # the three refused, asked again


def test_a_server_that_is_down_is_one_line(suite: Suite, chat: FakeChat, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    url = chat.url
    chat.shutdown()
    chat.server_close()
    assert (
        main(["explain", str(suite.path), "--explainer", f"openai:{url}#fake", "--retries", "1"])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "cannot reach the chat server" in err and "is it running?" in err


def test_a_wrong_model_name_names_the_served_ones(suite: Suite, chat: FakeChat) -> None:
    with pytest.raises(ExplainError, match="has no model 'gemma'; it serves: fake"):
        explain(suite, explainer=f"openai:{chat.url}#gemma", progress=False)
    assert chat.requests == []


def test_garbage_stops_the_run_keeping_what_finished(suite: Suite, chat: FakeChat) -> None:
    chat.garbage_after = 12
    with pytest.raises(ExplainError, match="not a chat completion: '<html>gateway</html>'"):
        explain(
            suite, explainer=f"openai:{chat.url}#fake", latents=5, concurrency=1, progress=False
        )
    finished = _finished(suite)
    assert finished and len(_labels(suite)) >= len(finished)
    chat.garbage_after = None
    chat.requests.clear()
    report = explain(
        suite, explainer=f"openai:{chat.url}#fake", latents=5, concurrency=1, progress=False
    )
    assert report.skipped == len(finished)
    assert len(_finished(suite)) == 5 * len(suite.names)


def test_judgements_that_are_never_yes_no_lists_are_recorded_failures(suite: Suite, chat: FakeChat) -> None:  # fmt: skip
    chat.bad_answers = True
    name = suite.names[0]
    report = explain(suite, saes=[name], explainer=f"openai:{chat.url}#fake", latents=1, items=4,
                     concurrency=1, progress=False)  # fmt: skip
    assert report.labelled == 1 and report.failures == 2 and "2 scores failed" in report.summary()
    assert len(_labels(suite)) == 1  # the label it got is kept
    with sqlite3.connect(suite.features_db) as conn:
        rows = conn.execute("SELECT scorer, value, n, error FROM scores").fetchall()
    assert len(rows) == 2
    for _, value, n, error in rows:
        assert (
            value is None
            and 2 <= n <= 4
            and f"no list of {n} yes/no answers" in error
            and "I think so" in error
        )
    # per scorer: the list, then the list again with the reply and a reminder (a third turn)
    judge = [r for r in chat.requests if r["kind"] == "judge"]
    assert [r["turns"] for r in judge] == [1, 3, 1, 3]
    chat.requests.clear()  # recorded failures are finished: a rerun asks nothing
    again = explain(suite, saes=[name], explainer=f"openai:{chat.url}#fake", latents=1, items=4,
                    progress=False)  # fmt: skip
    assert again.skipped == 1 and again.requests == 0 and chat.requests == []


def test_an_empty_label_is_asked_again_then_recorded_as_a_failure(suite: Suite, chat: FakeChat) -> None:  # fmt: skip
    chat.empty_labels = True
    report = explain(suite, saes=[suite.names[0]], explainer=f"openai:{chat.url}#fake", latents=2,
                     concurrency=1, progress=False)  # fmt: skip
    assert report.labelled == 2 and report.failures == 4
    assert _labels(suite) == {} and len(_finished(suite)) == 2
    explains = [r for r in chat.requests if r["kind"] == "explain"]
    assert [r["turns"] for r in explains] == [
        2,
        4,
        2,
        4,
    ]  # asked again with the reply and a reminder
    assert not [
        r for r in chat.requests if r["kind"] == "judge"
    ]  # nothing to judge without a label
    with sqlite3.connect(suite.features_db) as conn:
        errors = [e for (e,) in conn.execute("SELECT error FROM scores")]
    assert len(errors) == 4 and all("no label in the explainer's replies" in e for e in errors)


def test_requests_name_their_latent_and_items_are_capped(suite: Suite, chat: FakeChat) -> None:
    name = suite.names[0]
    report = explain(suite, saes=[name], explainer=f"openai:{chat.url}#fake", latents=3, items=2,
                     concurrency=1, progress=False)  # fmt: skip
    assert report.labelled == 3
    with sqlite3.connect(suite.features_db) as conn:
        sae = conn.execute("SELECT id FROM saes WHERE name = ?", (name,)).fetchone()[0]
        done = sorted(conn.execute("SELECT DISTINCT idx FROM scores").fetchall())
        ns = [n for (n,) in conn.execute("SELECT n FROM scores")]
    tags = [r["tag"] for r in chat.requests]
    assert sorted(set(tags)) == sorted(f"{sae}:{i}:{what}" for (i,) in done
                                       for what in ("explain", "detection", "fuzzing"))  # fmt: skip
    assert all(n <= 2 for n in ns)
    with pytest.raises(ExplainError, match="--items must be at least 2"):
        explain(suite, explainer=f"openai:{chat.url}#fake", items=1, progress=False)


def test_answers_are_read_from_json_lists_or_bare_words() -> None:
    assert parse_answers('{"answers": [1, 0, 1]}', 3) == [True, False, True]
    assert parse_answers("Sure: [0, 1]", 2) == [False, True]
    assert parse_answers("1. yes\n2. no", 2) == [True, False]  # numbering is not an answer
    assert parse_answers("1 0 1", 2) is None  # three answers for two items: ambiguous
    assert parse_answers("yes no yes", 3) == [True, False, True]
    assert parse_answers("[1, 1]", 3) is None
