"""Neuronpedia export of an interpreted suite, validated against the schema from Neuronpedia's repo."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmscope.interp.db import EXPLAIN_SCHEMA
from lmscope.interp.features import StatsConfig
from lmscope.interp.pipeline import InterpretConfig, interpret
from lmscope.interp.query import feature
from lmscope.releases.neuronpedia import export_neuronpedia, validate_export
from lmscope.suite import Suite


@pytest.fixture(scope="module")
def interpreted(tiny_suite: Path, tmp_path_factory: pytest.TempPathFactory) -> Suite:
    path = tmp_path_factory.mktemp("np") / "suite"
    shutil.copytree(tiny_suite, path)
    cfg = InterpretConfig(tokens=1500, batch_size=4, stats=StatsConfig(k=5, window=3, bands=3, per_band=3))  # fmt: skip
    interpret(path, cfg, progress=False)
    return Suite.open(path)


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in gzip.decompress(path.read_bytes()).decode().splitlines()]


def test_export_is_valid_and_carries_the_feature_records(
    interpreted: Suite, tmp_path: Path
) -> None:
    counts = export_neuronpedia(interpreted, tmp_path / "np", source_set="tiny")
    assert counts["features"] == sum(e["d_sae"] for e in interpreted.entries)
    n, errors = validate_export(tmp_path / "np")
    assert n == counts["features"] and errors == []
    name = interpreted.names[0]
    e = interpreted.entry(name)
    root = tmp_path / "np" / "tiny-gemma3" / f"{e['layer']}-tiny-res-{e['d_sae']}"
    assert {p.name for p in root.iterdir()} == {"model.jsonl", "release.jsonl", "sourceset.jsonl",
                                                "source.jsonl", "features", "activations", "explanations"}  # fmt: skip
    feats = {r["index"]: r for r in _rows(root / "features" / "batch-0.jsonl.gz")}
    acts = _rows(root / "activations" / "batch-0.jsonl.gz")
    live = [i for i in range(e["d_sae"]) if feature(interpreted, name, i).top]
    assert live, "the tiny suite should have firing latents"
    for i in live[:5]:
        rec, row = feature(interpreted, name, i), feats[str(i)]
        assert row["pos_str"] == [t for t, _ in rec.logits_up]
        assert row["frac_nonzero"] == pytest.approx(rec.density)
        assert row["maxActApprox"] == pytest.approx(rec.max_act)
        assert sum(row["freq_hist_data_bar_heights"]) == pytest.approx(sum(rec.hist_counts))
        assert len(row["freq_hist_data_bar_values"]) == len(row["freq_hist_data_bar_heights"])
        mine = [a for a in acts if a["index"] == str(i)]
        top = [a for a in mine if "binMin" not in a]
        assert len(top) == len(rec.top)
        assert top[0]["maxValue"] == pytest.approx(rec.top[0].act)
        assert top[0]["tokens"][top[0]["qualifyingTokenIndex"]] == rec.top[0].tokens[rec.top[0].center]  # fmt: skip


def test_explanations_come_from_the_explain_table(interpreted: Suite, tmp_path: Path) -> None:
    import sqlite3

    suite = Suite.open(shutil.copytree(interpreted.path, tmp_path / "s"))
    name = suite.names[0]
    with sqlite3.connect(suite.features_db) as conn:  # `lmscope explain`'s table
        conn.executescript(EXPLAIN_SCHEMA)
        sid = conn.execute("SELECT id FROM saes WHERE name = ?", (name,)).fetchone()[0]
        conn.execute("INSERT INTO explanations VALUES (?, 3, 'tokens', 'commas in code')", (sid,))  # fmt: skip
    counts = export_neuronpedia(suite, tmp_path / "np", saes=[name], limit=8)
    assert counts["explanations"] == 1 and validate_export(tmp_path / "np")[1] == []
    (path,) = (tmp_path / "np").rglob("explanations/batch-0.jsonl.gz")
    (row,) = _rows(path)
    assert (row["index"], row["description"], row["explanationModelName"]) == ("3", "commas in code", "tokens")  # fmt: skip


def test_validator_catches_schema_violations(interpreted: Suite, tmp_path: Path) -> None:
    export_neuronpedia(interpreted, tmp_path / "np", limit=3)
    path = next((tmp_path / "np").rglob("features/batch-0.jsonl.gz"))
    rows = _rows(path)
    rows[0]["index"] = 0  # Prisma: String
    rows[1]["freq_hist_data_bar_values"] = rows[1]["freq_hist_data_bar_values"] + [1.0]
    rows[2]["bogus"] = 1
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    n, errors = validate_export(tmp_path / "np")
    text = "\n".join(errors)
    assert "index: int is not string" in text and "differ in length" in text and "unknown field bogus" in text  # fmt: skip


def test_export_features_cli(interpreted: Suite, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "lmscope", "export-features", str(interpreted.path),
                        "--format", "neuronpedia", "--out", str(tmp_path / "np"), "--limit", "10",
                        "--check"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "0 schema errors" in r.stdout
