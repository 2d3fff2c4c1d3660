"""The activation store: exact round trips, atomic shards, crash-safe resume, aligned shuffled batches.

Every test runs twice, on a local folder and on `memory://`, through the same code.
"""

import hashlib
import io
import itertools
import json
import os
import uuid
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
import numpy as np
import pytest
import torch
import xxhash

from lmscope.activations import store as store_module
from lmscope.activations.store import ActivationStore, StoreWriter
from lmscope.errors import StoreError

SITES = {"L0.resid_post": 6, "L1.mlp_out": 4}
A, B = SITES
Block = tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]


def make_blocks(n_blocks: int = 8, batch: int = 2, seq_len: int = 12, seed: int = 0) -> list[Block]:
    """Blocks as a harvester sees them; column 0 of each site holds the global row id (times 1, 2)."""
    g = torch.Generator().manual_seed(seed)
    blocks, row = [], 0
    for _ in range(n_blocks):
        ids = torch.randint(3, 100, (batch, seq_len), generator=g)
        ids[:, 0] = 1  # BOS
        mask = torch.rand(batch, seq_len, generator=g) > 0.2
        mask[:, 0] = False
        n = int(mask.sum())
        acts = {s: torch.randn(n, d, generator=g) * 3 for s, d in SITES.items()}
        for k, s in enumerate(SITES):
            acts[s][:, 0] = torch.arange(row, row + n) * (k + 1.0)
        blocks.append((acts, ids, mask))
        row += n
    return blocks


def write(url: str, blocks: list[Block], **kw: Any) -> None:
    """Write `blocks` as one uninterrupted harvest (16-row shards unless `kw` says otherwise)."""
    with StoreWriter(
        url, **{"sites": SITES, "model_name": "tiny-gemma3", "shard_rows": 16, **kw}
    ) as w:
        for block in blocks:
            w.append(*block)


def files(url: str) -> dict[str, bytes]:
    fs, root = fsspec.core.url_to_fs(url)
    return {p[len(root.rstrip("/")) + 1 :]: fs.cat_file(p) for p in fs.find(root)}


def manifest(url: str) -> dict:
    m = json.loads(files(url)["manifest.json"])
    del m["created"], m["updated"]
    return m


@pytest.fixture(params=["local", "memory"])
def new_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[Callable[[], str]]:
    made: list[str] = []

    def make() -> str:
        made.append(
            str(tmp_path / f"store{len(made)}")
            if request.param == "local"
            else f"memory://test-{uuid.uuid4().hex}"
        )
        return made[-1]

    yield make
    for url in made:
        fs, root = fsspec.core.url_to_fs(url)
        if request.param == "memory" and fs.exists(root):
            fs.rm(root, recursive=True)


@pytest.fixture
def url(new_url: Callable[[], str]) -> str:
    return new_url()


def test_float32_round_trip_is_exact_with_token_context(url: str) -> None:
    blocks = make_blocks()
    write(url, blocks)
    store = ActivationStore(url)
    assert store.complete and store.model_name == "tiny-gemma3" and store.sites == list(SITES)
    for s in SITES:
        assert torch.equal(store.read_rows(s), torch.cat([b[0][s] for b in blocks]))
    assert torch.equal(store.read_rows(A, 5, 40), store.read_rows(A)[5:40])
    assert store.read_rows(B, 7, 7).shape == (0, SITES[B])
    assert torch.equal(store.token_ids(), torch.cat([ids[mask] for _, ids, mask in blocks]))
    seqs = torch.cat([ids for _, ids, _ in blocks])
    assert torch.equal(store.sequences(), seqs)
    seq, pos = store.token_positions().T  # so every row's context window is recoverable
    assert torch.equal(seqs[seq, pos], store.token_ids())


def test_acts_may_come_unmasked_as_batch_by_position(url: str, new_url: Callable[[], str]) -> None:
    blocks = make_blocks(3)
    write(url, blocks)
    full = []
    for acts, ids, mask in blocks:
        dense = {
            s: torch.zeros(*ids.shape, d).masked_scatter(mask[..., None], a)
            for (s, d), a in zip(SITES.items(), acts.values())
        }
        full.append((dense, ids, mask))
    other = new_url()
    write(other, full)
    assert manifest(other) == manifest(url)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_round_trip_rounds_once(url: str, dtype: str) -> None:
    blocks = make_blocks(3)
    write(url, blocks, dtype=dtype)
    x = torch.cat([b[0][A] for b in blocks])
    got = ActivationStore(url).read_rows(A)
    assert got.dtype == torch.float32
    assert torch.equal(got, x.to(getattr(torch, dtype)).float())
    torch.testing.assert_close(got, x, rtol=2**-8, atol=1e-3)


def test_shards_have_fixed_rows_except_the_last(url: str) -> None:
    write(url, make_blocks(), shard_rows=16)
    m = manifest(url)
    for sec in [*m["sites"].values(), m["tokens"], m["sequences"]]:
        rows = [sh["rows"] for sh in sec["shards"]]
        size = rows[0]
        assert len(rows) > 2 and all(r == size for r in rows[:-1]) and 0 < rows[-1] <= size
    assert sum(sh["rows"] for sh in m["tokens"]["shards"]) == m["rows"]
    assert m["sequences"]["rows"] == 16


def test_manifest_checksums_every_file_and_nothing_else_is_left(url: str) -> None:
    write(url, make_blocks())
    m, on_disk = manifest(url), files(url)
    listed = {
        sh["file"]: sh["sha256"]
        for sec in [*m["sites"].values(), m["tokens"], m["sequences"]]
        for sh in sec["shards"]
    }
    assert set(on_disk) == {*listed, "manifest.json"}
    for name, digest in listed.items():
        assert hashlib.sha256(on_disk[name]).hexdigest() == digest
        np.load(io.BytesIO(on_disk[name]), allow_pickle=False)  # plain .npy, no pickles


CHECKSUM_OF = {
    "crc32": lambda b: f"{zlib.crc32(b):08x}",
    "xxh3_64": lambda b: xxhash.xxh3_64(b).hexdigest(),
}


@pytest.mark.parametrize("algo", list(CHECKSUM_OF))
def test_cheap_checksums_are_named_cover_whole_files_and_catch_corruption(
    url: str, new_url: Callable[[], str], algo: str
) -> None:
    blocks = make_blocks()
    write(url, blocks, checksum=algo)
    m, on_disk = manifest(url), files(url)
    shards = [
        sh for sec in [*m["sites"].values(), m["tokens"], m["sequences"]] for sh in sec["shards"]
    ]
    assert shards and all(set(sh) == {"file", "rows", algo} for sh in shards)
    for sh in shards:
        assert CHECKSUM_OF[algo](on_disk[sh["file"]]) == sh[algo]
    reference = new_url()
    write(reference, blocks)  # a sha256 store: the same shard bytes, other manifest checksums
    assert {k: v for k, v in files(reference).items() if k != "manifest.json"} == {
        k: v for k, v in on_disk.items() if k != "manifest.json"
    }
    fs, root = fsspec.core.url_to_fs(url)
    path = f"{root}/{A}/shard-000001.npy"
    data = bytearray(fs.cat_file(path))
    data[-3] ^= 0xFF
    fs.pipe_file(path, bytes(data))
    with pytest.raises(StoreError, match=f"{A}/shard-000001.npy .*corrupt \\({algo}"):
        ActivationStore(url).read_rows(A)


def test_caller_may_reuse_its_tensors_after_append(url: str) -> None:
    blocks = make_blocks(3)
    expected = {s: torch.cat([b[0][s] for b in blocks]) for s in SITES}
    with StoreWriter(url, sites=SITES, model_name="tiny-gemma3", shard_rows=16) as w:
        for acts, ids, mask in blocks:
            w.append(acts, ids, mask)
            for a in acts.values():
                a.zero_()
    store = ActivationStore(url)
    for s in SITES:
        assert torch.equal(store.read_rows(s), expected[s])


def test_corrupt_shard_byte_names_the_shard(url: str) -> None:
    write(url, make_blocks())
    store = ActivationStore(url)
    store.read_rows(A)  # verified once; a later change of the file is still caught
    fs, root = fsspec.core.url_to_fs(url)
    path = f"{root}/{A}/shard-000001.npy"
    data = bytearray(fs.cat_file(path))
    data[-3] ^= 0xFF
    fs.pipe_file(path, bytes(data))
    with pytest.raises(StoreError, match=f"{A}/shard-000001.npy .*corrupt"):
        store.read_rows(A)
    with pytest.raises(StoreError, match="corrupt"):
        list(store.iter_batches([A], 8))
    store.read_rows(B)  # other sites are intact
    assert len(list(store.iter_batches([A], 8, verify=False))) > 0  # the check can be skipped


def test_truncated_shard_is_a_store_error(url: str) -> None:
    write(url, make_blocks())
    fs, root = fsspec.core.url_to_fs(url)
    path = f"{root}/{B}/shard-000000.npy"
    fs.pipe_file(path, fs.cat_file(path)[:100])
    with pytest.raises(StoreError, match="shard-000000.npy .*unreadable"):
        ActivationStore(url).read_rows(B)
    fs.rm_file(path)
    with pytest.raises(StoreError, match="shard-000000.npy .*missing"):
        ActivationStore(url).read_rows(B)


@pytest.mark.parametrize("crash", ["abandoned", "manifest_write_fails"])
def test_resume_after_crash_equals_uninterrupted(
    url: str, new_url: Callable[[], str], crash: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocks = make_blocks()
    reference = new_url()
    write(reference, blocks)
    if crash == "abandoned":  # a process killed between appends: nothing runs after the last append
        w = StoreWriter(url, sites=SITES, model_name="tiny-gemma3", shard_rows=16)
        for block in blocks[:5]:
            w.append(*block)
        del w
    else:  # killed inside a commit: this group's shards are written but the manifest never learns of them
        from lmscope.activations import store as store_module

        put, calls = store_module.put_whole, itertools.count()

        def failing_put(fs: object, path: str, chunks: bytes) -> None:
            if path.endswith("manifest.json") and next(calls) == 4:
                raise KeyboardInterrupt
            put(fs, path, chunks)

        monkeypatch.setattr(store_module, "put_whole", failing_put)
        with pytest.raises(KeyboardInterrupt):
            write(url, blocks)
        monkeypatch.undo()
        listed = json.dumps(json.loads(files(url)["manifest.json"]))
        orphans = [f for f in files(url) if f != "manifest.json" and f not in listed]
        assert orphans  # shards on disk that the manifest does not list
    fs, root = fsspec.core.url_to_fs(url)
    fs.pipe_file(f"{root}/{A}/shard-000002.npy.tmp-dead", b"half a shard")
    w = StoreWriter(url, sites=SITES, model_name="tiny-gemma3", shard_rows=16, resume=True)
    done = w.blocks_done
    assert 0 < done < len(blocks) and not w.complete
    rows_before = sum(int(mask.sum()) for _, _, mask in blocks[:done])
    # Shards and blocks need not align: part of the next block is stored already, and skipped.
    assert w.rows_committed > rows_before
    for block in blocks[done:]:
        w.append(*block)
    w.close()
    assert files(url).keys() == files(reference).keys()
    assert manifest(url) == manifest(reference)
    assert torch.equal(ActivationStore(url).read_rows(A), ActivationStore(reference).read_rows(A))


def test_resume_rejects_input_other_than_what_is_stored(url: str) -> None:
    blocks = make_blocks()
    w = StoreWriter(url, sites=SITES, model_name="tiny-gemma3", shard_rows=16)
    for block in blocks[:5]:
        w.append(*block)
    w = StoreWriter(url, sites=SITES, model_name="tiny-gemma3", shard_rows=16, resume=True)
    with pytest.raises(StoreError, match=f"from block {w.blocks_done} on"):
        w.append(*blocks[w.blocks_done + 1])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_name": "gpt2"}, "written by model tiny-gemma3, not gpt2"),
        ({"dtype": "bfloat16"}, "holds dtype float32, not bfloat16"),
        ({"sites": {A: 6}}, "holds sites"),
        ({"shard_rows": 32}, "shard_rows 16, not 32"),
        ({"meta": {"seed": 1}}, "meta seed=0, not 1"),
    ],
)
def test_resume_rejects_a_different_store(url: str, change: dict, message: str) -> None:
    w = StoreWriter(url, sites=SITES, model_name="tiny-gemma3", shard_rows=16, meta={"seed": 0})
    w.append(*make_blocks(1)[0])
    kw = {
        "sites": SITES,
        "model_name": "tiny-gemma3",
        "shard_rows": 16,
        "meta": {"seed": 0},
        **change,
    }
    with pytest.raises(StoreError, match=message):
        StoreWriter(url, resume=True, **kw)  # type: ignore[arg-type]


def test_existing_store_needs_resume_and_complete_store_takes_no_more(url: str) -> None:
    blocks = make_blocks(2)
    write(url, blocks)
    with pytest.raises(StoreError, match="resume=True"):
        StoreWriter(url, sites=SITES, model_name="tiny-gemma3", shard_rows=16)
    w = StoreWriter(url, sites=SITES, model_name="tiny-gemma3", shard_rows=16, resume=True)
    assert w.complete and w.blocks_done == 2
    with pytest.raises(StoreError, match="complete"):
        w.append(*blocks[0])


def ids_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return batch[A][:, 0].long()


@pytest.mark.parametrize("shuffle_buffer", [20, 1_000_000])
def test_batches_hold_every_row_once_per_epoch_aligned_across_sites(
    url: str, shuffle_buffer: int
) -> None:
    write(url, make_blocks())
    store = ActivationStore(url)
    batches = list(
        store.iter_batches([A, B], 7, seed=3, shuffle_buffer=shuffle_buffer, return_rows=True)
    )
    assert all(len(ids_of(b)) == 7 for b in batches[:-1]) and 0 < len(ids_of(batches[-1])) <= 7
    ids = torch.cat([ids_of(b) for b in batches])
    assert torch.equal(ids.sort().values, torch.arange(store.rows))
    assert not torch.equal(ids, torch.arange(store.rows))
    for b in batches:
        assert torch.equal(b[B][:, 0], 2 * b[A][:, 0]) and torch.equal(b["row"], ids_of(b))


def test_batches_are_deterministic_per_seed(url: str) -> None:
    write(url, make_blocks())
    store = ActivationStore(url)

    def run(seed: int) -> list[torch.Tensor]:
        return [ids_of(b) for b in store.iter_batches([A], 8, seed=seed, shuffle_buffer=30)]

    assert all(torch.equal(x, y) for x, y in zip(run(1), run(1), strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(run(1), run(2), strict=True))


@pytest.mark.parametrize("loop", [False, True])
def test_start_batch_k_equals_skipping_k_batches(url: str, loop: bool) -> None:
    write(url, make_blocks(), dtype="bfloat16")
    store = ActivationStore(url)
    full = list(
        itertools.islice(store.iter_batches([A, B], 8, seed=5, shuffle_buffer=30, loop=loop), 66)
    )
    for k in [1, 4, 9, 17, *([25, 41, 60] if loop else [])]:
        resumed = list(
            itertools.islice(
                store.iter_batches([A, B], 8, seed=5, shuffle_buffer=30, loop=loop, start_batch=k),
                6,
            )
        )
        assert len(resumed) == len(full[k : k + 6])
        for x, y in zip(resumed, full[k:]):
            assert torch.equal(x[A], y[A]) and torch.equal(x[B], y[B])


def test_loop_keeps_batches_full_and_epochs_balanced(url: str) -> None:
    write(url, make_blocks())
    store = ActivationStore(url)
    n = int(2.5 * store.rows) // 8
    batches = list(itertools.islice(store.iter_batches([A], 8, loop=True, return_rows=True), n))
    assert all(len(b["row"]) == 8 for b in batches)
    counts = torch.bincount(torch.cat([b["row"] for b in batches]), minlength=store.rows)
    assert counts.min() >= 2 and counts.max() <= 3


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mean_sq_norm_and_mean_match_direct_computation(url: str, dtype: str) -> None:
    write(url, make_blocks(), dtype=dtype)
    store = ActivationStore(url)
    for s in SITES:
        x = store.read_rows(s).double()
        # Each row's ‖x‖² is summed in float32 (d terms), the rows in float64.
        assert store.mean_sq_norm(s) == pytest.approx(float(x.square().sum(1).mean()), rel=1e-6)
        torch.testing.assert_close(store.mean(s), x.mean(0).float())


def test_bad_requests_are_clear_store_errors(url: str) -> None:
    with pytest.raises(StoreError, match="no activation store at"):
        ActivationStore(url)
    with pytest.raises(StoreError, match="choose one of float32, float16, bfloat16"):
        StoreWriter(url, sites=SITES, model_name="m", dtype="int8")
    write(url, make_blocks(1))
    store = ActivationStore(url)
    with pytest.raises(StoreError, match=f"unknown site 'L9.attn_z'.*available: {A}, {B}"):
        store.iter_batches(["L9.attn_z"], 8)
    with pytest.raises(StoreError, match="outside"):
        store.read_rows(A, 0, store.rows + 1)


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "page_cache"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_local_shards_are_page_aligned_npy_files_of_the_masked_rows(
    tmp_path, monkeypatch: pytest.MonkeyPatch, direct: bool, dtype: str
) -> None:
    """Rows of an odd width straddle page boundaries block after block; masking happens as rows are
    gathered into the page-aligned buffer. With or without O_DIRECT the shards are plain .npy files
    whose rows start at byte 4096 and equal the masked input exactly."""
    opened: list[bool] = []
    real_open = store_module._open_direct

    def open_direct(path: str) -> tuple[int, bool]:
        fd, is_direct = real_open(path)
        if not direct and is_direct:  # the fallback path, as on a filesystem without O_DIRECT
            store_module.fcntl.fcntl(fd, store_module.fcntl.F_SETFL, os.O_WRONLY)
            is_direct = False
        opened.append(is_direct)
        return fd, is_direct

    monkeypatch.setattr(store_module, "_open_direct", open_direct)
    g = torch.Generator().manual_seed(1)
    sites = {"odd": 77, "wide": 1029}
    url, blocks = str(tmp_path / "s"), []
    for _ in range(5):
        ids = torch.randint(3, 100, (3, 40), generator=g)
        mask = torch.rand(3, 40, generator=g) > 0.3
        acts = {s: torch.randn(3, 40, d, generator=g) for s, d in sites.items()}  # [B, T, d]
        blocks.append((acts, ids, mask))
    with StoreWriter(url, sites=sites, model_name="m", shard_rows=150, dtype=dtype,
                     checksum="xxh3_64") as w:  # fmt: skip
        for block in blocks:
            w.append(*block)
    if direct and not any(opened):
        pytest.skip("this filesystem does not take O_DIRECT")
    assert opened and all(o == direct for o in opened)
    store = ActivationStore(url)
    for s in sites:
        want = torch.cat([a[s][m] for a, _, m in blocks])
        if dtype == "bfloat16":
            want = want.bfloat16().float()
        assert torch.equal(store.read_rows(s), want)
        for sh in store._m["sites"][s]["shards"]:
            raw = (tmp_path / "s" / sh["file"]).read_bytes()
            arr = np.load(io.BytesIO(raw), allow_pickle=False)
            assert len(arr) == sh["rows"] and len(raw) == 4096 + arr.nbytes
            assert raw[4096:] == arr.tobytes()
            assert xxhash.xxh3_64(raw).hexdigest() == sh["xxh3_64"]


@pytest.mark.parametrize("hint", ["exact", "too_few", "too_many"])
def test_expect_rows_plans_the_last_shard_without_changing_the_store(
    url: str, new_url: Callable[[], str], hint: str
) -> None:
    """A writer told how many rows are coming writes the short last shard with its final header
    from the start (no read-back); a wrong hint must still give the same files."""
    blocks = make_blocks()
    total = sum(int(m.sum()) for _, _, m in blocks)
    assert total % 16, "the test needs a short last shard"
    expect = {"exact": total, "too_few": total - 20, "too_many": total + 5}[hint]
    write(url, blocks, expect_rows=expect)
    reference = new_url()
    write(reference, blocks)
    if hint == "too_few":  # a shard is cut short where the hint said the store ends
        assert ActivationStore(url).rows == total
        assert torch.equal(
            ActivationStore(url).read_rows(A), ActivationStore(reference).read_rows(A)
        )
        return
    assert {k: v for k, v in files(url).items() if k != "manifest.json"} == {
        k: v for k, v in files(reference).items() if k != "manifest.json"
    }
