"""`torchrun --nproc-per-node 2 -m lmscope harvest|train` with the single-process flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ranks import free_port

from lmscope.activations.store import ActivationStore
from lmscope.suite import Suite


def torchrun(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "lmscope", "--threads", "1", *args]  # fmt: skip
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_torchrun_harvest_then_train_a_suite(tmp_path: Path) -> None:
    words = (Path(__file__).read_text() * 6).split()
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(words[i : i + 40])}) + "\n"
                              for i in range(0, len(words), 40)))  # fmt: skip
    acts, suite = tmp_path / "acts", tmp_path / "suite"
    torchrun("harvest", "--model", "tiny-gemma3", "--sites", "L0-1.resid_post",
             "--corpus", str(corpus), "--tokens", "600", "--seq-len", "32", "--batch-size", "4",
             "--shard-rows", "64", "--out", str(acts))  # fmt: skip
    store = ActivationStore(str(acts))
    assert store.complete and store.rows == 600
    assert json.loads((acts / "manifest.json").read_text())["parts"] == [
        "parts/rank-00000", "parts/rank-00001"
    ]  # fmt: skip
    out = torchrun("train", "--store", str(acts), "--sites", "L0-1.resid_post", "--widths", "32",
                   "--l0", "4", "--tokens", "640", "--batch-size", "64", "--out", str(suite))  # fmt: skip
    names = sorted(e["name"] for e in Suite.open(suite).manifest["saes"])
    assert names == ["L0.resid_post-w32-l04", "L1.resid_post-w32-l04"]
    assert out.stdout.count("L0.resid_post-w32-l04") == 1  # only rank 0 reports
    assert not (suite / ".ranks").exists()
