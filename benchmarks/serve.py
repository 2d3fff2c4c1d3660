"""Load test of `lmscope serve` on loopback: requests per second and p50/p99 latency for feature pages
and for the inspector.

The server runs as its own process (`python -m lmscope serve`, bound to 127.0.0.1 on a free port),
so the load generator does not share its interpreter. Each scenario sends a bounded number of
requests (`--requests`, and at most `--max-seconds` of wall time) from `c` client threads for each
concurrency `c`; every response must be a 200. Without `--suite` a tiny suite (tiny-gemma3, two
64-wide SAEs) is trained, evaluated and interpreted in a temporary folder first.

    .venv/bin/python benchmarks/serve.py --requests 200 --concurrency 1,4 --out results.json
    .venv/bin/python benchmarks/serve.py --suite runs/l6/suite --text-tokens 64
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("The capital of France is Paris, and the capital of Italy is Rome. In 1969 the first people "
        "walked on the Moon; def add(a, b): return a + b. She said that the weather would be fine "
        "tomorrow, but it rained all day and the streets of the old town were full of water.")  # fmt: skip


def tiny_suite(folder: Path) -> Path:
    """Train, evaluate and interpret the tests' tiny suite (about a minute of CPU)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny_suite

    from lmscope.evals.evaluate import EvalConfig
    from lmscope.evals.results import evaluate_path
    from lmscope.interp.pipeline import InterpretConfig, interpret

    out = build_tiny_suite(folder / "suite")
    evaluate_path(out, EvalConfig(tokens=2048), device="cpu")
    interpret(out, InterpretConfig(tokens=8192, device="cpu"), progress=False)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(suite: Path, threads: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [sys.executable, "-m", "lmscope", "--threads", str(threads), "serve", str(suite),
           "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            httpx.get(url + "/api/status", timeout=2).raise_for_status()
            return proc, url
        except httpx.HTTPError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise SystemExit(f"the server did not start: {' '.join(cmd)}") from None
            time.sleep(0.2)


def load(
    url: str,
    request: Callable[[httpx.Client, int], httpx.Response],
    *,
    n: int,
    concurrency: int,
    max_seconds: float,
) -> dict[str, float]:
    """`n` requests from `concurrency` threads (each its own keep-alive client); latencies in ms."""
    latencies: list[float] = []
    failures: list[str] = []
    counter = iter(range(n))
    lock = threading.Lock()
    stop_at = time.monotonic() + max_seconds

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=300) as client:
            while time.monotonic() < stop_at:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                r = request(client, i)
                dt = (time.perf_counter() - t0) * 1000
                with lock:
                    latencies.append(dt)
                    if r.status_code != 200:
                        failures.append(f"{r.status_code}: {r.text[:200]}")

    t0 = time.perf_counter()
    workers = [threading.Thread(target=worker) for _ in range(concurrency)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - t0
    if failures:
        raise SystemExit(f"{len(failures)} requests failed, e.g. {failures[0]}")
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"requests": len(latencies), "concurrency": concurrency, "wall_s": round(wall, 3),
            "rps": round(len(latencies) / wall, 2), "p50_ms": round(statistics.median(latencies), 2),
            "p99_ms": round(q[98], 2), "max_ms": round(max(latencies), 2)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", type=Path, default=None, help="a suite with eval + interpret done (default: build the tiny one)")  # fmt: skip
    ap.add_argument("--requests", type=int, default=200, help="requests per scenario and concurrency")  # fmt: skip
    ap.add_argument("--concurrency", default="1,4", help="client threads, comma-separated")
    ap.add_argument("--max-seconds", type=float, default=120.0, help="wall-time cap per run")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the server")
    ap.add_argument("--text-tokens", type=int, default=48, help="about how many tokens the inspector reads")  # fmt: skip
    ap.add_argument("--out", type=Path, default=None, help="write JSON results here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        suite = args.suite or tiny_suite(Path(tmp))
        proc, url = start_server(suite, args.threads)
        try:
            results = run_scenarios(url, args)
        finally:
            proc.terminate()
            proc.wait(30)
    report = {"benchmark": "serve", "date": datetime.now(UTC).isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "suite": str(args.suite or "tiny (built by the benchmark)"),
              "machine": machine_info(), "server_torch_threads": args.threads, "results": results}  # fmt: skip
    print(json.dumps(report, indent=1))
    print(
        "\n| scenario | clients | requests | req/s | p50 ms | p99 ms |\n|---|---:|---:|---:|---:|---:|"
    )
    for r in results:
        print(f"| {r['scenario']} | {r['concurrency']} | {r['requests']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")


def run_scenarios(url: str, args: argparse.Namespace) -> list[dict[str, object]]:
    suite = httpx.get(url + "/api/suite").json()
    saes = [(s["name"], s["d_sae"]) for s in suite["saes"]]
    kinds = sorted({s["kind"] for s in suite["saes"]})
    # Feature pages of live features only (a dead one has no contexts to render): up to 1,000 of the
    # most frequent per SAE, as the SAE page lists them.
    live = []
    for name, _ in saes:
        for offset in range(0, 1000, 200):
            page = httpx.get(f"{url}/api/saes/{name}/features", params={"offset": offset, "limit": 200}).json()  # fmt: skip
            live += [(name, f["index"]) for f in page if f["density"] > 0]
            if len(page) < 200 or page[-1]["density"] == 0:
                break
    rng = random.Random(0)
    picks = [rng.choice(live) for _ in range(4096)]
    words = TEXT.split()
    text = " ".join(words[: max(1, int(args.text_tokens * 0.75))])  # ~1.3 tokens per word

    scenarios: dict[str, Callable[[httpx.Client, int], httpx.Response]] = {
        "feature page (HTML)": lambda c, i: c.get("/sae/{}/feature/{}".format(*picks[i % 4096])),
        "feature (JSON API)": lambda c, i: c.get(
            "/api/saes/{}/features/{}".format(*picks[i % 4096])
        ),  # fmt: skip
        "inspector, one SAE (API)": lambda c, i: c.post(
            "/api/inspect", json={"text": text, "saes": [saes[i % len(saes)][0]]}
        ),  # fmt: skip
        f"inspector, all layers of {kinds[0]} (API)": lambda c, i: c.post(
            "/api/inspect", json={"text": text, "kind": kinds[0]}
        ),  # fmt: skip
    }
    with httpx.Client(base_url=url, timeout=600) as c:  # warm-up: loads the model and every SAE
        for k in kinds:
            r = c.post("/api/inspect", json={"text": text, "kind": k})
            r.raise_for_status()
        n_tokens = len(r.json()["tokens"])
        for i in range(5):
            c.get("/sae/{}/feature/{}".format(*picks[i])).raise_for_status()
    results: list[dict[str, object]] = []
    for name, request in scenarios.items():
        for conc in (int(x) for x in args.concurrency.split(",")):
            stats = load(
                url, request, n=args.requests, concurrency=conc, max_seconds=args.max_seconds
            )
            results.append({"scenario": name, "text_tokens": n_tokens if "inspector" in name else None, **stats})  # fmt: skip
            print(f"{name}, {conc} clients: {stats}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
