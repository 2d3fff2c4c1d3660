"""2 ranks on CPU (gloo, loopback) give what one process gives: the same store, the same SAEs.

One module-scoped launch runs every 2-rank scenario (spawning ranks costs seconds of imports);
each test then checks one property against a single-process run of the same job.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from ranks import launch

from lmscope.activations.harvest import HarvestConfig, harvest
from lmscope.activations.store import ActivationStore
from lmscope.distributed import Ranks, harvest_parts, train_parts
from lmscope.sae import load_sae
from lmscope.train import SAESpec, TrainConfig, store_data, train_suite

SITES = "L0.resid_post,L1.resid_post,L1.mlp_out"
SPLIT = [  # three SAEs over two ranks: each rank trains its own
    SAESpec("L0.resid_post", 32, target_l0=4),
    SAESpec("L1.resid_post", 32, target_l0=4),
    SAESpec("L1.resid_post", 48, architecture="topk", k=4),
]
DDP = [  # both trained by both ranks, each on half of every batch (fast JumpReLU path and autograd)
    SAESpec("L1.resid_post", 64, target_l0=6),
    SAESpec("L1.mlp_out", 32, architecture="topk", k=4),
]


def harvest_cfg(corpus: Path) -> HarvestConfig:
    return HarvestConfig(model="tiny-gemma3", sites=SITES, corpus=str(corpus), tokens=1500,
                         seq_len=32, batch_size=4, shard_rows=128)  # fmt: skip


def train_cfg(batch_size: int) -> TrainConfig:
    return TrainConfig(total_tokens=batch_size * 24, batch_size=batch_size, lr=1e-3,
                       lr_warmup_steps=4, lambda_warmup_steps=4, norm_batches=4,
                       progress=False, log_every=8, checkpoint_every=0)  # fmt: skip


def store_factory(url: str, batch_size: int) -> Any:
    store = ActivationStore(url)
    return lambda sites: store_data(store, sites, batch_size, seed=3)


def scenarios(ranks: Ranks, root: str, corpus: str) -> None:
    """What every rank runs: a harvest, a split suite and a data-parallel pair of SAEs."""
    d = Path(root)
    harvest_parts(harvest_cfg(Path(corpus)), str(d / "acts2"), ranks, progress=False)
    ref = str(d / "acts1")  # the single-process store, so training data is the same
    train_parts(SPLIT, store_factory(ref, 64), train_cfg(64), d / "split2", ranks)
    train_parts(DDP, store_factory(ref, 63), train_cfg(63), d / "ddp2", ranks, ranks_per_sae=2)
    (d / "grads").mkdir(exist_ok=True)
    gradient_check(ranks, str(d / "grads"))


@pytest.fixture(scope="module")
def corpus(shared_text_corpus: Path) -> Path:
    return shared_text_corpus


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    d = tmp_path_factory.mktemp("scaleout")
    harvest(harvest_cfg(corpus), str(d / "acts1"), progress=False)
    launch(scenarios, 2, str(d), str(corpus))
    return d


def test_two_rank_harvest_equals_one_rank_harvest(runs: Path) -> None:
    one, two = ActivationStore(str(runs / "acts1")), ActivationStore(str(runs / "acts2"))
    assert two.complete and two.rows == one.rows == 1500 and two.sites == one.sites
    assert two.meta == one.meta
    # The same rows in the same order, so certainly the same set of rows; contexts agree too.
    for site in one.sites:
        assert torch.equal(one.read_rows(site), two.read_rows(site)), site
        assert two.mean_sq_norm(site) == pytest.approx(one.mean_sq_norm(site), rel=1e-12)
        torch.testing.assert_close(two.mean(site), one.mean(site))
    assert torch.equal(one.token_ids(), two.token_ids())
    assert torch.equal(one.token_positions(), two.token_positions())
    assert torch.equal(one.sequences(), two.sequences())


def test_each_rank_wrote_disjoint_shards_listed_by_one_manifest(runs: Path) -> None:
    m = json.loads((runs / "acts2" / "manifest.json").read_text())
    files = [sh["file"] for sec in m["sites"].values() for sh in sec["shards"]]
    by_rank = {p: {f for f in files if f.startswith(p + "/")} for p in m["parts"]}
    assert m["parts"] == ["parts/rank-00000", "parts/rank-00001"]
    assert all(by_rank.values()) and sum(map(len, by_rank.values())) == len(set(files))
    store = ActivationStore(str(runs / "acts2"))  # every listed shard passes its checksum
    rows = sum(len(b[SITES.split(",")[0]]) for b in store.iter_batches(SITES.split(","), 100))
    assert rows == store.rows


def _assert_same_saes(a: Path, b: Path, specs: list[SAESpec], **tol: float) -> None:
    """Every SAE of `specs` in folders `a` and `b`: equal weights (within `tol` if given)."""
    for s in specs:
        x, y = load_sae(a / s.folder), load_sae(b / s.folder)
        for (name, p), q in zip(x.state_dict().items(), y.state_dict().values()):
            where = f"{s.folder} {name}"
            if tol:
                err = float((p - q).abs().max())
                assert torch.allclose(p, q, **tol), f"{where}: max error {err:.3g}"
            else:
                assert torch.equal(p, q), where


def test_suite_split_over_two_ranks_gives_each_sae_its_single_process_weights(
    runs: Path, tmp_path: Path
) -> None:
    one = tmp_path / "split1"
    train_suite(SPLIT, store_factory(str(runs / "acts1"), 64)(SITES.split(",")), train_cfg(64), one)
    _assert_same_saes(one, runs / "split2", SPLIT)
    for s in SPLIT:  # logs came along with the folder; the per-rank work folders are gone
        assert (runs / "split2" / s.folder / "train_log.jsonl").read_text()
    assert not (runs / "split2" / ".ranks").exists()


def test_ddp_over_two_ranks_matches_one_rank_on_the_same_global_batches(
    runs: Path, tmp_path: Path
) -> None:
    one = tmp_path / "ddp1"
    train_suite(DDP, store_factory(str(runs / "acts1"), 63)(SITES.split(",")), train_cfg(63), one)
    _assert_same_saes(one, runs / "ddp2", DDP, rtol=1e-4, atol=1e-5)
    # ... yet not bit-identical: the ranks really summed half-batch gradients in another order
    w1, w2 = (load_sae(d / DDP[0].folder).W_enc for d in (one, runs / "ddp2"))
    assert not torch.equal(w1, w2)
    for s in DDP:  # the logged (all-reduced) metrics are the global batch's
        a = [json.loads(x) for x in (one / s.folder / "train_log.jsonl").read_text().splitlines()]
        b = [json.loads(x) for x in (runs / "ddp2" / s.folder / "train_log.jsonl").read_text().splitlines()]  # fmt: skip
        assert [r["step"] for r in a] == [r["step"] for r in b]
        for ra, rb in zip(a, b):
            assert rb["l0"] == pytest.approx(ra["l0"], rel=1e-4)
            assert rb["mse"] == pytest.approx(ra["mse"], rel=1e-3)
            assert rb["dead"] == ra["dead"]


def gradient_check(ranks: Ranks, out: str) -> None:
    """Each rank's half-batch gradients, all-reduced, against the full batch's (fast kernel)."""
    import torch.distributed as dist

    from lmscope.distributed import DataParallel
    from lmscope.train.kernels import jumprelu_step_grads

    g = torch.Generator().manual_seed(0)
    W_enc, W_dec = torch.randn(16, 64, generator=g) / 4, torch.randn(64, 16, generator=g) / 4
    b_enc, b_dec, theta = torch.zeros(64), torch.zeros(16), torch.full((64,), 0.2)
    params = [W_enc, b_enc, W_dec, b_dec, theta]
    x = torch.randn(75, 16, generator=g)  # odd: the ranks get 37 and 38 rows
    full = jumprelu_step_grads(*params, x, lam=0.1).grads()
    sync = DataParallel(dist.group.WORLD, ranks.rank, ranks.world)
    part = sync.batch({"x": x})["x"]
    half = jumprelu_step_grads(*params, part, lam=0.1).grads()
    for p, grad in zip(params, half.values()):
        p.grad = grad.clone()
    sync.grads(params)
    err = max(float((p.grad - f).abs().max()) for p, f in zip(params, full.values()))  # type: ignore[operator]
    own = max(float((h - f).abs().max()) for h, f in zip(half.values(), full.values()))
    Path(out, f"rank{ranks.rank}.json").write_text(json.dumps([len(part), err, own]))


def test_all_reduced_half_batch_gradients_are_the_full_batch_gradients(runs: Path) -> None:
    got = [json.loads((runs / "grads" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [rows for rows, _, _ in got] == [37, 38]
    for _, err, own in got:
        assert err < 1e-5 < own  # each half alone is far off; together they are the full batch
