"""Screenshots of `lmscope serve` on a built suite, for the README (docs/img/).

    .venv/bin/python benchmarks/screenshot.py runs/quick --sae L6.resid_post --out docs/img
Starts the server on a free loopback port, opens the overview, the SAE's densest live features
and one feature page in Debian's Chromium (headless, through Playwright), and saves PNGs.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# as in tests/serve: without these Chromium keeps dialling out, which offline machines refuse
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
        "--disable-background-networking", "--disable-component-update"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("suite")
    ap.add_argument("--sae", default="L6.resid_post", help="an SAE name or site")
    ap.add_argument(
        "--feature", type=int, default=None, help="default: the live feature with the most contexts"
    )
    ap.add_argument("--out", type=Path, default=Path("docs/img"))
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    from lmscope.interp.query import features
    from lmscope.suite import Suite

    suite = Suite.open(args.suite)
    name = suite.resolve(args.sae)
    index = args.feature
    if index is None:  # a feature that fires, but not on everything: a readable example
        cands = [
            f for f in features(suite, name, order="density", limit=400) if 0.002 < f.density < 0.05
        ]
        index = cands[0].index if cands else 0
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "lmscope", "serve", args.suite, "--port", str(port)]
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(base + "/api/suite", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        args.out.mkdir(parents=True, exist_ok=True)
        chromium = shutil.which("chromium") or "/usr/bin/chromium"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1600})
            for slug, url in (("overview", "/"), ("feature", f"/sae/{name}/feature/{index}")):
                page.goto(base + url)
                page.wait_for_load_state("networkidle")
                path = args.out / f"browser-{slug}.png"
                page.screenshot(path=str(path))
                print(f"wrote {path}")
            browser.close()
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
