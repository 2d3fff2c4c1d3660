"""Streaming activations straight into a trainer: the same rows a harvest would store, resumable."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from lmscope.activations.harvest import HarvestConfig, harvest
from lmscope.activations.stream import stream_batches
from lmscope.model import tiny_model

SITES = ["L0.resid_post", "L2.mlp_out"]


def test_streamed_rows_equal_a_harvest_of_the_same_tokens(
    tmp_path: Path, text_corpus: Path
) -> None:
    corpus = text_corpus
    loaded = tiny_model("llama")
    data = stream_batches(loaded, SITES, 100, corpus=str(corpus), seq_len=32, model_batch=4)
    batches = list(itertools.islice(data(0), 6))
    assert all(b[s].shape[0] == 100 for b in batches for s in SITES)
    cfg = HarvestConfig(model="tiny-llama", sites=",".join(SITES), corpus=str(corpus), tokens=600,
                        seq_len=32, batch_size=4)  # fmt: skip
    store = harvest(cfg, str(tmp_path / "store"), loaded=loaded, progress=False)
    for s in SITES:
        assert torch.equal(torch.cat([b[s] for b in batches]), store.read_rows(s))


def test_starting_at_batch_k_equals_skipping_k_batches(tmp_path: Path, text_corpus: Path) -> None:
    corpus = text_corpus
    data = stream_batches(tiny_model("gpt2"), SITES, 70, corpus=str(corpus), seq_len=32)
    straight = list(itertools.islice(data(0), 7))
    resumed = list(itertools.islice(data(4), 3))
    for a, b in zip(straight[4:], resumed, strict=True):
        for s in SITES:
            assert torch.equal(a[s], b[s])
