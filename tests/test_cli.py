"""The command line: help on every command, one-line errors, and a small end-to-end run."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmscope.cli import STAGE_CLIS, build_parser, main
from lmscope.sae import load_sae

CORE = ["harvest", "train", "build", "export", "import"]
# every stage module lists the commands it registers
COMMANDS = CORE + [c for m in STAGE_CLIS for c in importlib.import_module(m).COMMANDS]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: lmscope " + command in capsys.readouterr().out


def test_parser_knows_exactly_the_documented_commands() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(COMMANDS)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["harvest", "--model", "no-such-model!", "--out", "x"], "tiny-<gemma3"),
        (
            ["harvest", "--model", "tiny-gpt2", "--sites", "L9.resid_post", "--out", "x"],
            "layers 0-3",
        ),
        (
            ["harvest", "--model", "tiny-gpt2", "--sites", "L1.resid_pots", "--out", "x"],
            "resid_post",
        ),
        (
            ["harvest", "--model", "tiny-gpt2", "--corpus", "/no/such/dir", "--out", "x"],
            "/no/such/dir",
        ),
        (
            [
                "train",
                "--store",
                "/no/such/store",
                "--sites",
                "L0.resid_post",
                "--l0",
                "8",
                "--out",
                "x",
            ],
            "no activation store",
        ),  # fmt: skip
        (["export", "/no/such/sae", "--format", "saelens", "--out", "x"], "/no/such/sae"),
    ],
)
def test_bad_input_is_one_clear_line(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [a if a != "x" else str(tmp_path / "out") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmscope: error:") and "\n" not in err and message in err
    assert not (tmp_path / "out").exists()  # nothing written on bad input


def test_harvest_then_train_then_export_end_to_end(tmp_path: Path, text_corpus: Path) -> None:
    corpus = text_corpus
    run = [sys.executable, "-m", "lmscope"]
    common = ["--model", "tiny-gemma2", "--corpus", str(corpus), "--seq-len", "32"]
    subprocess.run([*run, "harvest", *common, "--sites", "L1.resid_post", "--tokens", "3000",
                    "--device", "cpu", "--out", str(tmp_path / "store")], check=True)  # fmt: skip
    subprocess.run([*run, "train", "--store", str(tmp_path / "store"), "--sites", "L1.resid_post",
                    "--arch", "topk", "--k", "4", "--widths", "128", "--tokens", "3000",
                    "--batch-size", "250", "--out", str(tmp_path / "suite")], check=True)  # fmt: skip
    sae_dir = tmp_path / "suite" / "L1.resid_post-topk-w128-k4"
    sae = load_sae(sae_dir)
    assert (
        sae.cfg.site == "L1.resid_post" and sae.cfg.d_sae == 128 and sae.cfg.model == "tiny-gemma2"
    )
    manifest = json.loads((tmp_path / "suite" / "manifest.json").read_text())
    assert manifest["model"] == "tiny-gemma2" and manifest["seq_len"] == 32
    assert [e["name"] for e in manifest["saes"]] == [sae_dir.name]
    subprocess.run([*run, "export", str(sae_dir), "--format", "saelens", "--out",
                    str(tmp_path / "exported")], check=True)  # fmt: skip
    assert (tmp_path / "exported" / "cfg.json").is_file()


def test_threads_flag_sets_torch_threads(tmp_path: Path) -> None:
    import torch

    before = torch.get_num_threads()
    try:
        argv = ["--threads", "1", "export", str(tmp_path / "none"), "--format", "native"]
        assert main([*argv, "--out", str(tmp_path / "out")]) == 2
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
