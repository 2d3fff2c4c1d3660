"""Issue 16: every command, fed malformed input (wrong types, out-of-range numbers, paths that are
files, folders that hold something else), exits 2 with exactly one line on stderr, no traceback,
and changes no file (a hash of the whole tree before and after)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from test_outputs import tree_hash

from lmscope.cli import STAGE_CLIS, build_parser, main
from lmscope.sae import SAEConfig, build_sae, save_sae

SAE = "L0.resid_post-w64"
GOOD_TOML = '[model]\nname = "tiny-gemma3"\n[[sae]]\nsites = ["resid_post"]\nlayers = "0"\nwidths = [32]\ntarget_l0 = [4]\n'  # fmt: skip
# {} in an argument is replaced by the world folder below: S a suite (no eval, no features.db),
# A an SAE folder, T a store, F a file, O a folder of someone else's files, N a path not there.
CASES: dict[str, list[list[str]]] = {
    "harvest": [
        ["--tokens", "abc", "--out", "{N}"], ["--tokens", "0", "--out", "{N}"],
        ["--batch-size", "0", "--out", "{N}"], ["--seq-len", "1", "--out", "{N}"],
        ["--shard-rows", "0", "--out", "{N}"], ["--model", "tiny-gemma3", "--out", "{F}"],
        ["--model", "tiny-gemma3", "--out", "{O}"], ["--dtype", "int8", "--out", "{N}"],
        ["--split", "test", "--out", "{N}"], ["--model", "no-such-model!", "--out", "{N}"],
        ["--model", "tiny-gemma3", "--sites", "L99.resid_post", "--device", "cpu", "--out", "{N}"],
        ["--model", "tiny-gemma3", "--seq-len", "100000", "--device", "cpu", "--out", "{N}"],
        ["--model", "tiny-gemma3", "--out", "{T}", "--restart"], ["--bogus", "--out", "{N}"],
    ],
    "train": [
        ["--store", "{T}", "--sites", "L0.resid_post", "--l0", "8", "--tokens", "abc", "--out", "{N}"],
        ["--store", "{T}", "--sites", "L0.resid_post", "--l0", "8", "--tokens", "0", "--out", "{N}"],
        ["--store", "{T}", "--sites", "L0.resid_post", "--l0", "8", "--batch-size", "-1", "--out", "{N}"],
        ["--store", "{T}", "--sites", "L0.resid_post", "--l0", "8", "--lr", "-1", "--out", "{N}"],
        ["--store", "{T}", "--sites", "L0.resid_post", "--l0", "8", "--lr", "nan", "--out", "{N}"],
        ["--store", "{F}", "--sites", "L0.resid_post", "--l0", "8", "--out", "{N}"],
        ["--store", "{N}", "--sites", "L0.resid_post", "--l0", "8", "--out", "{N}"],
        ["--store", "{T}", "--sites", "L0.resid_post", "--l0", "8", "--out", "{F}"],
        ["--store", "{T}", "--sites", "L0.resid_post", "--l0", "8", "--out", "{O}"],
        ["--store", "{T}", "--sites", "L0.resid_post", "--arch", "nope", "--out", "{N}"],
        ["--store", "{T}", "--sites", "L0.resid_post", "--l0", "8", "--k", "4", "--out", "{N}"],
        ["--store", "{T}", "--l0", "8", "--out", "{N}"],
        ["--store", "{T}", "--sites", "L7.resid_post", "--l0", "8", "--out", "{N}"],
        ["--config", "{N}/x.toml", "--store", "{T}", "--out", "{N}"],
        ["--store", "{T}", "--sites", "L0.resid_post", "--l0", "8", "--widths", "0", "--out", "{N}"],
    ],
    "build": [
        ["{N}/c.toml", "--out", "{N}"], ["{F}", "--out", "{N}"], ["quik", "--out", "{N}"],
        ["{bad:widths = [0]}", "--out", "{N}"], ["{bad:[eval]\ntokens = -1}", "--out", "{N}"],
        ["{bad:[interpret]\nk = -4}", "--out", "{N}"], ["{bad:[nope]\nx = 1}", "--out", "{N}"],
        ["{good}", "--out", "{F}"], ["{good}", "--out", "{O}"], ["{good}", "--out", "{S}"],
        ["{good}", "--out", "{N}", "--port", "abc"], ["{bad:[train]\nbatch_size = true}", "--out", "{N}"],
    ],
    "export": [
        ["{N}", "--format", "saelens", "--out", "{N}"], ["{F}", "--format", "saelens", "--out", "{N}"],
        ["{A}", "--format", "bogus", "--out", "{N}"], ["{A}", "--format", "saelens", "--out", "{F}"],
        ["{A}", "--format", "saelens", "--out", "{O}"], ["{A}", "--format", "saelens", "--out", "{S}"],
        ["{O}", "--format", "saelens", "--out", "{N}"], ["{A}", "--format", "saelens"],
        ["{A}", "--format", "native", "--out", "{T}"], ["{A}", "x", "--format", "native", "--out", "{N}"],
        ["{A}", "--format", "saelens", "--out", "{F}/sub"],
    ],
    "import": [
        ["{O}", "--out", "{N}"], ["{A}", "--out", "{F}"], ["{A}", "--out", "{O}"], ["{A}", "--out", "{S}"],
        ["{garbage:params.npz}", "--out", "{N}"], ["{garbage:cfg.json}", "--out", "{N}"],
        ["{garbage:params.safetensors}", "--out", "{N}"], ["{A}"], ["{A}", "--out", "{F}/sub"],
        ["{A}", "--out", "{N}", "--bogus"], ["{T}", "--out", "{N}"],
    ],
    "eval": [
        ["{S}", "--tokens", "-5"], ["{S}", "--tokens", "0"], ["{S}", "--tokens", "abc"],
        ["{S}", "--batch-size", "0"], ["{S}", "--recon-tokens", "-1"], ["{S}", "--seq-len", "1"],
        ["{N}"], ["{F}"], ["{O}"], ["{S}", "--model-dtype", "int8"], ["{S}", "--saes", "nosuch"],
    ],
    "report": [
        ["{N}"], ["{F}"], ["{O}"], ["{S}"], ["{S}", "--out", "{F}"], ["{S}", "--out", "{O}"],
        ["{S}", "--bogus"], ["{S}", "extra"], ["{T}"], ["{A}"],
    ],
    "interpret": [
        ["{S}", "--tokens", "0"], ["{S}", "--tokens", "abc"], ["{S}", "--k", "-4"],
        ["{S}", "--window", "-1"], ["{S}", "--bands", "0"], ["{S}", "--per-band", "0"],
        ["{N}"], ["{F}"], ["{O}"], ["{S}", "--split", "test"], ["{S}", "--saes", "nosuch"],
    ],
    "steer": [
        ["hi", "--suite", "{S}", "--feature", f"{SAE}:1", "--coeff", "nan"],
        ["hi", "--suite", "{S}", "--feature", f"{SAE}:1", "--coeff", "inf"],
        ["hi", "--suite", "{S}", "--feature", f"{SAE}:1", "--coeff", "abc"],
        ["hi", "--suite", "{S}", "--ablate", f"{SAE}:1", "--max-new-tokens", "0"],
        ["hi", "--suite", "{S}", "--ablate", f"{SAE}:1", "--temperature", "-1"],
        ["hi", "--suite", "{S}", "--ablate", f"{SAE}:1", "--top", "-2"],
        ["hi", "--suite", "{N}", "--ablate", f"{SAE}:1"], ["hi", "--suite", "{F}", "--ablate", f"{SAE}:1"],
        ["hi", "--suite", "{S}", "--ablate", "L0resid"], ["hi", "--suite", "{S}", "--clamp", f"{SAE}:1=x"],
        ["hi", "--suite", "{S}", "--feature", f"{SAE}:1"], ["hi", "--suite", "{S}"],
        ["hi", "--suite", "{S}", "--ablate", f"{SAE}:9999", "--device", "cpu"],
    ],
    "attribute": [
        ["hi", "--suite", "{S}", "--target", " x", "--top", "-3"],
        ["hi", "--suite", "{S}", "--target", " x", "--max-edges", "-5"],
        ["hi", "--suite", "{S}", "--batch-size", "0"], ["hi", "--suite", "{S}", "--out", "{O}"],
        ["hi", "--suite", "{S}", "--target", " x", "--out", "{F}"], ["hi", "--suite", "{N}"],
        ["hi", "--suite", "{F}"], ["hi", "--suite", "{S}", "--mode", "bogus"],
        ["hi", "--suite", "{S}", "--show", "-1"], ["hi", "--suite", "{S}", "--max-logits", "0"],
        ["hi", "--suite", "{S}", "--top", "abc"],
    ],
    "serve": [
        ["{S}", "--port", "99999"], ["{S}", "--port", "-1"], ["{S}", "--port", "abc"], ["{N}"], ["{F}"],
        ["{O}"], ["{S}", "--log-level", "loud"], ["{S}", "--bogus"], [], ["{T}"],
    ],
}  # fmt: skip
# Other commands: what any parser must refuse, and the suites they cannot read.
GENERIC = [["--bogus"], ["-x"], ["{N}"], ["{F}"], ["{O}"], ["{S}", "extra", "args"],
           ["{T}", "--nope=1"], ["{S}", "--help=1"], ["{A}", "--bogus"], ["{S}", "--", "-v", "x"]]  # fmt: skip


def _commands() -> list[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sorted(sub.choices)  # type: ignore[union-attr]


def _cases() -> list[tuple[str, list[str]]]:
    known = {c for m in STAGE_CLIS for c in importlib.import_module(m).COMMANDS}
    out = []
    for command in _commands():
        for argv in CASES.get(command, GENERIC):
            out.append((command, argv))
    assert known | {"harvest", "train", "build", "export", "import"} <= set(_commands())
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lmscope.activations.store import StoreWriter
    from lmscope.suite import record_training

    w = tmp_path_factory.mktemp("world")
    cfg = SAEConfig(d_in=64, d_sae=64, architecture="jumprelu", site="L0.resid_post", model="tiny-gemma3")  # fmt: skip
    save_sae(build_sae(cfg), w / "S" / SAE)
    record_training(w / "S", [w / "S" / SAE], model="tiny-gemma3", corpus="default", seq_len=32)
    save_sae(build_sae(cfg), w / "A")
    with StoreWriter(str(w / "T"), sites={"L0.resid_post": 64}, model_name="tiny-gemma3") as sw:
        sw.append({"L0.resid_post": torch.randn(8, 64)}, torch.ones(1, 8, dtype=torch.long),
                  torch.ones(1, 8, dtype=torch.bool))  # fmt: skip
    (w / "F").write_text("a user's file\n")
    (w / "O").mkdir()
    (w / "O" / "thesis.tex").write_text("\\documentclass{article}\n")
    (w / "good.toml").write_text(GOOD_TOML)
    return w


def _fill(arg: str, w: Path) -> str:
    if arg.startswith("{bad:"):
        p = w / f"bad{abs(hash(arg))}.toml"
        p.write_text(GOOD_TOML.replace("widths = [32]", arg[5:-1]) if "widths" in arg else GOOD_TOML + arg[5:-1] + "\n")  # fmt: skip
        return str(p)
    if arg == "{good}":
        return str(w / "good.toml")
    if arg.startswith("{garbage:"):
        p = w / f"garbage-{arg[9:-1]}"
        p.mkdir(exist_ok=True)
        (p / arg[9:-1]).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not what the name says")
        return str(p)
    for key in "SATFON":
        arg = arg.replace("{" + key + "}", str(w / key))
    return arg


@pytest.mark.parametrize("command, argv", _cases(), ids=lambda v: v if isinstance(v, str) else " ".join(v)[:60])  # fmt: skip
def test_malformed_input_is_one_line_exit_2_and_changes_nothing(
    command: str, argv: list[str], world: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.chdir(world)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing here may reach the network
    filled = [_fill(a, world) for a in argv]  # test inputs are made before the hash
    before = tree_hash(world)
    try:
        code = main([command, *filled])
    except SystemExit as e:  # argparse's own refusals
        code = e.code  # type: ignore[assignment]
    err = capsys.readouterr().err
    assert code == 2, (code, err)
    assert err.count("\n") == 1 and err.startswith("lmscope: error:"), err
    assert "Traceback" not in err
    assert tree_hash(world) == before
    assert not (world / "N").exists()


def test_every_command_is_fed_at_least_ten_malformed_inputs() -> None:
    counts: dict[str, int] = {}
    for command, _ in _cases():
        counts[command] = counts.get(command, 0) + 1
    assert set(counts) == set(_commands()) and min(counts.values()) >= 10, counts
