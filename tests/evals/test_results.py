"""`lmscope eval` on a trained suite, one SAE folder or a lone SAE: eval.json and manifest metrics,
the canonical SAE, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eval_helpers import random_sae

from lmscope.cli import main
from lmscope.data import in_eval_split
from lmscope.errors import ConfigError, CorpusError, SAEError
from lmscope.evals import EvalConfig, evaluate_path, evaluate_suite, read_eval
from lmscope.model import tiny_model
from lmscope.sae import SAEConfig, build_sae, load_sae, save_sae
from lmscope.suite import Suite

FEW = EvalConfig(tokens=600)


def strict_json(path: Path) -> dict:
    def refuse(name: str) -> None:
        raise AssertionError(f"{path} holds {name}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_suite_eval_writes_eval_json_and_manifest_metrics_for_every_sae(suite_copy: Path) -> None:
    results = evaluate_suite(Suite.open(suite_copy), FEW)
    suite = Suite.open(suite_copy)  # as written to disk
    assert sorted(results) == suite.names
    for entry in suite.entries:
        record = strict_json(suite_copy / entry["name"] / "eval.json")
        assert record["format"] == "lmscope.eval" and record["site"] == entry["site"]
        assert record["metrics"] == entry["metrics"]
        assert (
            record["config"]["corpus"] == suite.corpus
            and record["config"]["seq_len"] == suite.seq_len
        )
        m = entry["metrics"]
        assert 600 <= m["tokens"] < 600 + suite.seq_len
        assert 0 < m["l0"] < entry["d_sae"] and 0 < m["fvu"] < 1 and m["delta_lm_loss"] > 0
        assert len(record["by_position"]["delta_lm_loss"]) == suite.seq_len
        assert sum(record["freq_hist"]["counts"]) + record["freq_hist"]["dead"] == entry["d_sae"]


def test_the_canonical_sae_of_a_site_and_width_is_the_one_with_l0_closest_to_100(
    suite_copy: Path,
) -> None:
    loaded = tiny_model("gemma3")
    extra = random_sae(loaded, "L0.resid_post", width=64).folded()  # many latents on: a larger L0
    save_sae(extra, suite_copy / "L0.resid_post-w64-dense")
    suite = Suite.open(suite_copy)
    suite.register([suite_copy / "L0.resid_post-w64-dense"])
    evaluate_suite(suite, FEW, names=["L0.resid_post-w64-dense", "L0.resid_post-w64-l08"])
    on_site = [e for e in Suite.open(suite_copy).entries if e["site"] == "L0.resid_post"]
    assert len(on_site) == 2 and all(e["metrics"] for e in on_site)
    best = min(on_site, key=lambda e: abs(e["metrics"]["l0"] - 100))
    assert Suite.open(suite_copy).manifest["canonical"]["L0.resid_post/w64"] == best["name"]
    assert Suite.open(suite_copy).resolve("L0.resid_post") == best["name"]


def test_an_sae_folder_inside_a_suite_updates_only_its_entry(suite_copy: Path) -> None:
    name = Suite.open(suite_copy).names[1]
    evaluate_path(suite_copy / name, FEW)
    suite = Suite.open(suite_copy)
    assert suite.entry(name)["metrics"]["tokens"] >= 600
    assert suite.entry(suite.names[0])["metrics"] == {}
    assert read_eval(suite_copy / suite.names[0]) is None


def test_a_lone_sae_folder_is_evaluated_on_the_model_its_config_names(tmp_path: Path) -> None:
    folder = save_sae(random_sae(tiny_model("llama"), "L2.mlp_out"), tmp_path / "lone")
    results = evaluate_path(folder, EvalConfig(tokens=300, seq_len=32))
    record = strict_json(folder / "eval.json")
    assert record["model"] == "tiny-llama" and record["metrics"] == pytest.approx(
        results["lone"].scalars
    )


def test_eval_and_report_from_the_command_line(
    suite_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", str(suite_copy), "--tokens", "400", "--saes", "L1.resid_post"]) == 0
    out = capsys.readouterr().out
    assert "L1.resid_post-w64-l08" in out and "evaluated 1 SAE(s)" in out
    assert main(["report", str(suite_copy)]) == 0
    assert (suite_copy / "report" / "index.html").is_file()


# --- bad input: one clear line ----------------------------------------------------------------


def one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmscope: error: ") and "\n" not in err, err
    return err


def test_a_folder_that_is_not_a_suite_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "neither a suite" in one_line_error(["eval", str(tmp_path)], capsys)
    assert "does not exist" in one_line_error(["eval", str(tmp_path / "nope")], capsys)
    assert "not an lmscope suite" in one_line_error(["report", str(tmp_path)], capsys)
    with pytest.raises(ConfigError, match="neither a suite"):
        evaluate_path(tmp_path)


def test_an_sae_of_another_width_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sae = build_sae(SAEConfig("relu", d_in=32, d_sae=64, site="L1.resid_post", model="tiny-gemma3"))
    folder = save_sae(sae, tmp_path / "narrow")
    err = one_line_error(["eval", str(folder), "--tokens", "100"], capsys)
    assert "d_in=32" in err and "64" in err


def test_an_sae_of_another_model_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = save_sae(random_sae(tiny_model("llama"), "L1.resid_post"), tmp_path / "llama-sae")
    err = one_line_error(["eval", str(folder), "--model", "tiny-gemma3", "--tokens", "100"], capsys)
    assert "trained on model 'tiny-llama', not 'tiny-gemma3'" in err and "--model tiny-llama" in err


def test_an_sae_of_another_model_inside_a_suite_is_an_sae_error(suite_copy: Path) -> None:
    sae = load_sae(suite_copy / "L0.resid_post-w64-l08")
    sae.cfg.model = "tiny-llama"
    save_sae(sae, suite_copy / "L0.resid_post-w64-l08")
    with pytest.raises(SAEError, match="trained on model 'tiny-llama'"):
        evaluate_suite(Suite.open(suite_copy), FEW)


def test_an_empty_eval_split_is_a_one_line_error(
    suite_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = next(
        f"document number {i} of a one-document corpus"
        for i in range(100)
        if not in_eval_split(f"document number {i} of a one-document corpus", 0.05)
    )
    corpus = tmp_path / "one.txt"
    corpus.write_text(text)
    err = one_line_error(["eval", str(suite_copy), "--corpus", str(corpus)], capsys)
    assert "no tokens" in err and "eval" in err
    with pytest.raises(CorpusError):
        evaluate_suite(Suite.open(suite_copy), EvalConfig(corpus=str(corpus)))


def test_unknown_saes_and_an_unevaluated_report_name_the_way_out(
    suite_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = one_line_error(["eval", str(suite_copy), "--saes", "L7.mlp_out"], capsys)
    assert "L0.resid_post, L1.resid_post" in err
    assert "run `lmscope eval" in one_line_error(["report", str(suite_copy)], capsys)


def test_nan_and_infinite_metrics_are_written_as_null() -> None:
    from lmscope.evals.results import json_safe

    assert json_safe({"a": float("nan"), "b": [1.0, float("inf")], "c": 2}) == {
        "a": None,
        "b": [1.0, None],
        "c": 2,
    }
