"""Small pure helpers the pages share: the token colour scale, token display, inline SVG plots.

Plots are drawn as inline SVG on the server, so pages need no plotting library in the browser and
work offline. Every string placed in SVG goes through ``html.escape``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape
from typing import Any

# The blue of the token highlighting: rgba(BLUE, alpha) with alpha = activation / scale.
BLUE = (37, 99, 235)


def act_alpha(act: float, scale: float) -> float:
    """The highlight opacity of an activation, in [0, 1]: linear in ``act / scale``."""
    if scale <= 0 or act <= 0 or not math.isfinite(act):
        return 0.0
    return round(min(1.0, act / scale), 3)


def act_colour(act: float, scale: float) -> str:
    """A CSS colour for one token: a blue whose opacity grows with the activation."""
    r, g, b = BLUE
    return f"rgba({r}, {g}, {b}, {act_alpha(act, scale)})"


def show_token(tok: str) -> str:
    """A token as displayed: newlines and tabs made visible, so that every token has a width."""
    shown = tok.replace("\n", "↵").replace("\t", "⇥")
    return shown if shown else "∅"


def fmt(value: Any, digits: int = 3) -> str:
    """A metric for a table cell: floats to ``digits`` significant digits, None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}"


def svg_histogram(
    edges: Sequence[float],
    counts: Sequence[int],
    *,
    width: int = 420,
    height: int = 140,
    xlabel: str = "",
    log_counts: bool = False,
) -> str:
    """A bar chart of a histogram (``len(edges) == len(counts) + 1``) as an inline SVG string."""
    if not counts or len(edges) != len(counts) + 1:
        return '<p class="muted">no histogram</p>'
    pad_l, pad_b, pad_t = 40, 28, 8
    plot_w, plot_h = width - pad_l - 8, height - pad_b - pad_t
    vals = [math.log10(1 + c) if log_counts else float(c) for c in counts]
    top = max(vals) or 1.0
    bar_w = plot_w / len(counts)
    bars = []
    for i, (v, c) in enumerate(zip(vals, counts)):
        h = plot_h * v / top
        x = pad_l + i * bar_w
        tip = escape(f"[{edges[i]:.3g}, {edges[i + 1]:.3g}): {c:,}")
        bars.append(
            f'<rect x="{x:.1f}" y="{pad_t + plot_h - h:.1f}" width="{max(bar_w - 1, 0.5):.1f}" '
            f'height="{h:.1f}" class="bar"><title>{tip}</title></rect>'
        )
    ylab = "log₁₀(1+count)" if log_counts else "count"
    return (
        f'<svg class="hist" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img">{"".join(bars)}'
        f'<line x1="{pad_l}" y1="{pad_t + plot_h}" x2="{width - 8}" y2="{pad_t + plot_h}" class="axis"/>'
        f'<text x="{pad_l}" y="{height - 14}" class="tick">{edges[0]:.3g}</text>'
        f'<text x="{width - 8}" y="{height - 14}" class="tick" text-anchor="end">{edges[-1]:.3g}</text>'
        f'<text x="{pad_l + plot_w / 2:.0f}" y="{height - 2}" class="label" text-anchor="middle">{escape(xlabel)}</text>'
        f'<text x="4" y="{pad_t + 10}" class="label">{escape(ylab)}</text>'
        f'<text x="4" y="{pad_t + 24}" class="tick">{fmt(max(counts))}</text></svg>'
    )


def svg_frontier(
    points: Sequence[dict[str, Any]],
    y_key: str,
    *,
    width: int = 460,
    height: int = 260,
) -> str:
    """A sparsity–fidelity frontier: L0 (log x) against ``y_key``, one point per SAE, linked.

    ``points`` are suite entries whose ``metrics`` hold ``l0`` and ``y_key``; each point links to
    its SAE page and is coloured by site kind.
    """
    pts = [
        (p, float(p["metrics"]["l0"]), float(p["metrics"][y_key]))
        for p in points
        if _finite(p.get("metrics", {}).get("l0"))
        and _finite(p.get("metrics", {}).get(y_key))
        and float(p["metrics"]["l0"]) > 0
    ]
    if not pts:
        return (
            f'<p class="muted">no {escape(y_key)} measured yet (run <code>lmscope eval</code>)</p>'
        )
    pad_l, pad_b, pad_t, pad_r = 52, 34, 10, 12
    pw, ph = width - pad_l - pad_r, height - pad_t - pad_b
    lx = [math.log10(x) for _, x, _ in pts]
    ys = [y for _, _, y in pts]
    x0, x1 = min(lx) - 0.1, max(lx) + 0.1
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5 * abs(y0 or 1), y1 + 0.5 * abs(y1 or 1)
    margin = 0.06 * (y1 - y0)  # keep points off the frame
    y0, y1 = y0 - margin, y1 + margin
    kinds = sorted({str(p["kind"]) for p, _, _ in pts})
    marks = []
    for (p, x, y), lxv in zip(pts, lx):
        cx = pad_l + pw * (lxv - x0) / (x1 - x0)
        cy = pad_t + ph * (1 - (y - y0) / (y1 - y0))
        tip = escape(f"{p['name']}: L0 {x:.3g}, {y_key} {y:.3g}")
        href = escape(f"/sae/{p['name']}")
        marks.append(
            f'<a href="{href}"><circle cx="{cx:.1f}" cy="{cy:.1f}" r="5" '
            f'class="pt k{kinds.index(str(p["kind"])) % 6}"><title>{tip}</title></circle>'
            f'<text x="{cx + 7:.1f}" y="{cy + 4:.1f}" class="tick">L{int(p["layer"])}</text></a>'
        )
    legend = "".join(
        f'<circle cx="{pad_l + 8 + 110 * i}" cy="{height - 6}" r="4" class="pt k{i % 6}"/>'
        f'<text x="{pad_l + 16 + 110 * i}" y="{height - 2}" class="tick">{escape(k)}</text>'
        for i, k in enumerate(kinds)
    )
    return (
        f'<svg class="frontier" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img"><rect x="{pad_l}" y="{pad_t}" width="{pw}" height="{ph}" class="frame"/>'
        f"{''.join(marks)}{legend}"
        f'<text x="{pad_l}" y="{pad_t + ph + 14}" class="tick">{10**x0:.3g}</text>'
        f'<text x="{pad_l + pw}" y="{pad_t + ph + 14}" class="tick" text-anchor="end">{10**x1:.3g}</text>'
        f'<text x="{pad_l + pw / 2:.0f}" y="{pad_t + ph + 14}" class="label" text-anchor="middle">L0 (log)</text>'
        f'<text x="{pad_l - 4}" y="{pad_t + 10}" class="tick" text-anchor="end">{y1:.3g}</text>'
        f'<text x="{pad_l - 4}" y="{pad_t + ph}" class="tick" text-anchor="end">{y0:.3g}</text>'
        f'<text x="12" y="{pad_t + ph / 2:.0f}" class="label" text-anchor="middle" '
        f'transform="rotate(-90 12 {pad_t + ph / 2:.0f})">{escape(y_key)}</text></svg>'
    )


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
