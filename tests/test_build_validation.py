"""Issue 16, defect 7: `lmscope build` checks its whole config (and the model) before writing
anything, so a fixed config then runs instead of being refused as "a different config"."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmscope.cli import main

BASE = """
[model]
name = "tiny-gemma3"
device = "cpu"
[data]
seq_len = 32
[harvest]
tokens = 300
batch_size = 4
[train]
total_tokens = 200
batch_size = 100
[[sae]]
sites = ["resid_post"]
layers = "0"
widths = [32]
target_l0 = [4]
[eval]
tokens = 100
[interpret]
tokens = 100
k = 4
"""


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("widths = [32]", "widths = [0]", "width must be positive"),
        ('name = "tiny-gemma3"', 'name = "no-such-model!"', "tiny-<gemma3"),
        ('layers = "0"', 'layers = "9"', "out of range"),
        ("k = 4", "k = -4", "k, bands and per_band must be >= 1"),
        ("[eval]\ntokens = 100", "[eval]\ntokens = -256", "eval tokens must be an integer >= 1"),
        ("batch_size = 100", "batch_size = true", "batch_size must be int"),
        ("[harvest]\ntokens = 300", "[harvest]\ntokens = -3", "tokens must be a positive"),
        ("seq_len = 32", "seq_len = 1", "seq_len must be at least 2"),
    ],
)
def test_a_config_error_writes_nothing_so_the_fixed_config_is_not_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], old: str, new: str, message: str
) -> None:
    assert old in BASE
    bad, out = tmp_path / "bad.toml", tmp_path / "suite"
    bad.write_text(BASE.replace(old, new))
    assert main(["build", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err
    assert not out.exists()
    # the user fixes the config: the build must not say "built with a different config"
    good = tmp_path / "good.toml"
    good.write_text(BASE)
    from lmscope.build import _State, read_config

    _State(out, read_config(str(good)))  # what the build writes first; refused if it differed


def test_build_refuses_an_out_holding_other_files(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(BASE)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("x")
    assert main(["build", str(tmp_path / "c.toml"), "--out", str(tmp_path / "out")]) == 2
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["thesis.tex"]
