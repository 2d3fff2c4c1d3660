"""Peak resident memory and seconds per stage of `lmscope build` (issue 16: the quick build must
fit an 8 GB laptop, i.e. peak under 4 GB).

The build runs in this process, as `lmscope build` runs it; a sampler thread reads this process's
RSS (psutil) every 20 ms and files each sample under the stage ``build.json`` names as running.

    python benchmarks/build.py quick --out runs/quick-bench           # the README's main job
    python benchmarks/build.py quick --layers 0-2 --out runs/q3       # 9 SAEs: a quicker check
    python benchmarks/build.py my.toml --out runs/x --json benchmarks/results/build_x.json

``--layers`` replaces ``layers = "all"`` in every [[sae]] group (the preset's other settings stay).
A finished --out is refused (remove it or choose another) so that every stage is measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import tomllib
from importlib import resources
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_info  # noqa: E402

from lmscope.build import PRESETS, STAGES, STATE, build, parse_config  # noqa: E402


class StageMemory:
    """Peak RSS per build stage, sampled from a thread while the build runs."""

    def __init__(self, root: Path, every_s: float = 0.02) -> None:
        self.root, self.every_s = root, every_s
        self.proc = psutil.Process()
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _stage(self) -> str:
        try:
            return json.loads((self.root / STATE).read_text())["stage"] or "between stages"
        except (OSError, ValueError, KeyError):
            return "setup"

    def _run(self) -> None:
        stage, last_read = "setup", 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now - last_read > 0.2:  # build.json changes once per stage: read it 5×/s
                stage, last_read = self._stage(), now
            rss = self.proc.memory_info().rss
            self.peak[stage] = max(self.peak.get(stage, 0), rss)
            time.sleep(self.every_s)

    def __enter__(self) -> StageMemory:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def _config(name: str, layers: str | None) -> dict[str, object]:
    if name in PRESETS:
        text = resources.files("lmscope.presets").joinpath(f"{name}.toml").read_text()
    else:
        text = Path(name).read_text()
    raw = tomllib.loads(text)
    if layers:
        for group in raw["sae"]:
            group["layers"] = layers
    return raw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="preset name (quick, standard, gemma-scope) or a TOML file")
    ap.add_argument("--out", required=True, help="suite folder to build (must not exist)")
    ap.add_argument("--layers", help="build only these layers, e.g. 0-2 (default: the config's)")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        sys.exit(f"{out} exists; give a new --out so that every stage is measured")
    cfg = parse_config(_config(args.config, args.layers), args.config)
    t0 = time.perf_counter()
    with StageMemory(out) as mem:
        suite = build(cfg, out)
    wall = time.perf_counter() - t0
    seconds = json.loads((out / STATE).read_text())["seconds"]
    rows = [(s, seconds.get(s), mem.peak.get(s)) for s in ("setup", *STAGES)]
    print(f"\n{'stage':<12} {'seconds':>8} {'peak RSS (GB)':>14}")
    for stage, sec, peak in rows:
        sec_s = f"{sec:8.1f}" if sec is not None else f"{'':>8}"
        print(f"{stage:<12} {sec_s} {(peak or 0) / 1e9:14.2f}")
    overall = max(mem.peak.values())
    print(f"{'whole build':<12} {wall:8.1f} {overall / 1e9:14.2f}   ({len(suite.names)} SAEs)")
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "machine": machine_info(),
        "saes": len(suite.names),
        "wall_s": wall,
        "peak_rss_bytes": overall,
        "stages": {s: {"seconds": sec, "peak_rss_bytes": peak} for s, sec, peak in rows},
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
