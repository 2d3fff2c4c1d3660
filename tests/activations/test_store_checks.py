"""Issue 16: a store's manifest is cross-checked against its shards, a harvest rerun over a finished
store checks what it reports, and bad harvest flags are refused before any file exists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmscope.activations.harvest import HarvestConfig, harvest
from lmscope.activations.store import ActivationStore, StoreWriter
from lmscope.cli import main
from lmscope.errors import StoreError
from lmscope.model import tiny_model


def write(url: str, n_blocks: int) -> None:
    """A small store: blocks of 2 × 12 tokens, two sites, 16-row shards."""
    g = torch.Generator().manual_seed(0)
    with StoreWriter(url, sites={"a": 3, "b": 2}, model_name="m", shard_rows=16) as w:
        for _ in range(n_blocks):
            ids, mask = (
                torch.randint(3, 50, (2, 12), generator=g),
                torch.ones(2, 12, dtype=torch.bool),
            )
            w.append(
                {"a": torch.randn(24, 3, generator=g), "b": torch.randn(24, 2, generator=g)},
                ids,
                mask,
            )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    words = (Path(__file__).read_text() * 6).split()
    docs = [" ".join(words[i : i + 60]) for i in range(0, len(words), 60)]
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def _cfg(corpus: Path, **kw: object) -> HarvestConfig:
    base: dict[str, object] = dict(model="tiny-gemma3", sites="L0.resid_post,L1.mlp_out",
                                   corpus=str(corpus), tokens=600, seq_len=32, batch_size=4,
                                   shard_rows=100)  # fmt: skip
    return HarvestConfig(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize("rows", [2500, 4000, 1])
def test_manifest_rows_that_disagree_with_the_shards_are_refused(tmp_path: Path, rows: int) -> None:
    url = str(tmp_path / "store")
    write(url, 8)
    m = json.loads((tmp_path / "store" / "manifest.json").read_text())
    held = m["rows"]
    m["rows"] = rows if rows != 1 else held + 1
    (tmp_path / "store" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match=f"says {m['rows']:,} rows but the .* shards hold {held:,}"):  # fmt: skip
        ActivationStore(url)


def test_sequence_count_is_cross_checked_too(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    write(url, 4)
    m = json.loads((tmp_path / "store" / "manifest.json").read_text())
    m["sequences"]["rows"] += 3
    (tmp_path / "store" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="sequences shards"):
        ActivationStore(url)


def test_harvest_rerun_over_a_store_with_a_wrong_manifest_fails(corpus: Path, tmp_path: Path) -> None:  # fmt: skip
    out, loaded = str(tmp_path / "s"), tiny_model("gemma3")
    harvest(_cfg(corpus), out, loaded=loaded, progress=False)
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    m["rows"] = 400
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="manifest is corrupt"):
        harvest(_cfg(corpus), out, loaded=loaded, progress=False)


def test_rerun_asking_more_tokens_of_a_complete_store_is_refused(corpus: Path, tmp_path: Path) -> None:  # fmt: skip
    out, loaded = str(tmp_path / "s"), tiny_model("gemma3")
    assert harvest(_cfg(corpus), out, loaded=loaded, progress=False).rows == 600
    assert harvest(_cfg(corpus), out, loaded=loaded, progress=False).rows == 600  # same: fine
    with pytest.raises(StoreError, match="complete with 600 tokens.*you asked 900"):
        harvest(_cfg(corpus, tokens=900), out, loaded=loaded, progress=False)


def test_rerun_over_a_complete_store_checks_every_shard(corpus: Path, tmp_path: Path) -> None:
    out, loaded = str(tmp_path / "s"), tiny_model("gemma3")
    harvest(_cfg(corpus), out, loaded=loaded, progress=False)
    shard = sorted((tmp_path / "s" / "L1.mlp_out").glob("shard-*.npy"))[-1]
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0x40
    shard.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=f"{shard.name}.*corrupt"):
        harvest(_cfg(corpus), out, loaded=loaded, progress=False)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch-size", "0"], "batch_size must be a positive"),
        (["--seq-len", "0"], "seq_len must be at least 2"),
        (["--seq-len", "1"], "seq_len must be at least 2"),
        (["--seq-len", "100000"], "beyond tiny-gemma3's context"),
        (["--tokens", "0"], "tokens must be a positive"),
        (["--tokens", str(10**12)], "GB of disk"),
        (["--shard-rows", "-1"], "shard_rows must be a positive"),
    ],
)
def test_bad_harvest_flags_leave_nothing_behind_and_the_fix_then_runs(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    out = tmp_path / "store"
    base = ["harvest", "--model", "tiny-gemma3", "--corpus", str(corpus), "--sites",
            "L0.resid_post", "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert main([*base, "--tokens", "300", "--seq-len", "32", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err
    assert not out.exists()
    assert main([*base, "--tokens", "300", "--seq-len", "32"]) == 0  # the corrected rerun
    assert ActivationStore(str(out)).rows == 300


def test_harvest_refuses_an_out_holding_other_files(corpus: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    argv = ["harvest", "--model", "tiny-gemma3", "--corpus", str(corpus), "--tokens", "300",
            "--sites", "L0.resid_post", "--device", "cpu", "--out"]  # fmt: skip
    assert main([*argv, str(tmp_path)]) == 2
    assert main([*argv, str(tmp_path / "notes.txt")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_batches_hold_a_bounded_shuffle_buffer_not_the_whole_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect 13: the default shuffle buffer was 10⁶ rows of every site, so training the quick
    build held its whole 6.6 GB store in memory. It is now bounded in bytes (at least a shard)."""
    import tracemalloc

    import lmscope.activations.store as store_mod

    url, sites = str(tmp_path / "s"), {f"L{i}.resid_post": 64 for i in range(4)}
    g = torch.Generator().manual_seed(0)
    with StoreWriter(url, sites=sites, model_name="m", shard_rows=256) as w:
        for _ in range(16):  # 16 shards of 256 rows: 4 MiB of float32 rows in all
            w.append({s: torch.randn(256, 64, generator=g) for s in sites},
                     torch.ones(1, 256, dtype=torch.long), torch.ones(1, 256, dtype=torch.bool))  # fmt: skip
    store = ActivationStore(url)
    whole = store.rows * 4 * 64 * 4
    monkeypatch.setattr(store_mod, "SHUFFLE_BYTES", whole // 8)  # two shards' worth
    tracemalloc.start()
    try:
        seen = [b["row"] for b in store.iter_batches(list(sites), 100, return_rows=True)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < whole / 2, (peak, whole)
    rows = torch.cat(seen)
    assert len(rows) == len(set(rows.tolist())) == store.rows  # still each row once per epoch
