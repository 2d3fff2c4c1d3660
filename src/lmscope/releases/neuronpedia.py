"""Neuronpedia export: a suite's interpreted features as the files Neuronpedia imports.

Layout (that of Neuronpedia's own exporter, utils/neuronpedia-utils `export-data.py` and
`convert-saedashboard-to-neuronpedia-export.py`): ``<out>/<modelId>/<sourceId>/`` holding
``model.jsonl``, ``release.jsonl``, ``sourceset.jsonl``, ``source.jsonl`` (one row each) and
``features/``, ``activations/``, ``explanations/`` with ``batch-N.jsonl.gz`` (1,024 features per
batch). Each row is one database row of Neuronpedia's Prisma models (Neuron, Activation,
Explanation, Source, SourceSet, SourceRelease, Model); `neuronpedia_schema.json` is that schema as
JSON Schema and `validate_export` checks a folder against it.

A source is one SAE: ``sourceId = "<layer>-<sourceSet>"`` with ``sourceSet = "<prefix>-<kind>-
<width>"`` (e.g. ``6-lmscope-res-1k``), as Neuronpedia names them (``6-gemmascope-res-16k``).
Activations are the top examples and the band samples with their token windows (band samples
carry ``binMin``/``binMax``); logit lists become ``pos_str``/``pos_values`` and ``neg_*``;
the activation histogram ``freq_hist_data_bar_values`` (bin centres) and ``_heights`` (counts);
density ``frac_nonzero``; decoder-cosine neighbours ``topkCosSim*``.
"""

from __future__ import annotations

import gzip
import json
import sqlite3
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from lmscope.errors import ConfigError

BATCH = 1024  # rows per batch file, as Neuronpedia's exporter
CREATOR = "lmscope"  # creatorId/authorId placeholder: Neuronpedia replaces it on import
KIND_TAGS = {"resid_post": "res", "resid_pre": "res-pre", "resid_mid": "res-mid", "mlp_out": "mlp",
             "attn_z": "att", "attn_out": "attn-out", "mlp_in": "transcoder"}  # fmt: skip
FILES = ("features", "activations", "explanations")


def _width(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def schema() -> dict[str, Any]:
    text = resources.files("lmscope.releases").joinpath("neuronpedia_schema.json").read_text()
    return dict(json.loads(text)["definitions"])


def _explanations(suite: Any, sae: str) -> dict[int, list[tuple[str, str]]]:
    """Labels in features.db (`lmscope explain`'s ``explanations`` table: sae, idx, explainer,
    label), per latent: [(explainer, label)]. None written yet: {}."""
    conn = sqlite3.connect(f"{suite.features_db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "explanations" not in tables:
            return {}
        cols = {r[1] for r in conn.execute('PRAGMA table_info("explanations")')}
        if not {"sae", "idx", "label"} <= cols:
            return {}
        who = "explainer" if "explainer" in cols else "'lmscope'"
        out: dict[int, list[tuple[str, str]]] = {}
        rows = conn.execute(
            f"SELECT e.idx, {who}, e.label FROM explanations e JOIN saes s ON s.id = e.sae "
            "WHERE s.name = ? ORDER BY e.idx",
            (sae,),
        )
        for idx, explainer, label in rows:
            if label:
                out.setdefault(int(idx), []).append((str(explainer), str(label)))
        return out
    finally:
        conn.close()


def _write_jsonl_gz(path: Path, rows: list[dict[str, Any]]) -> None:
    from lmscope.atomic import write_bytes_atomic

    data = "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, gzip.compress(data, compresslevel=5))


def export_neuronpedia(suite: Any, out: str | Path, *, model_id: str | None = None,
                       source_set: str = "lmscope", saes: list[str] | None = None,
                       limit: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Write the Neuronpedia export of ``suite`` (interpreted) under ``out``; returns counts."""
    from lmscope.atomic import write_bytes_atomic
    from lmscope.interp.query import feature, has_db

    if not has_db(suite):
        raise ConfigError(f"suite {suite.path} has no features.db; run `lmscope interpret {suite.path}` first")  # fmt: skip
    mid = (model_id or suite.model.rsplit("/", 1)[-1]).lower()
    now = datetime.now(UTC).isoformat(timespec="seconds")
    names = [suite.resolve(k) for k in saes] if saes else suite.names
    counts: dict[str, Any] = {"features": 0, "activations": 0, "explanations": 0,
                              "path": str(Path(out) / mid)}  # fmt: skip
    for name in names:
        e = suite.entry(name)
        tag = KIND_TAGS.get(e["kind"], e["kind"].replace("_", "-"))
        set_name = f"{source_set}-{tag}-{_width(e['d_sae'])}"
        same = [x for x in suite.entries if (x["layer"], x["kind"], x["d_sae"]) == (e["layer"], e["kind"], e["d_sae"])]  # fmt: skip
        suffix = f"__{name}" if len(same) > 1 else ""
        sid = f"{e['layer']}-{set_name}{suffix}".lower().replace(".", "-")
        root = Path(out) / mid / sid
        src = (e.get("training") or {}).get("source") or {}
        meta = {
            "model": {"id": mid, "displayNameShort": mid, "displayName": suite.model,
                      "creatorId": CREATOR, "instruct": mid.endswith("-it"), "visibility": "PUBLIC",
                      "layers": 1 + max(x["layer"] for x in suite.entries),
                      "neuronsPerLayer": e["d_in"], "owner": "", "createdAt": now, "updatedAt": now},
            "release": {"name": source_set, "description": f"lmscope suite {suite.path.name}",
                        "creatorName": "lmscope", "creatorId": CREATOR, "visibility": "PUBLIC",
                        "urls": [], "createdAt": now},
            "sourceset": {"modelId": mid, "name": set_name, "creatorId": CREATOR,
                          "description": f"{e['kind']} - {_width(e['d_sae'])}",
                          "creatorName": "lmscope", "releaseName": source_set,
                          "visibility": "PUBLIC", "createdAt": now},
            "source": {"id": sid, "modelId": mid, "setName": set_name, "creatorId": CREATOR,
                       "hasDashboards": True, "inferenceEnabled": False, "visibility": "PUBLIC",
                       "hfRepoId": src.get("repo"), "hfFolderId": src.get("folder"),
                       "saelensRelease": src.get("saelens_release"), "dataset": suite.corpus,
                       "num_tokens_in_prompt": suite.seq_len, "createdAt": now},
        }  # fmt: skip
        root.mkdir(parents=True, exist_ok=True)
        for fname, row in meta.items():
            write_bytes_atomic(root / f"{fname}.jsonl", (json.dumps(row) + "\n").encode())
        labels = _explanations(suite, name)
        n = e["d_sae"] if limit is None else min(limit, e["d_sae"])
        for b0 in range(0, n, BATCH):
            feats, acts, expl = [], [], []
            for i in range(b0, min(n, b0 + BATCH)):
                rec = feature(suite, name, i)
                feats.append(_neuron(rec, mid, sid, set_name))
                acts += _activations(rec, mid, sid)
                for explainer, label in labels.get(i, []):
                    expl.append({"id": f"{sid}-{i}-{explainer}", "modelId": mid, "layer": sid,
                                 "index": str(i), "description": label, "authorId": CREATOR,
                                 "typeName": "lmscope", "explanationModelName": explainer,
                                 "createdAt": now})  # fmt: skip
            batch = f"batch-{b0 // BATCH}.jsonl.gz"
            _write_jsonl_gz(root / "features" / batch, feats)
            _write_jsonl_gz(root / "activations" / batch, acts)
            _write_jsonl_gz(root / "explanations" / batch, expl)
            counts["features"] += len(feats)
            counts["activations"] += len(acts)
            counts["explanations"] += len(expl)
    return counts


def _neuron(rec: Any, mid: str, sid: str, set_name: str) -> dict[str, Any]:
    edges = rec.hist_edges
    centres = [0.5 * (a + b) for a, b in zip(edges, edges[1:])]
    return {
        "modelId": mid, "layer": sid, "index": str(rec.index), "sourceSetName": set_name,
        "creatorId": CREATOR, "maxActApprox": float(rec.max_act), "hasVector": False,
        "topkCosSimIndices": [int(i) for _, i, _ in rec.neighbours],
        "topkCosSimValues": [float(c) for _, _, c in rec.neighbours],
        "pos_str": [t for t, _ in rec.logits_up], "pos_values": [float(v) for _, v in rec.logits_up],
        "neg_str": [t for t, _ in rec.logits_down],
        "neg_values": [float(v) for _, v in rec.logits_down],
        "frac_nonzero": float(rec.density),
        "freq_hist_data_bar_values": centres,
        "freq_hist_data_bar_heights": [float(c) for c in rec.hist_counts],
        "logits_hist_data_bar_values": [], "logits_hist_data_bar_heights": [],
    }  # fmt: skip


def _activations(rec: Any, mid: str, sid: str) -> list[dict[str, Any]]:
    rows = []
    groups = [(None, rec.top)] + [(rng, ex) for rng, (_, ex) in zip(rec.band_ranges, rec.bands)]
    for band, examples in groups:
        for k, ex in enumerate(examples):
            values = [float(v) for v in ex.acts]
            top = max(range(len(values)), key=values.__getitem__)
            rows.append({
                "id": f"{sid}-{rec.index}-{'top' if band is None else f'{band[0]:.4g}'}-{k}",
                "tokens": list(ex.tokens), "index": str(rec.index), "layer": sid, "modelId": mid,
                "dataIndex": str(ex.seq), "maxValue": values[top], "maxValueTokenIndex": top,
                "minValue": min(values), "values": values, "creatorId": CREATOR,
                "qualifyingTokenIndex": int(ex.center),
                **({} if band is None else {"binMin": float(band[0]), "binMax": float(band[1])}),
            })  # fmt: skip
    return rows


def _check(value: Any, spec: dict[str, Any], where: str, errors: list[str]) -> None:
    """A JSON Schema subset (type, enum, required, properties, items, additionalProperties)."""
    kinds: dict[str, Any] = {"string": str, "integer": int, "number": (int, float), "boolean": bool,
             "object": dict, "array": list, "null": type(None)}  # fmt: skip
    if "enum" in spec and value not in spec["enum"]:
        errors.append(f"{where}: {value!r} not in {spec['enum']}")
        return
    types = spec.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        ok = any(isinstance(value, kinds[t]) and not (t in ("integer", "number") and isinstance(value, bool)) for t in types)  # fmt: skip
        if not ok:
            errors.append(f"{where}: {type(value).__name__} is not {'/'.join(types)}")
            return
    if isinstance(value, dict):
        for key in spec.get("required", []):
            if key not in value:
                errors.append(f"{where}: missing {key}")
        props = spec.get("properties", {})
        for key, v in value.items():
            if key in props:
                _check(v, props[key], f"{where}.{key}", errors)
            elif spec.get("additionalProperties") is False:
                errors.append(f"{where}: unknown field {key}")
    if isinstance(value, list) and "items" in spec:
        for i, v in enumerate(value):
            _check(v, spec["items"], f"{where}[{i}]", errors)


def validate_export(path: str | Path) -> tuple[int, list[str]]:
    """(features checked, errors) for an export folder: every row against the schema, plus
    equal-length histogram and logit arrays and activations that point at exported features."""
    defs, n = schema(), 0
    errors: list[str] = []
    tables = {"model": "Model", "release": "SourceRelease", "sourceset": "SourceSet", "source": "Source"}  # fmt: skip
    for src in sorted(p for p in Path(path).rglob("source.jsonl")):
        root = src.parent
        for fname, model in tables.items():
            for line in (root / f"{fname}.jsonl").read_text().splitlines():
                _check(json.loads(line), defs[model], f"{root.name}/{fname}", errors)
        indices: set[str] = set()
        for kind, model in zip(FILES, ("Neuron", "Activation", "Explanation")):
            for f in sorted((root / kind).glob("batch-*.jsonl.gz")):
                for k, line in enumerate(gzip.decompress(f.read_bytes()).decode().splitlines()):
                    row = json.loads(line)
                    where = f"{root.name}/{kind}/{f.name}:{k}"
                    _check(row, defs[model], where, errors)
                    if kind == "features":
                        n += 1
                        indices.add(row["index"])
                        for a, b in (("freq_hist_data_bar_heights", "freq_hist_data_bar_values"),
                                     ("logits_hist_data_bar_heights", "logits_hist_data_bar_values"),
                                     ("pos_str", "pos_values"), ("neg_str", "neg_values"),
                                     ("topkCosSimIndices", "topkCosSimValues")):  # fmt: skip
                            if len(row.get(a, [])) != len(row.get(b, [])):
                                errors.append(f"{where}: {a} and {b} differ in length")
                    elif row.get("index") not in indices:
                        errors.append(f"{where}: index {row.get('index')} has no feature row")
                    elif kind == "activations" and len(row["tokens"]) != len(row["values"]):
                        errors.append(f"{where}: tokens and values differ in length")
    return n, errors
