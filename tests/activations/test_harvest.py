"""Harvest: the store holds exactly what the model computes at each site, and survives kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmscope.activations.harvest import HarvestConfig, harvest
from lmscope.activations.store import ActivationStore
from lmscope.data import TokenBatches, special_ids
from lmscope.errors import StoreError
from lmscope.model import LoadedModel, SiteModel, parse_sites, tiny_model

SITES = "L0-3.resid_post,L1.attn_z,L2.mlp_out,L3.resid_mid"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real-text corpus: the first paragraphs of this repository's design docs, as jsonl."""
    words = (Path(__file__).read_text() * 4).split()
    docs = [" ".join(words[i : i + 60]) for i in range(0, len(words), 60)]
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def _cfg(corpus: Path, **kw: object) -> HarvestConfig:
    base = dict(
        model="tiny-gemma3",
        sites=SITES,
        corpus=str(corpus),
        tokens=1500,
        seq_len=32,
        batch_size=4,
        shard_rows=100,
    )
    base.update(kw)
    return HarvestConfig(**base)  # type: ignore[arg-type]


def _assert_same_store(a: ActivationStore, b: ActivationStore) -> None:
    assert a.rows == b.rows and a.sites == b.sites
    for site in a.sites:
        assert torch.equal(a.read_rows(site), b.read_rows(site)), site
    assert torch.equal(a.token_ids(), b.token_ids())
    assert torch.equal(a.token_positions(), b.token_positions())
    assert torch.equal(a.sequences(), b.sequences())


def test_store_rows_equal_the_sites_read_directly(corpus: Path, tmp_path: Path) -> None:
    cfg = _cfg(corpus)
    loaded = tiny_model("gemma3")
    store = harvest(cfg, str(tmp_path / "s"), loaded=loaded, progress=False)
    assert store.rows == cfg.tokens  # exactly the tokens asked, BOS/EOS/pad excluded

    model = SiteModel(loaded)
    names = [str(s) for s in parse_sites(SITES, model.n_layers)]
    blocks = TokenBatches(cfg.corpus, loaded.tokenizer, seq_len=32, batch_size=4, seed=0)
    expected: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    ids: list[torch.Tensor] = []
    for block in blocks:
        with torch.no_grad():
            acts = model.run(block.input_ids, read=names, return_logits=True).acts
        for n in names:
            expected[n].append(acts[n][block.mask])
        ids.append(block.input_ids[block.mask])
        if sum(len(i) for i in ids) >= cfg.tokens:
            break
    for n in names:
        assert torch.equal(store.read_rows(n), torch.cat(expected[n])[: cfg.tokens]), n
    assert torch.equal(store.token_ids(), torch.cat(ids)[: cfg.tokens])
    special = set(special_ids(loaded.tokenizer))
    assert not special & set(store.token_ids().tolist())  # BOS, EOS, pad never stored


def test_interrupted_harvest_resumes_to_the_uninterrupted_store(
    corpus: Path, tmp_path: Path
) -> None:
    cfg = _cfg(corpus)
    loaded = tiny_model("gemma3")
    full = harvest(cfg, str(tmp_path / "full"), loaded=loaded, progress=False)
    partial = harvest(cfg, str(tmp_path / "cut"), loaded=loaded, progress=False, max_blocks=5)
    assert 0 < partial.rows < cfg.tokens and not partial.complete
    resumed = harvest(cfg, str(tmp_path / "cut"), loaded=loaded, progress=False)
    _assert_same_store(full, resumed)


def test_resuming_with_other_settings_is_refused(corpus: Path, tmp_path: Path) -> None:
    loaded = tiny_model("gemma3")
    harvest(_cfg(corpus), str(tmp_path / "s"), loaded=loaded, progress=False, max_blocks=2)
    with pytest.raises(StoreError, match="seq_len"):
        harvest(_cfg(corpus, seq_len=16), str(tmp_path / "s"), loaded=loaded, progress=False)
    with pytest.raises(StoreError, match="model"):
        other = tiny_model("llama")
        harvest(_cfg(corpus, sites="L0.resid_post"), str(tmp_path / "s"), loaded=other)


def test_memory_url_store(corpus: Path) -> None:
    url = f"memory://harvest-{os.getpid()}-{time.time_ns()}"
    store = harvest(_cfg(corpus, tokens=300), url, loaded=tiny_model("gemma3"), progress=False)
    assert ActivationStore(url).rows == 300 == store.rows


def test_kill_9_mid_harvest_then_resume_equals_uninterrupted(corpus: Path, tmp_path: Path) -> None:
    """A real `lmscope harvest` process killed with SIGKILL, then rerun with the same command."""
    args = ["--model", "tiny-gemma3", "--sites", SITES, "--corpus", str(corpus), "--tokens", "12000",
            "--seq-len", "32", "--batch-size", "4", "--shard-rows", "100", "--device", "cpu"]  # fmt: skip
    cli = [sys.executable, "-m", "lmscope", "harvest", *args]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    cut = tmp_path / "cut"
    proc = subprocess.Popen([*cli, "--out", str(cut)], env=env, stderr=subprocess.PIPE)
    manifest = cut / "manifest.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            m = json.loads(manifest.read_text())
        except (OSError, ValueError):
            m = None
        if m and m["resume"]["blocks"] >= 3:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = json.loads(manifest.read_text())
    assert not killed["complete"], "harvest finished before it could be killed; raise --tokens"
    subprocess.run([*cli, "--out", str(cut)], env=env, check=True, capture_output=True)
    subprocess.run(
        [*cli, "--out", str(tmp_path / "full")], env=env, check=True, capture_output=True
    )
    _assert_same_store(ActivationStore(str(tmp_path / "full")), ActivationStore(str(cut)))


@pytest.mark.slow
def test_default_model_harvest_of_all_54_sites_equals_direct_reads(
    gemma_270m: LoadedModel, tmp_path: Path
) -> None:
    """The README's main job in small: every layer's resid_post, mlp_out and attn_z of Gemma 3 270M
    over the default corpus; each stored row equals the site read directly from the model."""
    cfg = HarvestConfig(tokens=600, seq_len=64, batch_size=4)
    store = harvest(cfg, str(tmp_path / "s"), loaded=gemma_270m, progress=False)
    assert len(store.sites) == 54 and store.rows == 600
    assert store.d("L6.resid_post") == 640 and store.d("L6.attn_z") == 1024
    model = SiteModel(gemma_270m)
    blocks = TokenBatches("default", gemma_270m.tokenizer, seq_len=64, batch_size=4, seed=0)
    block = next(blocks)
    n = block.n_tokens
    with torch.inference_mode():
        acts = model.run(block.input_ids, read=store.sites, return_logits=False,
                         stop_after_layer=17).acts  # fmt: skip
    for site in store.sites:
        assert torch.equal(store.read_rows(site, 0, n), acts[site][block.mask]), site
