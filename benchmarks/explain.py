"""Benchmark `lmscope explain`: the built-in `tokens` explainer over a whole suite (latents per
second, and the acceptance numbers of issue 17: median detection / fuzzing balanced accuracy of the
labels, and of the same labels shuffled across latents of the same SAE, per site kind), and
optionally an OpenAI-compatible server (requests per second, seconds per latent).

It works on a scratch copy of the suite (links to everything but `features.db`, which is copied), so
the suite itself is left as it was.

    .venv/bin/python benchmarks/explain.py runs/quick --out benchmarks/results/explain.json
    .venv/bin/python benchmarks/explain.py runs/quick --server openai:http://127.0.0.1:8080/v1#gemma --latents 20
    .venv/bin/python benchmarks/explain.py runs/lab --serve --latents 20 --items 4 --no-tokens

`--serve` starts `transformers serve` on the cached Gemma 3 270M itself (needs `transformers[serving]`;
`lmscope.interp.explain.local_server`) and times that.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lmscope.interp.explain.records import Corpus, load_sae  # noqa: E402
from lmscope.interp.explain.run import explain  # noqa: E402
from lmscope.interp.explain.scorers import SimulatorJudge, items_for, score  # noqa: E402
from lmscope.suite import Suite  # noqa: E402


def scratch_copy(suite: Path, into: Path) -> Path:
    """`into/suite`: symlinks to the suite's files, a private copy of features.db."""
    out = into / "suite"
    out.mkdir()
    for p in suite.iterdir():
        if p.name != "features.db" and not p.name.startswith(".features.db"):
            os.symlink(p.resolve(), out / p.name)
    shutil.copy2(suite / "features.db", out / "features.db")
    with sqlite3.connect(out / "features.db") as conn:  # start from no labels (explain recreates
        for table in (
            "explanations",
            "scores",
            "label_search",
        ):  # the tables, any older layout gone)
            conn.execute(f"DROP TABLE IF EXISTS {table}")
    return out


def acceptance(suite: Suite, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per site kind (and 'all'): live latents, share labelled and scored, medians of the labels'
    scores as stored, and of the same labels shuffled within each SAE (same contexts, same judge)."""
    conn = sqlite3.connect(suite.features_db)
    corpus = Corpus(conn)
    judge = SimulatorJudge()
    own: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    shuffled: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # live, labelled, scored
    for sae_id, name, kind in conn.execute(
        "SELECT id, name, kind FROM saes ORDER BY id"
    ).fetchall():
        data = load_sae(conn, corpus, sae_id, name)
        labels = dict(conn.execute("SELECT idx, label FROM explanations WHERE sae = ? AND explainer = 'tokens'", (sae_id,)))  # fmt: skip
        stored = {(i, s): v for i, s, v in conn.execute("SELECT idx, scorer, value FROM scores WHERE sae = ? AND explainer = 'tokens'", (sae_id,))}  # fmt: skip
        lats = [lat for lat in data.latents if lat.index in labels]
        perm = [labels[lat.index] for lat in lats]
        random.Random(f"{seed}:{sae_id}").shuffle(perm)
        for key in (kind, "all"):
            counts[key][0] += len(data.latents)
            counts[key][1] += len(lats)
            counts[key][2] += sum((lat.index, "detection") in stored and (lat.index, "fuzzing") in stored for lat in lats)  # fmt: skip
        for lat, other in zip(lats, perm, strict=True):
            for scorer in ("detection", "fuzzing"):
                value = stored.get((lat.index, scorer))
                if value is None:
                    continue
                items = items_for(scorer, lat, data, corpus.text)
                again = score(scorer, judge, labels[lat.index], items)
                assert again is not None and abs(again - value) < 1e-9, (name, lat.index, scorer)
                alt = score(scorer, judge, other, items)
                for key in (kind, "all"):
                    own[key][scorer].append(value)
                    shuffled[key][scorer].append(alt if alt is not None else 0.5)
    conn.close()
    out = {}
    for key, (live, labelled, scored) in counts.items():
        row: dict[str, float] = {"live": live, "labelled": labelled, "scored": scored}
        for scorer in ("detection", "fuzzing"):
            vals = own[key][scorer]
            row[f"{scorer}_n"] = len(vals)
            row[f"{scorer}_median"] = statistics.median(vals) if vals else float("nan")
            row[f"{scorer}_shuffled_median"] = statistics.median(shuffled[key][scorer]) if vals else float("nan")  # fmt: skip
        out[key] = row
    return out


def tokens_run(suite: Suite, results: dict[str, object]) -> None:
    t0 = time.perf_counter()
    report = explain(suite, progress=False)
    seconds = time.perf_counter() - t0
    results["tokens"] = {"latents": report.labelled, "seconds": seconds, "latents_per_s": report.labelled / seconds}  # fmt: skip
    print(f"tokens explainer + simulator scores: {report.labelled} latents in {seconds:.1f} s ({report.labelled / seconds:.0f}/s)")  # fmt: skip
    acc = acceptance(suite)
    results["acceptance"] = acc
    print("| site kind | live latents | labelled | scored | detection median | shuffled | fuzzing median | shuffled |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for key in sorted(acc, key=lambda k: (k == "all", k)):
        r = acc[key]
        print(f"| {key} | {r['live']:,} | {r['labelled']:,} | {r['scored']:,} | {r['detection_median']:.3f} | "
              f"{r['detection_shuffled_median']:.3f} | {r['fuzzing_median']:.3f} | {r['fuzzing_shuffled_median']:.3f} |")  # fmt: skip


def server_run(
    suite: Suite, spec: str, args: argparse.Namespace, results: dict[str, object]
) -> None:
    saes = args.saes.split(",") if args.saes else suite.names[:1]
    t0 = time.perf_counter()
    rep = explain(suite, explainer=spec, saes=saes, latents=args.latents, concurrency=args.concurrency,
                  items=args.items, progress=False)  # fmt: skip
    seconds = time.perf_counter() - t0
    with sqlite3.connect(suite.features_db) as conn:
        failed = conn.execute("SELECT COUNT(*) FROM scores WHERE error IS NOT NULL AND explainer != 'tokens'").fetchone()[0]  # fmt: skip
        labels = [lab for (lab,) in conn.execute("SELECT label FROM explanations WHERE explainer != 'tokens' LIMIT 5")]  # fmt: skip
    results["server"] = {"spec": spec, "saes": saes, "latents": rep.labelled, "items": args.items,
                         "concurrency": args.concurrency, "requests": rep.requests, "seconds": seconds,
                         "requests_per_s": rep.requests / seconds, "seconds_per_latent": seconds / max(rep.labelled, 1),
                         "prompt_tokens": rep.prompt_tokens, "completion_tokens": rep.completion_tokens,
                         "scores": {k: statistics.median(v) if v else None for k, v in rep.scores.items()},
                         "failed_scores": failed, "labels_sample": labels}  # fmt: skip
    print(f"server: {rep.summary()}; {rep.requests / seconds:.2f} requests/s, {seconds / max(rep.labelled, 1):.1f} s/latent")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("suite")
    ap.add_argument("--server", help="openai:<base-url>#<model>: also time this explainer")
    ap.add_argument("--serve", action="store_true",
                    help="start `transformers serve` on the cached Gemma 3 270M and time it")  # fmt: skip
    ap.add_argument(
        "--items", type=int, default=None, help="items per scorer and latent (server run)"
    )
    ap.add_argument("--no-tokens", action="store_true", help="skip the tokens explainer run")
    ap.add_argument("--latents", type=int, default=20, help="latents per SAE through the server")
    ap.add_argument("--saes", help="SAEs for the server run (default: the first)")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    results: dict[str, object] = {"suite": args.suite, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                  "cpus": os.cpu_count(), "load_before": os.getloadavg()[0]}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = scratch_copy(Path(args.suite), Path(tmp))
        suite = Suite.open(path)
        if not args.no_tokens:
            tokens_run(suite, results)
        if args.serve:
            from lmscope.interp.explain.local_server import LocalServer

            with LocalServer(Path(tmp) / "serve") as spec:
                server_run(suite, spec, args, results)
        elif args.server:
            server_run(suite, args.server, args, results)
        results["load_after"] = os.getloadavg()[0]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
