"""`explain`: label every live latent of a suite and score the labels, resumable per latent.

Each latent's label is committed as soon as it exists and its scores as soon as they do, so a
killed run loses at most the latents in flight: a rerun asks only for the labels and scores still
missing. With an LLM, a few worker threads talk to the server (bounded concurrency) while the main
thread writes; on an error the run stops submitting, keeps what finished, and raises it.
"""

from __future__ import annotations

import os
import sqlite3
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lmscope.interp.explain import ExplainError, store
from lmscope.interp.explain.client import ChatClient
from lmscope.interp.explain.llm import N_SHOWN, LLMExplainer, LLMJudge, NoLabel
from lmscope.interp.explain.records import Corpus, Latent, SaeData, load_sae
from lmscope.interp.explain.scorers import (
    SCORERS,
    Judge,
    JudgeFailure,
    SimulatorJudge,
    items_for,
    score,
)
from lmscope.interp.explain.tokens import TokensExplainer
from lmscope.suite import Suite

EXPLAINERS = ("tokens", "openai:<base-url>#<model>")
COMMIT_EVERY = (
    256  # latents per transaction for the built-in explainer (no request is ever repeated)
)


@dataclass
class ExplainReport:
    explainer: str
    judge: str
    labelled: int = 0  # latents finished by this run
    skipped: int = 0  # latents already finished before it
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    scores: dict[str, list[float]] = field(default_factory=dict)  # this run's values per scorer
    failures: int = 0  # scores this run recorded as failed (an LLM that answered no label or list)

    def summary(self) -> str:
        parts = [f"{self.explainer}: {self.labelled} latents labelled, {self.skipped} already done, {self.seconds:.1f} s"]  # fmt: skip
        for scorer, values in self.scores.items():
            if values:
                parts.append(f"{scorer} median {statistics.median(values):.3f} ({self.judge}, {len(values)} scored)")  # fmt: skip
        if self.failures:
            parts.append(f"{self.failures} scores failed (see scores.error)")
        if self.requests:
            parts.append(f"{self.requests} requests, {self.prompt_tokens} prompt + {self.completion_tokens} completion tokens")  # fmt: skip
        return "; ".join(parts)


def parse_explainer(
    spec: str, api_key_env: str = "OPENAI_API_KEY", **client_kw: Any
) -> ChatClient | None:
    """None for `tokens`; a client for `openai:<base-url>#<model>`."""
    if spec == "tokens":
        return None
    if spec.startswith("openai:") and "#" in spec:
        url, _, model = spec[len("openai:") :].rpartition("#")
        if url.startswith(("http://", "https://")) and model:
            return ChatClient(url, model, api_key=os.environ.get(api_key_env), **client_kw)
    raise ExplainError(f"unknown explainer {spec!r}; valid: {', '.join(EXPLAINERS)} (e.g. openai:http://127.0.0.1:8080/v1#gemma)")  # fmt: skip


def explain(
    suite: Suite | str | Path,
    *,
    saes: Sequence[str] | None = None,
    explainer: str = "tokens",
    scorers: Sequence[str] = SCORERS,
    latents: int | None = None,
    judge: str | None = None,
    concurrency: int = 4,
    client: ChatClient | None = None,
    items: int | None = None,
    progress: bool = True,
) -> ExplainReport:
    """Label and score the live latents of `suite` (those of `saes`; the first `latents` live ones
    of each SAE, or all); returns what this run did. `judge="simulator"` scores LLM labels with
    the simulator; by default the LLM judges its own labels and the simulator the token ones.
    `items`: judge at most that many items per scorer and latent (all by default), and show an
    LLM explainer at most twice that many contexts (12 by default)."""
    suite = suite if isinstance(suite, Suite) else Suite.open(suite)
    bad = [s for s in scorers if s not in SCORERS]
    if bad:
        raise ExplainError(f"unknown scorers {bad}; valid: {', '.join(SCORERS)}")
    if judge not in (None, "simulator", "llm"):
        raise ExplainError(f"unknown judge {judge!r}; valid: simulator, llm")
    if latents is not None and latents < 1:
        raise ExplainError(f"--latents must be a positive number or 'all', got {latents}")
    if items is not None and items < 2:
        raise ExplainError(f"--items must be at least 2 (one activating, one not), got {items}")
    client = client or parse_explainer(explainer)
    if client is None and judge == "llm":
        raise ExplainError("judge 'llm' needs an openai:<base-url>#<model> explainer")
    if client is not None:
        client.check()
    from lmscope.interp.query import _connect  # checks format and suite before anything is written

    with _connect(suite):
        pass
    names = [suite.resolve(s) for s in saes] if saes else suite.names
    conn = store.open_rw(suite.features_db)
    try:
        ids = dict(conn.execute("SELECT name, id FROM saes").fetchall())
        missing = [n for n in names if n not in ids]
        if missing:
            raise ExplainError(f"SAEs {missing} are not in {suite.features_db}; rerun `lmscope interpret {suite.path}`")  # fmt: skip
        corpus = Corpus(conn)
        the_judge: Judge = (
            SimulatorJudge() if client is None or judge == "simulator" else LLMJudge(client)
        )
        name = "tokens" if client is None else f"openai:{client.model}"
        report = ExplainReport(name, the_judge.name, scores={s: [] for s in scorers})
        t0 = time.perf_counter()
        bar = tqdm(total=None, unit="latent", disable=not progress, desc=f"explain ({name})")
        with bar:
            for sae in names:
                data = load_sae(conn, corpus, ids[sae], sae)
                todo = data.latents[:latents] if latents is not None else data.latents
                done = store.finished(conn, ids[sae], name, scorers)
                report.skipped += sum(lat.index in done for lat in todo)
                todo = [lat for lat in todo if lat.index not in done]
                bar.total = (bar.total or 0) + len(todo)
                have = store.labelled(conn, ids[sae], name)
                if client is None:
                    _run_tokens(conn, data, todo, have, corpus, the_judge, scorers, items, report, bar)  # fmt: skip
                else:
                    _run_llm(conn, data, todo, have, corpus, client, the_judge, scorers, items, concurrency, report, bar)  # fmt: skip
        report.seconds = time.perf_counter() - t0
        if client is not None:
            report.requests, report.seconds = client.requests, report.seconds
            report.prompt_tokens, report.completion_tokens = (
                client.prompt_tokens,
                client.completion_tokens,
            )
        return report
    finally:
        try:
            store.reindex(conn)  # search sees what finished, also after an error
        finally:
            conn.close()


Scores = dict[str, tuple[float | None, int, str | None]]  # scorer -> (value, items, error)


def _score_all(latent: Latent, data: SaeData, text: Callable[[int], str], judge: Judge, label: str,
               scorers: Sequence[str], limit: int | None) -> Scores:  # fmt: skip
    out: Scores = {}
    for scorer in scorers:
        items = items_for(scorer, latent, data, text, limit)
        try:
            out[scorer] = (score(scorer, judge, label, items, latent), len(items), None)
        except JudgeFailure as e:
            out[scorer] = (None, len(items), str(e))
    return out


def _write(conn: sqlite3.Connection, latent: Latent, explainer: str, judge: str, label: str | None,
           scores: Scores, report: ExplainReport, new_label: bool) -> None:  # fmt: skip
    if label is not None and new_label:
        store.put_label(conn, latent.sae, latent.index, explainer, label)
    for scorer, (value, n, error) in scores.items():
        store.put_score(conn, latent.sae, latent.index, explainer, scorer, judge, value, n, error)
        if value is not None:
            report.scores[scorer].append(value)
        report.failures += error is not None


def _run_tokens(conn: sqlite3.Connection, data: SaeData, todo: list[Latent], have: dict[int, str],
                corpus: Corpus, judge: Judge, scorers: Sequence[str], limit: int | None,
                report: ExplainReport, bar: Any) -> None:  # fmt: skip
    explainer = TokensExplainer(data, corpus.text)
    for k, latent in enumerate(todo, 1):
        label = have.get(latent.index) or explainer.explain(latent)
        scores = _score_all(latent, data, corpus.text, judge, label, scorers, limit)
        _write(conn, latent, "tokens", judge.name, label, scores, report, latent.index not in have)
        report.labelled += 1
        if k % COMMIT_EVERY == 0:
            conn.commit()
            bar.update(COMMIT_EVERY)
    conn.commit()
    bar.update(len(todo) % COMMIT_EVERY)


def _run_llm(conn: sqlite3.Connection, data: SaeData, todo: list[Latent], have: dict[int, str],
             corpus: Corpus, client: ChatClient, judge: Judge, scorers: Sequence[str],
             limit: int | None, concurrency: int, report: ExplainReport, bar: Any) -> None:  # fmt: skip
    explainer = LLMExplainer(
        client, corpus.text, N_SHOWN if limit is None else min(N_SHOWN, 2 * limit)
    )

    def work(latent: Latent) -> tuple[Latent, str | None, Scores, Exception | None]:
        label, scores = have.get(latent.index), {}
        try:
            if label is None:
                label = explainer.explain(latent)
            scores = _score_all(latent, data, corpus.text, judge, label, scorers, limit)
            return latent, label, scores, None
        except NoLabel as e:  # a failure of this latent: recorded, and the run goes on
            return latent, None, {s: (None, 0, str(e)) for s in scorers}, None
        except ExplainError as e:
            return latent, label, scores, e

    error: Exception | None = None
    queue = list(reversed(todo))
    running: set[Future[Any]] = set()
    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        while queue or running:
            while queue and error is None and len(running) < max(1, concurrency):
                running.add(pool.submit(work, queue.pop()))
            if not running:
                break
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                latent, label, scores, err = fut.result()
                complete = err is None and len(scores) == len(scorers)
                _write(conn, latent, explainer.name, judge.name, label, scores if complete else {}, report,
                       latent.index not in have)  # fmt: skip
                conn.commit()  # the label survives even when its scoring failed
                if complete:
                    report.labelled += 1
                    bar.update(1)
                error = error or err
    if error is not None:
        raise error
