"""`lmscope steer` and `lmscope attribute` on a trained tiny suite: output, files, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmscope.cli import main

PROMPT = "The capital of France is"


def test_steer_prints_both_continuations_and_the_next_token_shift(tiny_suite: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    rc = main(["steer", "--suite", str(tiny_suite), "--feature", "L1.resid_post:3", "--coeff", "40",
               "--max-new-tokens", "6", "--top", "3", PROMPT])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    clean = next(ln for ln in out.splitlines() if ln.startswith("clean:"))
    steered = next(ln for ln in out.splitlines() if ln.startswith("intervened:"))
    assert clean.split(":", 1)[1].strip() != steered.split(":", 1)[1].strip()
    assert "KL clean‖intervened" in out


def test_steer_takes_clamps_ablations_and_splices_together(tiny_suite: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    rc = main(["steer", "--suite", str(tiny_suite), "--splice", "L0.resid_post", "--clamp",
               "L0.resid_post:5=3.0", "--ablate", "L1.resid_post:2", "--positions", "2,3",
               "--max-new-tokens", "4", "--top", "0", PROMPT])  # fmt: skip
    assert rc == 0 and "intervened:" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--feature", "L1.resid_post:64", "--coeff", "1"], "valid latents: 0-63"),
        (["--feature", "L3.resid_post:1", "--coeff", "1"], "sites: L0.resid_post, L1.resid_post"),
        (["--feature", "L1.resid_post", "--coeff", "1"], "SITE:INDEX"),
        (["--feature", "L1.resid_post:1"], "--coeff"),
        ([], "nothing to do"),
    ],
)
def test_steer_errors_are_one_line_naming_valid_choices(tiny_suite: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:  # fmt: skip
    assert main(["steer", "--suite", str(tiny_suite), *args, PROMPT]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_attribute_prints_top_nodes_and_writes_the_graph(tiny_suite: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "graph.json"
    rc = main(["attribute", "--suite", str(tiny_suite), PROMPT, "--target", " the",
               "--contrast", " of", "--top", "20", "--show", "5", "--out", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0 and "top 5 nodes" in printed and "top 5 edges" in printed
    graph = json.loads(out.read_text())
    assert {s["site"] for s in graph["saes"]} == {"L0.resid_post", "L1.resid_post"}
    assert len([n for n in graph["nodes"] if n["kind"] == "latent"]) <= 20
    assert graph["edges"] and graph["target"]["tokens"] == [" the", " of"]


def test_attribute_refuses_a_target_of_several_tokens(tiny_suite: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    rc = main(["attribute", "--suite", str(tiny_suite), PROMPT, "--target", " Paris",
               "--out", str(tmp_path / "g.json")])  # fmt: skip
    assert rc == 2 and "is 3 tokens" in capsys.readouterr().err
    assert not (tmp_path / "g.json").exists()
