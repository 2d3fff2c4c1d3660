"""interpret on the real Gemma 3 270M: a small trained suite's database answers the query API."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

from lmscope.interp.features import StatsConfig
from lmscope.interp.pipeline import InterpretConfig, interpret
from lmscope.interp.query import counts, features, search
from lmscope.model import LoadedModel, SiteModel
from lmscope.suite import Suite, record_training


@pytest.mark.slow
def test_default_model_suite_database_answers_the_query_api(gemma_270m: LoadedModel, tmp_path: Path) -> None:  # fmt: skip
    from lmscope.activations.stream import stream_batches
    from lmscope.train import SAESpec, TrainConfig, train_suite

    names = ["L5.resid_post", "L6.resid_post"]
    specs = [SAESpec(n, 256, target_l0=16, model="gemma-3-270m") for n in names]
    cfg = TrainConfig(total_tokens=512 * 8, batch_size=512, lr=1e-3, lr_warmup_steps=2,
                      lambda_warmup_steps=4, norm_batches=2, threshold_init=0.1,
                      progress=False, log_every=4)  # fmt: skip
    data = stream_batches(gemma_270m, names, cfg.batch_size, seq_len=64)
    folders = train_suite(specs, data, cfg, tmp_path / "suite")
    suite = record_training(tmp_path / "suite", folders, model="gemma-3-270m", seq_len=64)
    run = InterpretConfig(tokens=1200, stats=StatsConfig(k=8, window=4))
    interpret(suite, run, loaded=gemma_270m, progress=False)
    suite = Suite.open(suite.path)

    l6 = suite.resolve("L6.resid_post")
    live = features(suite, l6, order="max_act", limit=5)
    assert len(live) == 5 and live[0].max_act > 0 and live[0].top_tokens
    rec = suite.feature("L6.resid_post", live[0].index)
    assert rec.max_act == live[0].max_act == rec.top[0].act
    assert [n for n, *_ in rec.prev_layer] == [suite.resolve("L5.resid_post")] * 10
    assert rec.next_layer == [] and len(rec.logits_up) == len(rec.logits_down) == 10
    assert sum(rec.hist_counts) == rec.n_fire == round(rec.density * 1200)

    # the top example's activation is the SAE's encode of the model's own reading of that sequence
    ex = rec.top[0]
    with sqlite3.connect(suite.features_db) as conn:
        blob = conn.execute("SELECT tokens FROM sequences WHERE id = ?", (ex.seq,)).fetchone()[0]
    ids = torch.from_numpy(np.frombuffer(blob, dtype=np.int32).astype(np.int64))[None]
    with torch.inference_mode():
        x = SiteModel(gemma_270m).run(ids, read=["L6.resid_post"], return_logits=False).acts
        f = suite.load_sae(l6).encode(x["L6.resid_post"][0])
    assert torch.allclose(f[ex.pos, rec.index], torch.tensor(ex.act), rtol=1e-4)
    assert ex.tokens[ex.center] == gemma_270m.tokenizer.decode([int(ids[0, ex.pos])])

    token = ex.tokens[ex.center]
    assert (l6, rec.index) in [(s.sae, s.index) for s in search(suite, token, sae=l6, limit=256)]
    assert (l6, rec.index) in [(s.sae, s.index) for s in search(suite, rec.logits_up[0][0], by="logits", limit=512)]  # fmt: skip
    c = counts(suite, l6)
    assert c["n"] == 256 and 0 <= c["dead"] < 256
