"""Plots of eval results, as matplotlib Figures (Agg, no pyplot state): the report writes them to PNG,
and the browser app can serve the same figures.

Inputs are plain data: suite manifest entries (``{"name", "site", "layer", "kind", "d_sae",
"metrics": {...}}``, as `Suite.entries` gives) and eval.json records (`results.read_eval`).

>>> fig = frontier(suite.entries, "delta_lm_loss", kind="resid_post")
>>> png_bytes(fig)
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

LABELS = {
    "l0": "L0 (active latents per token)",
    "fvu": "FVU (mean-centred)",
    "explained_variance": "explained variance",
    "cos_sim": "cosine similarity",
    "delta_lm_loss": "ΔLM loss (nats)",
    "kl": "KL to clean (nats)",
    "ce_recovered": "CE loss recovered",
    "dead_frac": "dead latents (fraction)",
    "dense_frac": "dense latents (fraction)",
}
Entry = dict[str, Any]


def label(metric: str) -> str:
    return LABELS.get(metric, metric)


def _figure(width: float = 6.0, height: float = 4.0) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def _value(e: Entry, metric: str) -> float | None:
    v = e.get("metrics", {}).get(metric)
    return None if v is None else float(v)


def evaluated(entries: Sequence[Entry], *metrics: str) -> list[Entry]:
    """The entries whose metrics hold every one of `metrics` (as numbers)."""
    return [e for e in entries if all(_value(e, m) is not None for m in metrics)]


def frontier(entries: Sequence[Entry], metric: str, *, kind: str | None = None) -> Figure:
    """L0 against `metric` (e.g. delta_lm_loss, fvu): one line per (site, width) through its SAEs
    of different sparsities, coloured by layer. `kind` keeps one site kind."""
    fig, ax = _figure()
    rows = [e for e in evaluated(entries, "l0", metric) if kind is None or e["kind"] == kind]
    groups: dict[tuple[str, int], list[Entry]] = {}
    for e in rows:
        groups.setdefault((e["site"], e["d_sae"]), []).append(e)
    n_layers = 1 + max((e["layer"] for e in rows), default=0)
    colors = colormaps["viridis"]
    for (site, width), es in sorted(groups.items(), key=lambda g: (g[1][0]["layer"], g[0])):
        es = sorted(es, key=lambda e: _value(e, "l0") or 0.0)
        color = colors(es[0]["layer"] / max(n_layers - 1, 1))
        ax.plot(
            [_value(e, "l0") for e in es],
            [_value(e, metric) for e in es],
            "o-",
            color=color,
            label=f"{site} w{width}",
            markersize=4,
        )
    l0s = [_value(e, "l0") or 0.0 for e in rows]
    if l0s and min(l0s) > 0 and max(l0s) / min(l0s) > 3:  # log only where it spreads the points
        ax.set_xscale("log")
    ax.set_xlabel(label("l0"))
    ax.set_ylabel(label(metric))
    ax.set_title(f"L0 vs {label(metric)}" + (f" — {kind}" if kind else ""))
    ax.grid(alpha=0.3)
    if groups:
        ax.legend(fontsize=6, ncols=2 if len(groups) > 8 else 1, loc="best")
    else:
        _empty(ax)
    return fig


def across_layers(
    entries: Sequence[Entry], metric: str, *, canonical: set[str] | None = None
) -> Figure:
    """`metric` by layer, one line per (site kind, width); with `canonical`, only those SAEs."""
    fig, ax = _figure()
    rows = [e for e in evaluated(entries, metric) if canonical is None or e["name"] in canonical]
    lines: dict[tuple[str, int], dict[int, float]] = {}
    for e in sorted(rows, key=lambda e: (e["layer"], abs((_value(e, "l0") or 0) - 100))):
        # several SAEs of one site and width (different L0s): the one nearest L0 100 stands for it
        lines.setdefault((e["kind"], e["d_sae"]), {}).setdefault(
            e["layer"], _value(e, metric) or 0.0
        )
    for (kind, width), by_layer in sorted(lines.items()):
        layers = sorted(by_layer)
        ax.plot(
            layers,
            [by_layer[layer] for layer in layers],
            "o-",
            label=f"{kind} w{width}",
            markersize=4,
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel(label(metric))
    ax.set_title(f"{label(metric)} across layers")
    ax.grid(alpha=0.3)
    if lines:
        ax.legend(fontsize=7)
    else:
        _empty(ax)
    return fig


def frequency_histogram(record: dict[str, Any], *, small: bool = False) -> Figure:
    """The latent-frequency histogram of one SAE's eval.json: log10 of each latent's firing
    frequency, with the dead latents (never fired) counted in the title."""
    fig, ax = _figure(3.2, 2.2) if small else _figure()
    hist = record["freq_hist"]
    edges, counts = hist["log10_edges"], hist["counts"]
    ax.stairs(counts, edges, fill=True, alpha=0.8)
    used = [i for i, c in enumerate(counts) if c]
    if used:
        ax.set_xlim(edges[used[0]] - 0.5, edges[-1])
    ax.set_xlabel("log10 firing frequency", fontsize=8 if small else 10)
    ax.set_ylabel("latents", fontsize=8 if small else 10)
    ax.set_title(f"{record['name']} — dead {hist['dead']}", fontsize=8 if small else 11)
    ax.tick_params(labelsize=7 if small else 9)
    return fig


def by_position(records: Sequence[dict[str, Any]], metric: str = "delta_lm_loss") -> Figure:
    """`metric` (delta_lm_loss, kl or fvu) by position in the sequence, one line per SAE."""
    fig, ax = _figure()
    for r in records:
        ys = r["by_position"][metric]
        xs = [i for i, y in enumerate(ys) if y is not None]
        ax.plot(xs, [ys[i] for i in xs], label=r["name"], linewidth=1)
    ax.set_xlabel("position in sequence")
    ax.set_ylabel(label(metric))
    ax.set_title(f"{label(metric)} by position")
    ax.grid(alpha=0.3)
    if records:
        ax.legend(fontsize=6, ncols=2 if len(records) > 8 else 1)
    else:
        _empty(ax)
    return fig


def _empty(ax: Any) -> None:
    ax.text(0.5, 0.5, "no evaluated SAEs", ha="center", va="center", transform=ax.transAxes)


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes (for a file or an HTTP response)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def save_png(fig: Figure, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(png_bytes(fig))
    return p
