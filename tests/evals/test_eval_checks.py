"""Issue 16: eval refuses token counts that would write NaN metrics, and its progress bar counts
work (so its ETA can be trusted), not splices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from eval_helpers import random_sae, token_blocks
from torch.utils.flop_counter import FlopCounterMode

from lmscope.cli import main
from lmscope.errors import ConfigError
from lmscope.evals import EvalConfig
from lmscope.evals.evaluate import _fast_block, _plan, _recon_block, block_cost
from lmscope.model import SiteModel, tiny_model


@pytest.mark.parametrize("kw", [{"tokens": -5}, {"tokens": 0}, {"batch_size": 0},
                                {"recon_tokens": -1}, {"seq_len": 1}, {"tokens": True}])  # fmt: skip
def test_eval_config_refuses_counts_that_evaluate_nothing(kw: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=next(iter(kw))):
        EvalConfig(**kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("tokens", ["-5", "0"])
def test_eval_cli_with_no_tokens_is_one_line_and_writes_nothing(
    tokens: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "manifest.json").write_text(json.dumps({"saes": []}))
    assert main(["eval", str(suite), "--tokens", tokens]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "tokens must be an integer >= 1" in err
    assert [p.name for p in suite.iterdir()] == ["manifest.json"]


def _flops(fn: object) -> float:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        fn()  # type: ignore[operator]
    return float(counter.get_total_flops())


def test_bar_work_per_block_matches_the_flops_each_block_costs() -> None:
    """A loss block (clean forward, zero ablations, a splice and unembedding per SAE) and a
    recon-only block (one forward to the deepest site) get bar shares in proportion to the
    multiply-adds they really do; counting splices gave both the same share."""
    loaded = tiny_model("gemma3")
    sm = SiteModel(loaded)
    blocks = token_blocks(loaded)
    sites = ["L0.resid_post", "L1.mlp_out", "L2.attn_z", "L0.resid_post"]
    plans = [_plan(sm, f"s{i}", random_sae(loaded, s, seed=i), 24) for i, s in enumerate(sites)]
    fast = _flops(lambda: _fast_block(sm, plans, blocks[0], lambda _: None))
    recon = _flops(lambda: _recon_block(sm, plans, blocks[0]))
    cost_fast, cost_recon = (block_cost(sm, plans, blocks[0], r) for r in (False, True))
    # multiply-adds are half the flops; attention scores and norms are left out of the estimate
    assert cost_fast * 1e9 == pytest.approx(fast / 2, rel=0.2)
    assert cost_recon * 1e9 == pytest.approx(recon / 2, rel=0.2)
    predicted = cost_fast / cost_recon
    assert predicted == pytest.approx(fast / recon, rel=0.2), (predicted, fast / recon)
    assert predicted > 3, (
        predicted,
        fast / recon,
    )  # the splices dominate: a bar counting splices is off by this factor
