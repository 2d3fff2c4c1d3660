"""Issue 16, defects 6 and 9: steer and attribute refuse non-finite and out-of-range numbers, and
attribute's --out, before any model work, in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmscope.cli import main


@pytest.mark.parametrize(
    "argv, message",
    [
        (["steer", "hi", "--feature", "L0.resid_post:1", "--coeff", "nan"], "--coeff must be a finite"),
        (["steer", "hi", "--feature", "L0.resid_post:1", "--coeff", "inf"], "--coeff must be a finite"),
        (["steer", "hi", "--clamp", "L0.resid_post:1=nan"], "--clamp must be a finite"),
        (["steer", "hi", "--ablate", "L0.resid_post:1", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["steer", "hi", "--ablate", "L0.resid_post:1", "--temperature", "-1"], "--temperature"),
        (["steer", "hi", "--ablate", "L0.resid_post:1", "--top", "-2"], "--top must be"),
        (["attribute", "hi", "--target", " x", "--top", "-3"], "--top must be a finite number >= 1"),
        (["attribute", "hi", "--target", " x", "--max-edges", "-5"], "--max-edges"),
        (["attribute", "hi", "--batch-size", "0"], "--batch-size"),
    ],
)  # fmt: skip
def test_bad_numbers_are_one_line_before_any_work(
    argv: list[str], message: str, tiny_suite: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--suite", str(tiny_suite), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmscope: error:") and "\n" not in err and message in err, err


def test_attribute_out_must_be_a_file_it_may_write(
    tiny_suite: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["attribute", "hi", "--target", " x", "--suite", str(tiny_suite), "--device", "cpu"]
    assert main([*base, "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    assert main([*base, "--out", str(notes)]) == 2
    assert "did not write it" in capsys.readouterr().err
    assert notes.read_text() == '{"mine": 1}'
