"""What the suite's files say, as plain JSON-able dicts: the pages and the JSON API both read these.

Only files the suite itself names are read: the manifest, each manifest SAE's ``eval.json``,
``features.db`` (through ``lmscope.interp.query``) and the report folder's own files, listed once.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from lmscope.serve.engine import Engine, ServeError

ORDERS = ("density", "max_act", "index", "score")
SEARCH_BY = ("id", "activating", "logits", "label")
REPORT_FILE = re.compile(r"^[A-Za-z0-9_.-]+\.(png|svg|html|css|json)$")
_CONTENT_TYPES = {"png": "image/png", "svg": "image/svg+xml", "html": "text/html",
                  "css": "text/css", "json": "application/json"}  # fmt: skip


def _query() -> Any:
    from lmscope.interp import query

    return query


def has_features(engine: Engine) -> bool:
    return bool(engine.suite.features_db.is_file() and _query().has_db(engine.suite))


def _require_db(engine: Engine) -> Any:
    if not has_features(engine):
        raise ServeError(f"this suite has no feature database yet; run `lmscope interpret {engine.suite.path}`", 409)  # fmt: skip
    return _query()


def overview(engine: Engine) -> dict[str, Any]:
    """The model, every SAE with its metrics, the canonical choices and what else the suite has."""
    s = engine.suite
    canon = set(s.manifest.get("canonical", {}).values())
    saes = [{"name": e["name"], "site": e["site"], "layer": e["layer"], "kind": e["kind"],
             "architecture": e["architecture"], "d_in": e["d_in"], "d_sae": e["d_sae"],
             "target_l0": e.get("target_l0"), "canonical": e["name"] in canon,
             "metrics": e.get("metrics") or {}} for e in s.entries]  # fmt: skip
    return {"path": s.path.name, "model": s.model, "model_dtype": s.model_dtype,
            "corpus": s.corpus, "seq_len": s.seq_len, "saes": saes,
            "canonical": dict(s.manifest.get("canonical", {})),
            "has_features": has_features(engine), "report": sorted(report_files(engine))}  # fmt: skip


def eval_info(engine: Engine, name: str) -> dict[str, Any]:
    """The SAE's ``eval.json`` (empty when eval has not run), its frequency histogram picked out."""
    engine.entry(name)
    path = engine.suite.path / name / "eval.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _histogram(value: Any, edges_key: str) -> tuple[list[float], list[int]] | None:
    if not isinstance(value, dict):
        return None
    edges, counts = value.get(edges_key), value.get("counts")
    if not (isinstance(edges, list) and isinstance(counts, list) and len(edges) == len(counts) + 1):
        return None
    used = [i for i, c in enumerate(counts) if c]
    lo = max(0, used[0] - 1) if used else 0  # drop the empty bins below the rarest live latent
    return [float(x) for x in edges[lo:]], [int(c) for c in counts[lo:]]


def frequency_histogram(info: dict[str, Any]) -> dict[str, Any] | None:
    """The latent-frequency histogram of an eval.json (log10 firing frequency of live latents)."""
    hist = _histogram(info.get("freq_hist"), "log10_edges")
    if hist is None:
        return None
    dead = info["freq_hist"].get("dead")
    return {"edges": hist[0], "counts": hist[1], "dead": dead, "label": "log₁₀ firing frequency"}


def l0_histogram(info: dict[str, Any]) -> dict[str, Any] | None:
    """How many latents fire per token, as an eval.json counts them."""
    hist = _histogram(info.get("l0_hist"), "edges")
    return None if hist is None else {"edges": hist[0], "counts": hist[1], "label": "active latents per token"}  # fmt: skip


def sae_detail(engine: Engine, name: str) -> dict[str, Any]:
    e = engine.entry(name)
    info = eval_info(engine, name)
    metrics = e.get("metrics") or {}
    counts = _query().counts(engine.suite, name) if has_features(engine) else None
    if counts is None and "dead" in metrics:  # eval counts them too, on its own tokens
        counts = {"n": e["d_sae"], "dead": metrics["dead"], "dense": metrics.get("dense")}
    return {"name": name, "site": e["site"], "layer": e["layer"], "kind": e["kind"],
            "architecture": e["architecture"], "d_in": e["d_in"], "d_sae": e["d_sae"],
            "target_l0": e.get("target_l0"), "canonical": engine.suite.is_canonical(name),
            "metrics": e.get("metrics") or {}, "training": e.get("training") or {},
            "frequency_histogram": frequency_histogram(info), "l0_histogram": l0_histogram(info),
            "counts": counts, "has_features": has_features(engine)}  # fmt: skip


def feature_list(
    engine: Engine, name: str, *, order: str = "density", offset: int = 0, limit: int = 50
) -> list[dict[str, Any]]:
    engine.entry(name)
    if order not in ORDERS:
        raise ServeError(f"unknown order {order!r}; valid: {', '.join(ORDERS)}", 422)
    rows = _require_db(engine).features(engine.suite, name, order=order, offset=offset,
                                        limit=min(limit, engine.limits.max_page))  # fmt: skip
    return [dataclasses.asdict(r) for r in rows]


def feature_search(
    engine: Engine, q: str, *, sae: str | None = None, by: str = "activating", limit: int = 50
) -> list[dict[str, Any]]:
    """Features by id (``123`` or ``SAE:123``), by the tokens they fire on, or by logit-lens tokens."""
    if sae is not None:
        engine.entry(sae)
    if by not in SEARCH_BY:
        raise ServeError(f"unknown search kind {by!r}; valid: {', '.join(SEARCH_BY)}", 422)
    q = q.strip()
    if not q:
        raise ServeError("type something to search for", 422)
    query = _require_db(engine)
    if by == "id":
        name, _, idx = q.rpartition(":")
        name = name or sae or ""
        if not idx.isdigit() or not name:
            raise ServeError("search by id takes a feature number (on an SAE page) or SAE:number", 422)  # fmt: skip
        engine.check_feature(name, int(idx))
        r = query.feature(engine.suite, name, int(idx))
        top = list(
            dict.fromkeys(e.tokens[e.center] for e in r.top if 0 <= e.center < len(e.tokens))
        )[:5]
        return [{"sae": r.sae, "index": r.index, "density": r.density, "max_act": r.max_act,
                 "top_tokens": top, "logits_up": [t for t, _ in r.logits_up[:5]],
                 "label": r.label, "score": r.score}]  # fmt: skip
    rows = query.search(engine.suite, q, sae=sae, by=by, limit=min(limit, engine.limits.max_page))
    return [dataclasses.asdict(r) for r in rows]


def feature_detail(engine: Engine, name: str, index: int) -> dict[str, Any]:
    engine.check_feature(name, index)
    record = _require_db(engine).feature(engine.suite, name, index)
    return dataclasses.asdict(record)


def with_labels(engine: Engine, result: dict[str, Any]) -> dict[str, Any]:
    """An inspector result with each listed feature's label and score (`lmscope explain`) added."""
    if not has_features(engine):
        return result
    keys = [(s["sae"], f["index"]) for s in result.get("saes", []) for fs in s["top"] for f in fs]
    if result.get("feature"):
        keys.append((result["feature"]["sae"], result["feature"]["index"]))
    found = _query().labels(engine.suite, list(dict.fromkeys(keys)))
    for s in result.get("saes", []):
        for fs in s["top"]:
            for f in fs:
                f["label"], f["score"] = found.get((s["sae"], f["index"]), (None, None))
    if result.get("feature"):
        feat = result["feature"]
        feat["label"], feat["score"] = found.get((feat["sae"], feat["index"]), (None, None))
    return result


def labels(engine: Engine, keys: list[tuple[str, int]]) -> list[dict[str, Any]]:
    """Labels of (SAE, index) pairs, for the steering picker: one dict per pair, in order."""
    for name, _ in keys:
        engine.entry(name)
    found = _query().labels(engine.suite, keys) if has_features(engine) else {}
    return [{"sae": n, "index": i, "label": found.get((n, i), (None, None))[0],
             "score": found.get((n, i), (None, None))[1]} for n, i in keys]  # fmt: skip


def report_files(engine: Engine) -> dict[str, Path]:
    """The report's own files (``index.html``, ``plots/x.png``, …) by relative name: the only report
    paths the server will read. Listed from the folder, so no request string becomes a path."""
    folder = engine.suite.path / "report"
    found: dict[str, Path] = {}
    for sub in ("", "plots"):
        d = folder / sub if sub else folder
        if not d.is_dir() or d.is_symlink():
            continue
        for p in sorted(d.iterdir()):
            if p.is_file() and not p.is_symlink() and REPORT_FILE.match(p.name):
                found[f"{sub}/{p.name}" if sub else p.name] = p
    return found


def report_file(engine: Engine, name: str) -> tuple[bytes, str]:
    files = report_files(engine)
    if name not in files:
        raise ServeError(f"no report file {name[:80]!r}; the report has: {', '.join(files) or 'nothing yet (run `lmscope report`)'}", 404)  # fmt: skip
    return files[name].read_bytes(), _CONTENT_TYPES[name.rsplit(".", 1)[1]]
