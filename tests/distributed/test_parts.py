"""The pieces of scale-out that need no second process: planning, merging parts, remote suites."""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import pytest
import torch

from lmscope.activations.harvest import HarvestConfig, harvest
from lmscope.activations.store import ActivationStore
from lmscope.distributed import (
    DistributedError,
    Ranks,
    RemoteError,
    count_blocks,
    fetch_suite,
    merge_parts,
    plan_suite,
    publish_suite,
    split_range,
)
from lmscope.distributed.harvest import harvest_parts, part_url
from lmscope.errors import ConfigError, StoreError
from lmscope.model import tiny_model
from lmscope.train import SAESpec


def spec(site: str = "L0.resid_post", width: int = 32, **kw: object) -> SAESpec:
    return SAESpec(site, width, **({"target_l0": 4} | kw))  # type: ignore[arg-type]


def test_plan_gives_every_sae_to_exactly_one_group_and_balances_width() -> None:
    specs = [spec(f"L{i}.resid_post", w) for i, w in enumerate([4096, 1024, 1024, 1024, 1024])]
    plan = plan_suite(specs, 2)
    assert [g.ranks for g in plan] == [(0,), (1,)]
    assert sorted(s.folder for g in plan for s in g.specs) == sorted(s.folder for s in specs)
    assert [sum(s.width for s in g.specs) for g in plan] == [4096, 4096]
    assert plan == plan_suite(specs, 2)  # every rank plans alike


def test_plan_uses_ddp_groups_when_saes_are_fewer_than_ranks() -> None:
    assert [g.ranks for g in plan_suite([spec()], 4)] == [(0, 1, 2, 3)]
    three = [spec(f"L{i}.resid_post") for i in range(3)]
    assert [g.ranks for g in plan_suite(three, 4)] == [(0, 1), (2, 3)]
    assert [len(g.specs) for g in plan_suite(three, 4, ranks_per_sae=1)] == [1, 1, 1, 0]


def test_plan_refuses_batchtopk_ddp_and_group_sizes_that_do_not_divide() -> None:
    with pytest.raises(ConfigError, match="batchtopk"):
        plan_suite([spec(architecture="batchtopk", k=4, target_l0=None)], 2)
    with pytest.raises(ConfigError, match="divide"):
        plan_suite([spec()], 3, ranks_per_sae=2)


def test_split_range_covers_every_block_once_in_order() -> None:
    assert split_range(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert split_range(2, 2) == [(0, 1), (1, 2)]


@pytest.fixture(scope="module")
def corpus(shared_text_corpus: Path) -> Path:
    return shared_text_corpus


def _cfg(corpus: Path) -> HarvestConfig:
    return HarvestConfig(model="tiny-gemma3", sites="L0.resid_post,L1.mlp_out", corpus=str(corpus),
                         tokens=700, seq_len=32, batch_size=4, shard_rows=64)  # fmt: skip


@pytest.mark.parametrize("where", ["local", "memory"])
def test_parts_harvested_apart_and_merged_equal_one_harvest(
    corpus: Path, tmp_path: Path, where: str
) -> None:
    root = str(tmp_path) if where == "local" else f"memory://parts-{uuid.uuid4().hex}"
    loaded, cfg = tiny_model("gemma3"), _cfg(corpus)
    one = harvest(cfg, f"{root}/one", loaded=loaded, progress=False)
    n = count_blocks(cfg, loaded)
    parts = [part_url(f"{root}/three", r) for r in range(3)]
    for url, blocks in zip(parts, split_range(n, 3)):
        harvest(cfg, url, loaded=loaded, progress=False, block_range=blocks)
    merge_parts(f"{root}/three", parts)
    three = ActivationStore(f"{root}/three")
    assert three.rows == one.rows == 700 and three.meta == one.meta and three.complete
    for site in one.sites:
        assert torch.equal(three.read_rows(site, 100, 650), one.read_rows(site, 100, 650))
    assert torch.equal(three.token_positions(), one.token_positions())
    assert torch.equal(three.sequences(), one.sequences())
    batches = [b["L1.mlp_out"] for b in three.iter_batches(["L1.mlp_out"], 128, seed=1)]
    assert torch.cat(batches).shape == (700, one.d("L1.mlp_out"))


def test_merge_refuses_incomplete_missing_or_mismatched_parts(corpus: Path, tmp_path: Path) -> None:
    loaded, cfg = tiny_model("gemma3"), _cfg(corpus)
    n = count_blocks(cfg, loaded)
    a, b = part_url(str(tmp_path), 0), part_url(str(tmp_path), 1)
    harvest(cfg, a, loaded=loaded, progress=False, block_range=(0, n // 2))
    with pytest.raises(StoreError, match="never started"):
        merge_parts(str(tmp_path), [a, b])
    harvest(cfg, b, loaded=loaded, progress=False, block_range=(n // 2, n), max_blocks=1)
    with pytest.raises(StoreError, match="incomplete"):
        merge_parts(str(tmp_path), [a, b])
    with pytest.raises(StoreError, match="not the next ones"):
        merge_parts(str(tmp_path), [a, a])
    assert not (tmp_path / "manifest.json").exists()  # nothing committed


def test_memory_stores_are_refused_for_several_ranks(corpus: Path) -> None:
    with pytest.raises(DistributedError, match="memory://"):
        harvest_parts(_cfg(corpus), "memory://x", Ranks(0, 2, 0))


def test_ranks_come_from_torchrun_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert Ranks.from_env() == Ranks(3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(DistributedError, match="outside"):
        Ranks.from_env()


def _suite(tmp_path: Path) -> Path:
    """A small finished suite folder: two SAE folders and a manifest, as train + record write."""
    from lmscope.sae import SAEConfig, build_sae, save_sae
    from lmscope.suite import record_training

    out = tmp_path / "suite"
    folders = []
    for layer in (0, 1):
        cfg = SAEConfig(
            "jumprelu", d_in=8, d_sae=16, site=f"L{layer}.resid_post", model="tiny-gemma3"
        )
        folders.append(save_sae(build_sae(cfg), out / f"L{layer}.resid_post-w16"))
        (folders[-1] / "train_log.jsonl").write_text('{"step": 1}\n')
    (out / ".checkpoints").mkdir()
    (out / ".checkpoints" / "junk").write_text("not published")
    record_training(out, folders, model="tiny-gemma3")
    return out


def test_published_suite_fetches_back_identical_and_checksummed(tmp_path: Path) -> None:
    local, url = _suite(tmp_path), f"memory://suite-{uuid.uuid4().hex}"
    m = publish_suite(local, url)
    assert set(m["files"]) == {f"L{i}.resid_post-w16/{n}" for i in (0, 1)
                               for n in ("config.json", "weights.safetensors", "train_log.jsonl")}  # fmt: skip
    back = fetch_suite(url, tmp_path / "back")
    for rel in m["files"]:
        assert (back / rel).read_bytes() == (local / rel).read_bytes()
    assert not (back / ".checkpoints").exists()
    from lmscope.suite import Suite

    assert len(Suite.open(back).manifest["saes"]) == 2


def test_fetch_refuses_a_corrupt_or_unpublished_suite(tmp_path: Path) -> None:
    local, url = _suite(tmp_path), f"memory://suite-{uuid.uuid4().hex}"
    with pytest.raises(RemoteError, match="no published suite"):
        fetch_suite(url, tmp_path / "back")
    publish_suite(local, url)
    fs, root = fsspec.core.url_to_fs(url)
    fs.pipe_file(f"{root}/L1.resid_post-w16/weights.safetensors", b"torn")
    with pytest.raises(RemoteError, match="sha256"):
        fetch_suite(url, tmp_path / "back")
    assert not (tmp_path / "back").exists()  # nothing half-fetched is left


def test_train_cli_publishes_a_suite_to_a_url(corpus: Path, tmp_path: Path) -> None:
    from lmscope.cli import main

    acts, url = str(tmp_path / "acts"), f"memory://suite-{uuid.uuid4().hex}"
    harvest(_cfg(corpus), acts, progress=False)
    args = ["train", "--store", acts, "--sites", "L0.resid_post", "--widths", "16", "--l0", "4",
            "--tokens", "640", "--batch-size", "64", "--out", url,
            "--work-dir", str(tmp_path / "work")]  # fmt: skip
    assert main(args) == 0
    back = fetch_suite(url, tmp_path / "back")
    assert (back / "L0.resid_post-w16-l04" / "weights.safetensors").is_file()
    assert (back / "L0.resid_post-w16-l04" / "train_log.jsonl").read_text()
