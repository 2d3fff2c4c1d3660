"""Training a cross-layer transcoder: the loss falls, the result is causal and loads from its
native folder, and a run stopped and resumed ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lmscope.errors import ConfigError
from lmscope.sae.multilayer import load_native
from lmscope.train.clt import CLTTrainConfig, train_clt
from lmscope.train.trainer import TrainingInterrupted

N, D, W, B = 3, 12, 24, 64


def _data(start: int) -> Iterator[dict[str, torch.Tensor]]:
    """Batch i is a function of i alone: mlp_out[l] is a linear read of mlp_in[l] and of the
    layer below's, which a CLT can express and per-layer transcoders cannot."""
    g = torch.Generator().manual_seed(123)
    own, below = torch.randn(N, D, D, generator=g) / D**0.5, torch.randn(N, D, D, generator=g) / D**0.5  # fmt: skip
    i = start
    while True:
        x = torch.randn(B, N, D, generator=torch.Generator().manual_seed(1000 + i))
        y = torch.einsum("bld,lde->ble", x, own)
        y[:, 1:] += torch.einsum("bld,lde->ble", x[:, :-1], below[1:])
        yield {**{f"L{la}.mlp_in": x[:, la] for la in range(N)},
               **{f"L{la}.mlp_out": y[:, la] for la in range(N)}}  # fmt: skip
        i += 1


def _cfg(steps: int) -> CLTTrainConfig:
    return CLTTrainConfig(n_layers=N, d_model=D, width=W, target_l0=6.0, steps=steps, lr=3e-3,
                          lr_warmup_steps=10, checkpoint_every=7, model="tiny-gemma3")  # fmt: skip


def test_clt_training_loss_falls_and_writes_a_causal_clt(tmp_path: Path) -> None:
    sae = train_clt(_cfg(120), _data, tmp_path / "clt")
    log = [json.loads(line) for line in (tmp_path / "clt" / "train_log.jsonl").read_text().splitlines()]  # fmt: skip
    assert [r["step"] for r in log] == list(range(1, 121))
    first, last = sum(r["mse"] for r in log[:10]) / 10, sum(r["mse"] for r in log[-10:]) / 10
    assert last < 0.5 * first, (first, last)
    assert 0 < log[-1]["l0"] < W
    for s in range(N):  # no decoder into an earlier layer
        assert not sae.w_dec[s, :, :s].any()
    back = load_native(tmp_path / "clt")
    assert back.kind == "clt" and back.sites == [f"L{i}.mlp_in" for i in range(N)]
    assert torch.equal(back.w_dec, sae.w_dec) and back.model == "tiny-gemma3"
    assert not (tmp_path / ".clt.train").exists()  # checkpoints cleared after the run


def test_clt_training_resumes_bit_identically(tmp_path: Path) -> None:
    full = train_clt(_cfg(30), _data, tmp_path / "a" / "clt")
    with pytest.raises(TrainingInterrupted):
        train_clt(_cfg(30), _data, tmp_path / "b" / "clt", max_steps=11)  # between checkpoints
    with pytest.raises(TrainingInterrupted):
        train_clt(_cfg(30), _data, tmp_path / "b" / "clt", max_steps=5)
    resumed = train_clt(_cfg(30), _data, tmp_path / "b" / "clt")
    for k in ("w_enc", "b_enc", "threshold", "w_dec", "b_dec"):
        assert torch.equal(getattr(resumed, k), getattr(full, k)), k
    logs = [(tmp_path / d / "clt" / "train_log.jsonl").read_text() for d in ("a", "b")]
    assert logs[0] == logs[1]
    with pytest.raises(TrainingInterrupted):
        train_clt(_cfg(30), _data, tmp_path / "c" / "clt", max_steps=3)
    with pytest.raises(ConfigError, match="another config"):
        train_clt(_cfg(31), _data, tmp_path / "c" / "clt")
