"""interpret's bad inputs: clear errors, and never a half-written database."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from interp_support import CFG, Interpreted

from lmscope.cli import main
from lmscope.errors import ConfigError
from lmscope.interp import InterpError
from lmscope.interp.features import LatentStats
from lmscope.interp.pipeline import InterpretConfig, interpret
from lmscope.model import tiny_model
from lmscope.suite import Suite


def _copy(interpreted: Interpreted, tmp_path: Path) -> Suite:
    shutil.copytree(interpreted.suite.path, tmp_path / "suite")
    return Suite.open(tmp_path / "suite")


def test_a_suite_without_trained_saes_is_refused(tmp_path: Path) -> None:
    suite = Suite.create(tmp_path / "empty", model="tiny-gemma3")
    with pytest.raises(ConfigError, match="no trained SAEs"):
        interpret(suite, CFG, progress=False)


def test_more_tokens_than_the_corpus_holds_is_refused_before_the_model_runs(
    interpreted: Interpreted, tmp_path: Path, text_corpus: Path
) -> None:
    suite = _copy(interpreted, tmp_path)
    suite.features_db.unlink()
    suite.manifest["corpus"] = str(text_corpus)
    suite.save()
    with pytest.raises(InterpError, match=r"has only [\d,]+ tokens; ask for --tokens \d+ or fewer"):
        interpret(suite, InterpretConfig(tokens=10**8), loaded=tiny_model("gemma3"), progress=False)  # fmt: skip
    assert not suite.features_db.exists()


def test_an_interrupted_run_leaves_the_previous_database_whole(
    interpreted: Interpreted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    suite = _copy(interpreted, tmp_path)
    before = suite.features_db.read_bytes()
    calls = []
    real = LatentStats.update

    def interrupted(self: LatentStats, *args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(LatentStats, "update", interrupted)
    with pytest.raises(KeyboardInterrupt):
        interpret(suite, CFG, loaded=tiny_model("gemma3"), progress=False)
    assert suite.features_db.read_bytes() == before
    assert sorted(p.name for p in suite.path.iterdir() if "features" in p.name) == ["features.db"]


def test_the_cli_interprets_a_suite_and_reports_dead_and_dense_latents(
    interpreted: Interpreted, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    suite = _copy(interpreted, tmp_path)
    suite.features_db.unlink()
    argv = ["--threads", "1", "interpret", str(suite.path), "--tokens", "300", "--k", "4",
            "--window", "2", "--saes", "L1.resid_post"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"wrote {suite.features_db}" in out and "64 latents" in out
    rec = suite.feature("L1.resid_post", 0)
    assert rec.tokens == 300 and len(rec.top) <= 4 and all(len(x.tokens) <= 5 for x in rec.top)
    config = json.loads(_meta(suite)["config"])
    assert config["tokens"] == 300 and config["stats"]["k"] == 4
    with pytest.raises(InterpError, match="is not in"):
        suite.feature("L0.resid_post", 0)  # only L1 was interpreted


def test_the_cli_names_a_missing_suite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["interpret", str(tmp_path / "nope"), "--tokens", "10"]) == 2
    assert "does not exist" in capsys.readouterr().err


def _meta(suite: Suite) -> dict[str, str]:
    import sqlite3

    with sqlite3.connect(suite.features_db) as conn:
        return dict(conn.execute("SELECT key, value FROM meta").fetchall())
