"""Per-site-kind min / median / max of a suite's eval metrics (issue 15's quick-build table).

    .venv/bin/python benchmarks/quick_table.py runs/quick [--json out.json]

Reads each SAE's eval.json (held-out tokens) and prints a markdown table, one row per metric and
site kind; the eval's token counts are printed with it so the figures say what they count.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

METRICS = [
    ("l0", "mean L0", "{:.1f}"),
    ("fvu", "FVU", "{:.3f}"),
    ("delta_lm_loss", "ΔLM loss (nats)", "{:.3f}"),
    ("kl", "KL (nats)", "{:.3f}"),
    ("ce_recovered", "CE loss recovered", "{:.3f}"),
    ("dead_frac", "dead (never fire)", "{:.1%}"),
    ("dense_frac", "dense (fire on > 10%)", "{:.1%}"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("suite")
    ap.add_argument("--json", help="also write the per-kind summary here")
    a = ap.parse_args()
    by_kind: dict[str, list[dict]] = {}
    tokens = set()
    for p in sorted(Path(a.suite).glob("*/eval.json")):
        d = json.loads(p.read_text())
        kind = d["site"].split(".", 1)[1]
        by_kind.setdefault(kind, []).append(d["metrics"])
        tokens.add((d["metrics"]["tokens"], d["metrics"]["loss_tokens"]))
    kinds = sorted(by_kind)
    head = "| metric | " + " | ".join(f"{k}: min | median | max" for k in kinds) + " |"
    print(
        f"{sum(len(v) for v in by_kind.values())} SAEs; (recon tokens, loss tokens): {sorted(tokens)}"
    )
    print(head)
    print("|---|" + "---:|---:|---:|" * len(kinds))
    summary: dict[str, dict[str, list[float]]] = {}
    for key, label, fmt in METRICS:
        cells = []
        for k in kinds:
            vals = [m[key] for m in by_kind[k]]
            trio = [min(vals), statistics.median(vals), max(vals)]
            summary.setdefault(k, {})[key] = trio
            cells += [fmt.format(v) for v in trio]
        print(f"| {label} | " + " | ".join(cells) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
