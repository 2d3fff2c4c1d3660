"""`lmscope build`: config checks, a whole tiny build, and kill -9 at every stage then resume."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmscope.build import STAGES, build, read_config
from lmscope.errors import ConfigError
from lmscope.suite import Suite

TINY = """
[model]
name = "tiny-gemma3"
device = "cpu"

[data]
corpus = "{corpus}"
seq_len = 32

[harvest]
tokens = 3000
batch_size = 4
shard_rows = 512

[train]
total_tokens = 6000
batch_size = 100
lr = 1e-3
lr_warmup_steps = 5
norm_batches = 4
checkpoint_every = 10
log_every = 10

[[sae]]
sites = ["resid_post", "mlp_out"]
layers = "0-1"
widths = [32]
target_l0 = [4]

[eval]
tokens = 400
batch_size = 4

[interpret]
tokens = 600
batch_size = 4
k = 4
window = 3
"""


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory, shared_text_corpus: Path) -> Path:
    p = tmp_path_factory.mktemp("build") / "tiny.toml"
    p.write_text(TINY.format(corpus=shared_text_corpus))
    return p


@pytest.fixture(scope="module")
def reference(tiny_config: Path) -> dict[str, object]:
    """An uninterrupted build's snapshot, made once for every kill test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tiny_config.parent / "reference"
        build(str(tiny_config), out, progress=False)
        return snapshot(out)
    finally:
        torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def one_thread() -> object:
    # the killed runs use --threads 1: same thread count, so the same floating-point sums
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def snapshot(root: Path) -> dict[str, object]:
    """What makes a suite: SAE weights, eval metrics, the feature database's rows, the report."""
    suite = Suite.open(root)
    out: dict[str, object] = {"names": suite.names, "canonical": suite.manifest["canonical"]}
    for e in suite.entries:
        out[e["name"]] = ({k: v.tolist() for k, v in load_file(root / e["name"] / "weights.safetensors").items()},
                          e["metrics"])  # fmt: skip
    con = sqlite3.connect(root / "features.db")
    tables = [
        r[0] for r in con.execute("select name from sqlite_master where type='table' order by name")
    ]
    for t in tables:
        rows = con.execute(f"select * from {t}").fetchall()
        out[f"db.{t}"] = sorted(map(repr, rows)) if t != "meta" else None
    con.close()
    out["report"] = sorted(p.name for p in (root / "report").iterdir())
    return out


def test_a_tiny_build_makes_an_evaluated_interpreted_reported_suite(
    tiny_config: Path, tmp_path: Path
) -> None:
    suite = build(str(tiny_config), tmp_path / "suite", progress=False)
    assert len(suite.names) == 4 and suite.model == "tiny-gemma3"
    for e in suite.entries:
        assert {"l0", "fvu", "delta_lm_loss"} <= set(e["metrics"])
    assert suite.feature("L1.resid_post", 0).sae == suite.resolve("L1.resid_post")
    assert (tmp_path / "suite" / "report" / "index.html").is_file()
    state = json.loads((tmp_path / "suite" / "build.json").read_text())
    assert state["done"] == list(STAGES)
    build(str(tiny_config), tmp_path / "suite", progress=False)  # complete: a no-op


def test_a_resumed_build_loads_the_model_only_for_stages_that_need_it(
    tiny_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    import lmscope.model

    out = tmp_path / "suite"
    build(str(tiny_config), out, progress=False)
    index = (out / "report" / "index.html").read_text()
    shutil.rmtree(out / "report")
    state = json.loads((out / "build.json").read_text())
    state["done"].remove("report")
    (out / "build.json").write_text(json.dumps(state))

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the report stage loaded the model")

    monkeypatch.setattr(lmscope.model, "load_model", no_model)
    build(str(tiny_config), out, progress=False)
    assert (out / "report" / "index.html").read_text() == index
    assert json.loads((out / "build.json").read_text())["done"] == list(STAGES)

    state["done"].remove("interpret")  # a stage that needs the model does load it
    (out / "build.json").write_text(json.dumps(state))
    with pytest.raises(AssertionError, match="loaded the model"):
        build(str(tiny_config), out, progress=False)


def _kill_during(stage: str, config: Path, out: Path) -> None:
    """Start `lmscope build`, SIGKILL it while build.json says `stage` is running."""
    cmd = [
        sys.executable,
        "-m",
        "lmscope",
        "--threads",
        "1",
        "build",
        str(config),
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "build.json"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if json.loads(state.read_text()).get("stage") == stage:
                    break
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the build ended before {stage} could be killed"
    assert stage not in json.loads(state.read_text())["done"]


@pytest.mark.parametrize("stage", STAGES)
def test_killing_the_build_at_any_stage_then_rerunning_gives_the_same_suite(
    stage: str, tiny_config: Path, reference: dict[str, object], tmp_path: Path
) -> None:
    _kill_during(stage, tiny_config, tmp_path / "killed")
    build(str(tiny_config), tmp_path / "killed", progress=False)
    assert snapshot(tmp_path / "killed") == reference


def test_a_rerun_with_another_config_is_refused_naming_the_key(
    tiny_config: Path, tmp_path: Path
) -> None:
    cfg = read_config(str(tiny_config))
    (tmp_path / "s").mkdir()
    from lmscope.build import _State, parse_config

    _State(tmp_path / "s", cfg)
    raw = json.loads(json.dumps(cfg.raw))
    raw["harvest"]["tokens"] = 5000
    with pytest.raises(ConfigError, match=r"harvest\.tokens differs"):
        _State(tmp_path / "s", parse_config(raw))


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "[modle]\nname='x'\n[[sae]]\nsites=['resid_post']\nwidths=[8]\ntarget_l0=[2]",
            "unknown tables",
        ),
        (
            "[model]\nnam='x'\n[[sae]]\nsites=['resid_post']\nwidths=[8]\ntarget_l0=[2]",
            "valid: device, dtype, name",
        ),
        ("[model]\nname='x'", "no \\[\\[sae\\]\\] groups"),
        (
            "[train]\nlrr=1\n[[sae]]\nsites=['resid_post']\nwidths=[8]\ntarget_l0=[2]",
            "unknown \\[train\\] keys",
        ),
    ],
)
def test_bad_configs_are_one_line_errors(text: str, message: str, tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_config(str(p))


def test_unknown_preset_names_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="quick, standard, gemma-scope"):
        read_config("quik")


@pytest.mark.parametrize("preset", ["quick", "standard", "gemma-scope"])
def test_presets_parse_and_expand_to_every_layer(preset: str) -> None:
    from lmscope.build import sae_specs

    cfg = read_config(preset)
    specs = sae_specs(cfg, 18)
    assert {s.site.split(".")[1] for s in specs} == {"resid_post", "mlp_out", "attn_z"}
    assert {s.site.split(".")[0] for s in specs} == {f"L{i}" for i in range(18)}
