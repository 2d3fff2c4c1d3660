"""Issue 16, defect 5: TOML values of the wrong type are refused by name, not coerced or crashed on."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmscope.errors import ConfigError
from lmscope.train import TrainConfig, load_suite
from lmscope.train.config import SAESpec


@pytest.mark.parametrize(
    "value, message",
    [
        ("true", "batch_size must be int, got True (bool)"),
        ('"big"', "batch_size must be int, got 'big' (str)"),
        ("1024.5", "batch_size must be int, got 1024.5 (float)"),
    ],
)
def test_wrong_types_in_a_suite_toml_name_the_key(tmp_path: Path, value: str, message: str) -> None:
    toml = tmp_path / "suite.toml"
    toml.write_text(
        f"[train]\nbatch_size = {value}\n\n"
        '[[sae]]\nsites = ["L0.resid_post"]\nwidths = [64]\ntarget_l0 = [8]\n'
    )
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_suite(toml)


@pytest.mark.parametrize(
    "d",
    [
        {"total_tokens": 2000.7},
        {"lr": "fast"},
        {"lr": -1.0},
        {"lr": float("nan")},
        {"fast": 1},
        {"adam_betas": [0.0, "x"]},
        {"max_steps": 1.5},
    ],
)
def test_train_config_refuses_wrong_types_and_ranges(d: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=next(iter(d))):
        TrainConfig.from_dict(d)


def test_ints_stay_valid_floats_and_unset_optionals_stay_valid() -> None:
    cfg = TrainConfig.from_dict({"lr": 1, "max_steps": None, "adam_betas": [0, 0.99]})
    assert cfg.lr == 1 and cfg.max_steps is None and cfg.adam_betas == (0.0, 0.99)


@pytest.mark.parametrize("kw", [{"width": True}, {"target_l0": "abc"}, {"width": 64.0}])
def test_sae_spec_refuses_wrong_types(kw: dict[str, object]) -> None:
    base: dict[str, object] = {"site": "L0.resid_post", "width": 64, "target_l0": 8.0}
    with pytest.raises(ConfigError, match=next(iter(kw))):
        SAESpec(**{**base, **kw})  # type: ignore[arg-type]


def test_a_refused_rerun_names_the_cli_flag(tiny_data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Defect 9: the refusal said "pass resume=True" where the command-line flag is --resume."""
    from lmscope.train import TrainingInterrupted, train_suite

    spec = SAESpec("L0.resid_post", 32, target_l0=4.0)
    cfg = TrainConfig(total_tokens=64 * 20, batch_size=64, max_steps=3, norm_batches=2,
                      progress=False, log_every=1)  # fmt: skip
    with pytest.raises(TrainingInterrupted, match="--resume"):
        train_suite([spec], tiny_data, cfg, tmp_path / "run")
    with pytest.raises(ConfigError, match="--resume"):
        train_suite([spec], tiny_data, cfg, tmp_path / "run")
