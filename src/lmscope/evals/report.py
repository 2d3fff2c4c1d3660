"""`lmscope report SUITE`: a static HTML page of a suite's eval results, `<suite>/report/index.html`.

Plots are PNG files beside it (`report/plots/*.png`) linked by relative paths, so the folder opens
in a browser from disk, with no server, and can be copied elsewhere whole.

>>> write_report(Suite.open("runs/quick/suite"))
PosixPath('runs/quick/suite/report/index.html')
"""

from __future__ import annotations

import html
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lmscope.atomic import write_json_atomic, write_text_atomic
from lmscope.errors import ConfigError
from lmscope.evals import plots
from lmscope.evals.results import read_eval
from lmscope.suite import Suite

FRONTIER_METRICS = ("delta_lm_loss", "fvu")
LAYER_METRICS = ("delta_lm_loss", "fvu", "ce_recovered", "kl", "l0", "dead_frac")
# (metric key, column heading, format)
TABLE = (
    ("l0", "L0", "{:.1f}"),
    ("fvu", "FVU", "{:.3f}"),
    ("explained_variance", "expl. var.", "{:.3f}"),
    ("cos_sim", "cos", "{:.3f}"),
    ("delta_lm_loss", "ΔLM loss", "{:.4f}"),
    ("kl", "KL", "{:.4f}"),
    ("ce_recovered", "CE rec.", "{:.3f}"),
    ("dead", "dead", "{:d}"),
    ("dense", "dense", "{:d}"),
    ("tokens", "tokens", "{:d}"),
)
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h1 { margin-bottom: 0.2em; } .meta { color: #666; margin-bottom: 1.5em; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; } .grid img { border: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 13px; } th, td { padding: 3px 8px; border-bottom: 1px solid #ddd; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } tr.canonical td:first-child::after { content: " ★"; color: #c80; }
"""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def write_report(suite: Suite, out: str | Path | None = None) -> Path:
    """Write the report of `suite` into `out` (default `<suite>/report/`); returns index.html."""
    suite.require_saes()
    entries = suite.entries
    if not plots.evaluated(entries, "l0"):
        raise ConfigError(
            f"no SAE of suite {suite.path} has eval metrics yet; run `lmscope eval {suite.path}` first"
        )
    folder = Path(out) if out is not None else suite.path / "report"
    if (folder / "plots").is_dir():
        shutil.rmtree(folder / "plots")  # plots of SAEs since removed must not linger
    (folder / "plots").mkdir(parents=True, exist_ok=True)
    records = {e["name"]: read_eval(suite.path / e["name"]) for e in entries}
    canonical = set(suite.manifest.get("canonical", {}).values())
    sections = [
        _frontiers(folder, entries),
        _layers(folder, entries, canonical),
        _histograms(folder, [r for r in records.values() if r is not None]),
        _positions(folder, [r for r in records.values() if r is not None]),
        _table(entries, canonical),
    ]
    first = next((r for r in records.values() if r is not None), None)
    cfg = first["config"] if first else {}
    meta = (
        f"model <b>{html.escape(suite.model)}</b> · {len(entries)} SAEs · eval on "
        f"{cfg.get('tokens', '?')} held-out tokens of {html.escape(str(cfg.get('corpus', '?')))} "
        f"(seq_len {cfg.get('seq_len', '?')}) · suite updated {html.escape(_stamp(suite.manifest.get('updated')))}"
    )
    page = (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>lmscope report — {html.escape(suite.path.name)}</title><style>{_CSS}</style></head>\n"
        f'<body><h1>lmscope report: {html.escape(suite.path.name)}</h1><div class="meta">{meta}</div>\n'
        + "\n".join(sections)
        + "\n</body></html>\n"
    )
    index = folder / "index.html"
    write_text_atomic(index, page)
    write_json_atomic(folder / "entries.json", entries)  # the table's data, for other tools
    return index


def _img(folder: Path, name: str, fig: Any, alt: str) -> str:
    path = plots.save_png(fig, folder / "plots" / f"{_slug(name)}.png")
    rel = path.relative_to(folder).as_posix()
    return f'<img src="{html.escape(rel)}" alt="{html.escape(alt)}">'


def _stamp(iso: object) -> str:
    """The manifest's last-change time as 'YYYY-MM-DD HH:MM UTC': the page depends on the suite, not the clock."""
    try:
        return f"{datetime.fromisoformat(str(iso)).astimezone(UTC):%Y-%m-%d %H:%M} UTC"
    except ValueError:
        return "?"


def _frontiers(folder: Path, entries: list[dict[str, Any]]) -> str:
    kinds = list(dict.fromkeys(e["kind"] for e in plots.evaluated(entries, "l0")))
    imgs = [
        _img(folder, f"frontier-{m}-{k}", plots.frontier(entries, m, kind=k), f"L0 vs {m}, {k}")
        for k in kinds
        for m in FRONTIER_METRICS
    ]
    return '<h2>Sparsity–fidelity frontiers</h2><div class="grid">' + "".join(imgs) + "</div>"


def _layers(folder: Path, entries: list[dict[str, Any]], canonical: set[str]) -> str:
    imgs = [
        _img(folder, f"layers-{m}", plots.across_layers(entries, m), f"{m} across layers")
        for m in LAYER_METRICS
    ]
    return (
        "<h2>Across layers</h2><p>One line per site kind and width; where a site has several "
        'SAEs, the one with L0 closest to 100.</p><div class="grid">' + "".join(imgs) + "</div>"
    )


def _histograms(folder: Path, records: list[dict[str, Any]]) -> str:
    imgs = [
        _img(
            folder,
            f"freq-{r['name']}",
            plots.frequency_histogram(r, small=True),
            f"latent frequencies of {r['name']}",
        )
        for r in records
    ]
    return (
        "<h2>Latent frequencies</h2><p>log10 of the fraction of eval tokens on which each latent "
        'fires; dead latents never fire.</p><div class="grid">' + "".join(imgs) + "</div>"
    )


def _positions(folder: Path, records: list[dict[str, Any]]) -> str:
    imgs = [
        _img(folder, f"position-{m}", plots.by_position(records, m), f"{m} by position")
        for m in ("delta_lm_loss", "fvu")
    ]
    return '<h2>By token position</h2><div class="grid">' + "".join(imgs) + "</div>"


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return '<td class="num">—</td>'
    try:
        text = fmt.format(int(value) if fmt == "{:d}" else float(value))
    except (TypeError, ValueError):
        text = str(value)
    return f'<td class="num">{html.escape(text)}</td>'


def _table(entries: list[dict[str, Any]], canonical: set[str]) -> str:
    head = "".join(
        f"<th>{h}</th>" for h in ("SAE", "site", "arch", "width", *(t[1] for t in TABLE))
    )
    rows = []
    for e in entries:
        m = e.get("metrics") or {}
        cells = "".join(_cell(m.get(k), fmt) for k, _, fmt in TABLE)
        cls = ' class="canonical"' if e["name"] in canonical else ""
        rows.append(
            f"<tr{cls}><td>{html.escape(e['name'])}</td><td>{html.escape(e['site'])}</td>"
            f'<td>{html.escape(e["architecture"])}</td><td class="num">{e["d_sae"]}</td>{cells}</tr>'
        )
    return (
        "<h2>Every SAE</h2><p>★ canonical: the SAE of its site and width with mean L0 closest "
        f'to 100; — not evaluated.</p><table id="saes"><thead><tr>{head}</tr></thead><tbody>'
        + "".join(rows)
        + "</tbody></table>"
    )
