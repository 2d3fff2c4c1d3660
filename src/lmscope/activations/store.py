"""Sharded activation store: the harvester writes it once, trainers and evals read it many times.

Layout, manifest fields and the crash/resume guarantee: docs/formats.md, "Activation store".
Everything goes through fsspec, so a URL may be a local path, `memory://` (tests) or an object store.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import json
import os
import uuid
import zlib
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import IO, Any

import fsspec
import numpy as np
import torch
import xxhash
from fsspec.implementations.local import LocalFileSystem

from lmscope.atomic import put_whole
from lmscope.errors import StoreError

FORMAT, VERSION = "lmscope.activations", 1
# numpy has no bfloat16: bf16 shards hold the raw bit patterns as uint16 (the top half of a float32).
DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")
}  # fmt: skip
TOKENS, SEQUENCES, ROW = "tokens", "sequences", "row"
_RESERVED = {TOKENS, SEQUENCES, ROW, "manifest.json"}
Shard = dict[str, Any]  # {"file": path relative to the root, "rows": int, "<checksum>": hex digest}
CHECKSUMS = ("sha256", "crc32", "xxh3_64")  # sha256 is the default; xxh3_64 is ~50x cheaper
# What `iter_batches` may hold in its shuffle buffer by default. It was 10⁶ rows whatever the sites:
# the quick build's 54 sites then held its whole 6.6 GB store in memory while training.
SHUFFLE_BYTES = 1 << 29


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _to_numpy(x: torch.Tensor, dtype: str) -> np.ndarray:
    """In the stored dtype; may share memory with `x`."""
    x = x.detach().to("cpu", getattr(torch, dtype)).contiguous()
    return x.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else x.numpy()


def _to_torch(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored rows → float32 tensor: zero-copy for float32; numpy converts the others (exactly,
    and faster than torch on a busy CPU)."""
    if dtype == "bfloat16":  # a bfloat16 is the top half of a float32
        a = (a.astype(np.uint32) << 16).view(np.float32)
    return torch.from_numpy(a.astype(np.float32, copy=False))


class _Crc32:
    """hashlib-style running crc32 (zlib releases the GIL on large buffers, like hashlib)."""

    def __init__(self) -> None:
        self._v = 0

    def update(self, data: bytes | memoryview) -> None:
        self._v = zlib.crc32(data, self._v)

    def hexdigest(self) -> str:
        return f"{self._v:08x}"


def _hasher(checksum: str) -> Any:
    if checksum == "xxh3_64":
        return xxhash.xxh3_64()
    return _Crc32() if checksum == "crc32" else hashlib.sha256()


# Shard files begin with an .npy header padded to one 4 KiB page, so their rows start page-aligned
# and can be written with O_DIRECT: the disk reads them straight from our buffer, which spares the
# CPU the copy into the page cache and the writeback (~1.3 CPU-s per GB here, more than the crc).
ALIGN = 4096


def _npy_header(dtype: np.dtype[Any], shape: tuple[int, ...]) -> bytes:
    """A version 1.0 .npy header of exactly ALIGN bytes (numpy pads headers with spaces too)."""
    body = repr({"descr": dtype.str, "fortran_order": False, "shape": shape}).encode("latin1")
    size = ALIGN - 10  # after the magic string, version and the header length itself
    return b"\x93NUMPY\x01\x00" + size.to_bytes(2, "little") + body.ljust(size - 1) + b"\n"


class _Staging:
    """A page-aligned byte buffer, reused shard after shard for one stream: rows are gathered into
    it, and every whole page of it goes to disk, the tail waiting for the next rows."""

    def __init__(self) -> None:
        self._raw = np.empty(0, np.uint8)
        self.buf = self._raw

    def reserve(self, nbytes: int) -> np.ndarray:
        if len(self.buf) < nbytes:
            keep = self.buf
            self._raw = np.empty(nbytes + nbytes // 4 + 2 * ALIGN, np.uint8)
            skip = -self._raw.ctypes.data % ALIGN
            self.buf = self._raw[skip : skip + len(self._raw) - 2 * ALIGN]
            self.buf[: len(keep)] = keep
        return self.buf


def _open_direct(path: str) -> tuple[int, bool]:
    """A new file for writing, with O_DIRECT where the OS and filesystem take it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        try:
            return os.open(path, flags | direct, 0o644), True
        except OSError as e:
            if e.errno != errno.EINVAL:  # e.g. tmpfs refuses O_DIRECT: write through the cache
                raise
    return os.open(path, flags, 0o644), False


def _stats(rows: np.ndarray, dtype: str) -> tuple[float, np.ndarray]:
    """(Σ‖x‖², Σx) of stored rows in float64. Squared norms are summed per row in float32 (at most
    a few thousand terms each), which costs a fraction of casting every value to float64."""
    x = _to_torch(rows, dtype).numpy()
    sq = float(np.einsum("ij,ij->i", x, x).sum(dtype=np.float64))
    return sq, x.sum(0, dtype=np.float64)


class _Rows:
    """Rows `src[idx]` (all of `src` when `idx` is None), not gathered yet: the shard file gathers
    them straight into its staging buffer, so masking costs no extra copy."""

    __slots__ = ("src", "idx")

    def __init__(self, src: np.ndarray, idx: np.ndarray | None = None) -> None:
        self.src, self.idx = src, idx

    def __len__(self) -> int:
        return len(self.src) if self.idx is None else len(self.idx)

    def __getitem__(self, part: slice) -> _Rows:
        return _Rows(self.src[part]) if self.idx is None else _Rows(self.src, self.idx[part])


class _ShardFile:
    """One shard being written. Rows stream in block by block, gathered (and masked) straight into
    a page-aligned staging buffer, checksummed and summarised while still in cache, and written to
    the open temp file with O_DIRECT, so a shard's cost is spread over the blocks that fill it.
    Nothing is visible until `publish`: a local temp file is fsynced and renamed; elsewhere the rows
    are held and PUT whole."""

    def __init__(self, fs: Any, path: str, rows: int, checksum: str, staging: _Staging,
                 stats_of: str | None) -> None:  # fmt: skip
        self.fs, self.path, self.planned, self.checksum = fs, path, rows, checksum
        self.rows = 0
        self.stats: list[tuple[float, np.ndarray]] = []  # (Σ‖x‖², Σx) per part, for the manifest
        self._stats_of = stats_of  # the store dtype, to summarise rows; None: no statistics
        self._digest = _hasher(checksum)
        self._staging = staging
        self._local = isinstance(fs, LocalFileSystem)
        self._tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        self._fd = -1
        self._direct = False
        self._held = 0  # bytes at the start of the staging buffer not yet on disk
        self._chunks: list[bytes] = []  # the file's bytes, for fsspec (non-local) stores
        self._row: tuple[np.dtype[Any], tuple[int, ...]] | None = None

    def write(self, rows: _Rows) -> None:
        """Append `rows`, gathering them into the staging buffer."""
        src, idx, n = rows.src, rows.idx, len(rows)
        if self._row is None:  # the header of a full shard; a short last one is redone on publish
            self._row = (src.dtype, src.shape[1:])
            head = _npy_header(src.dtype, (self.planned, *src.shape[1:]))
            self._digest.update(head)
            if self._local:
                self._fd, self._direct = _open_direct(self._tmp)
            self._staging.reserve(ALIGN)[:ALIGN] = np.frombuffer(head, np.uint8)
            self._held = ALIGN
        dtype, shape = self._row
        nbytes = n * dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        buf = self._staging.reserve(self._held + nbytes)
        out = buf[self._held : self._held + nbytes].view(dtype).reshape(n, *shape)
        if idx is None:
            out[...] = src
        else:  # mode="clip" lets numpy gather straight into `out` (the indices are all valid)
            np.take(src, idx, axis=0, out=out, mode="clip")
        self._digest.update(out.data.cast("B"))
        if self._stats_of is not None:
            self.stats.append(_stats(out, self._stats_of))
        self.rows += n
        self._held += nbytes
        self._flush(whole_pages=True)

    def _flush(self, whole_pages: bool) -> None:
        """Send the held bytes on: to the file (whole pages only, for O_DIRECT, unless this is the
        end), or to the chunk list. What stays moves to the start of the buffer."""
        buf, held = self._staging.buf, self._held
        if not self._local:
            self._chunks.append(buf[:held].tobytes())
            self._held = 0
            return
        out = held - held % ALIGN if whole_pages else held
        if out % ALIGN:
            self._buffered()  # the unaligned tail of the file goes through the page cache
        view, at = buf[:out].data, 0
        while at < out:
            try:
                at += os.write(self._fd, view[at:])
            except OSError as e:  # a filesystem that opens O_DIRECT but wants other alignment
                if e.errno != errno.EINVAL or not self._direct:
                    raise
                self._buffered()
        buf[: held - out] = buf[out:held]
        self._held = held - out

    def _buffered(self) -> None:
        """Drop O_DIRECT: later writes may be unaligned."""
        if self._direct:
            flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
            fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
            self._direct = False

    def publish(self) -> str:
        """Make the file visible whole; returns its checksum."""
        assert self._row is not None and 0 < self.rows <= self.planned
        self._flush(whole_pages=False)
        if self._local:
            self._buffered()
        head = _npy_header(self._row[0], (self.rows, *self._row[1]))
        if self.rows < self.planned:  # the short last shard: a new header, so hash it all again
            self._digest = _hasher(self.checksum)
            self._digest.update(head)
            if self._local:
                os.pwrite(self._fd, head, 0)
                with open(self._tmp, "rb") as f:
                    f.seek(ALIGN)
                    while chunk := f.read(1 << 24):
                        self._digest.update(chunk)
            else:
                self._chunks[0] = head + self._chunks[0][ALIGN:]
                self._digest.update(memoryview(self._chunks[0])[ALIGN:])
                for c in self._chunks[1:]:
                    self._digest.update(c)
        if not self._local:
            self.fs.pipe_file(self.path, b"".join(self._chunks))
        else:
            os.fsync(self._fd)  # on disk before the rename makes it visible
            os.close(self._fd)
            os.replace(self._tmp, self.path)
        return str(self._digest.hexdigest())


class _Files:
    """The manifest and verified shard reads under one fsspec root."""

    def __init__(self, url: str) -> None:
        fs, root = fsspec.core.url_to_fs(url)
        self.url, self._fs, self._root = url, fs, root.rstrip("/")
        self._verified: set[tuple[str, str]] = set()  # (file, fsspec ukey) whose checksum matched

    def _read_manifest(self) -> dict[str, Any] | None:
        try:
            m: dict[str, Any] = json.loads(self._fs.cat_file(f"{self._root}/manifest.json"))
        except FileNotFoundError:
            return None
        except (NotADirectoryError, IsADirectoryError):
            raise StoreError(f"{self.url} is not an activation store folder") from None
        except ValueError:
            raise StoreError(f"manifest.json of the store at {self.url} is not JSON") from None
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            got = f"{m.get('format')} v{m.get('version')}"
            raise StoreError(f"{self.url} holds {got}, not an {FORMAT} v{VERSION} store")
        self._check_rows(m)
        return m

    def _check_rows(self, m: dict[str, Any]) -> None:
        """Every stream's shards must hold the rows the manifest counts: a wrong ``rows`` would make
        means, norms and row ranges silently wrong."""
        try:
            streams = {**{f"site {s}": v for s, v in m["sites"].items()}, "tokens": m[TOKENS]}
            counts = {k: sum(int(sh["rows"]) for sh in v["shards"]) for k, v in streams.items()}
            seqs = sum(int(sh["rows"]) for sh in m[SEQUENCES]["shards"])
            rows, n_seqs = int(m["rows"]), int(m[SEQUENCES]["rows"])
        except (KeyError, TypeError, ValueError):
            raise StoreError(f"manifest.json of the store at {self.url} is malformed") from None
        counts_seq = {"sequences": (seqs, n_seqs)}
        for what, (held, said) in {
            **{k: (c, rows) for k, c in counts.items()},
            **counts_seq,
        }.items():
            if held != said:
                raise StoreError(
                    f"manifest.json of the store at {self.url} says {said:,} rows "
                    f"but the {what} shards hold {held:,}: the manifest is corrupt; re-harvest"
                )

    def _open(self, path: str) -> IO[bytes]:
        # Plain files for local paths: fsspec's local wrapper has no readinto.
        local = isinstance(self._fs, LocalFileSystem)
        return open(path, "rb") if local else self._fs.open(path, "rb")  # type: ignore[no-any-return]

    def _read(self, shard: Shard, out: np.ndarray | None = None, verify: bool = True) -> np.ndarray:
        """One shard, read straight into `out` if given. Its checksum is checked unless this object
        already checked this very version of the file (fsspec's ukey: size, mtime …)."""
        name, path = shard["file"], f"{self._root}/{shard['file']}"
        where = f"shard {name} of the store at {self.url}"
        try:
            key = (name, self._fs.ukey(path)) if verify else ("", "")
            with self._open(path) as f:
                major, _ = np.lib.format.read_magic(f)
                v1, v2 = np.lib.format.read_array_header_1_0, np.lib.format.read_array_header_2_0
                shape, fortran, dtype = (v1 if major == 1 else v2)(f)
                head = f.tell()
                if fortran or dtype.hasobject:  # never unpickle
                    raise ValueError("it is not a plain C-ordered array")
                out = np.empty(shape, dtype) if out is None else out
                if (shape, dtype) != (out.shape, out.dtype) or shape[:1] != (shard["rows"],):
                    raise ValueError(f"holds {dtype} {list(shape)}, expected {shard['rows']} rows")
                if f.readinto(out.data.cast("B")) != out.nbytes or f.read(1):  # type: ignore[attr-defined]
                    raise ValueError("its length does not match its header")
                if verify and key not in self._verified:
                    algo = next(c for c in CHECKSUMS if c in shard)
                    f.seek(0)
                    digest = _hasher(algo)
                    digest.update(f.read(head))
                    digest.update(out.data.cast("B"))
                    if digest.hexdigest() != shard[algo]:
                        raise StoreError(f"{where} is corrupt ({algo} mismatch); re-harvest it")
                    self._verified.add(key)
        except FileNotFoundError:
            raise StoreError(f"{where} is missing") from None
        except ValueError as e:
            raise StoreError(f"{where} is unreadable: {e}") from None
        return out

    def _read_range(self, shards: list[Shard], start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a stream of shards. Sizes come from the manifest: a store merged
        from the parts of a distributed harvest has a short last shard in every part."""
        at = np.cumsum([0, *(sh["rows"] for sh in shards)]).tolist()
        parts = [np.empty(0, np.int64)]
        for i in range(max(int(np.searchsorted(at, start, side="right")) - 1, 0), len(shards)):
            if at[i] >= stop:
                break
            parts.append(self._read(shards[i])[max(start - at[i], 0) : stop - at[i]])
        return np.concatenate(parts[1:] or parts)


class StoreWriter(_Files):
    """Appends harvested activations block by block; every shard and manifest update is atomic.

    One `append` is one token block. After a crash, open with `resume=True` and feed the same
    blocks in the same order from block `writer.blocks_done` on; rows already stored are dropped.

        with StoreWriter("runs/acts", sites={"L6.resid_post": 640}, model_name="gemma-3-270m") as w:
            for block in blocks: w.append({"L6.resid_post": acts}, block.input_ids, block.mask)
    """

    def __init__(
        self,
        url: str,
        *,
        sites: Mapping[str, int],
        model_name: str,
        dtype: str = "float32",
        shard_rows: int = 16384,
        meta: Mapping[str, Any] | None = None,
        resume: bool = False,
        checksum: str = "sha256",
        sequence_offset: int = 0,
        expect_rows: int | None = None,
    ) -> None:
        super().__init__(url)
        if checksum not in CHECKSUMS:
            raise StoreError(f"unknown checksum {checksum!r}; choose one of {', '.join(CHECKSUMS)}")
        if dtype not in DTYPES:
            raise StoreError(f"unknown store dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        if shard_rows < 1:
            raise StoreError(f"shard_rows must be at least 1, not {shard_rows}")
        if not sites or any(not s or "/" in s or s in _RESERVED for s in sites):
            raise StoreError(f"bad site names {list(sites)}: need some, without '/' or {_RESERVED}")
        self.sites = {s: int(d) for s, d in sites.items()}
        self.model_name, self.dtype, self.shard_rows = model_name, dtype, shard_rows
        self.checksum = checksum
        # Index of this writer's first sequence in the whole store: a part of a distributed
        # harvest numbers its rows' sequences as the merged store will (lmscope.distributed).
        self.sequence_offset = sequence_offset
        # The rows the finished store will hold, if known: the short last shard is then planned
        # short, and its header is right from the start (else it is rewritten and hashed again).
        self.expect_rows = expect_rows
        self.meta = json.loads(json.dumps(dict(meta or {})))  # fails early if not JSON
        m = self._read_manifest()
        if m is not None and not resume:
            raise StoreError(
                f"a store exists at {url}; rerun without --restart (resume=True) to go on, or give a new --out"
            )
        if m is None:
            self._m = m = self._new_manifest()
            self._fs.makedirs(self._root, exist_ok=True)
            self._save()
        else:
            self._check_matches(m)
            self._remove_orphans(m)
            self._m = m
        at = m["resume"]
        self._fed = (at["blocks"], at["rows"], at["sequences"])  # blocks, rows, sequences fed
        self._boundaries: deque[tuple[int, int, int]] = deque()  # _fed after uncommitted blocks
        self._skip_rows = m["rows"] - at["rows"]
        self._skip_seqs = m[SEQUENCES]["rows"] - at["sequences"]
        # Stored rows past the resume point: the blocks fed again must reproduce their tokens.
        self._expect = self._read_range(m[TOKENS]["shards"], at["rows"], m["rows"])
        self._filling: dict[str, _ShardFile] = {}  # stream → its shard being written
        self._staging: dict[str, _Staging] = {}  # stream → its reused page-aligned buffer

    @property
    def blocks_done(self) -> int:
        """Blocks whose rows and sequences are all committed: on resume, feed from this block on."""
        return int(self._m["resume"]["blocks"])

    @property
    def rows_committed(self) -> int:
        return int(self._m["rows"])

    @property
    def complete(self) -> bool:
        return bool(self._m["complete"])

    def _new_manifest(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION, "model": self.model_name, "dtype": self.dtype,
            "shard_rows": self.shard_rows, "rows": 0, "complete": False,
            "created": _now(), "updated": _now(), "resume": {"blocks": 0, "rows": 0, "sequences": 0},
            "sites": {s: {"d": d, "sum_sq_norm": 0.0, "sum": [0.0] * d, "shards": []}
                      for s, d in self.sites.items()},
            TOKENS: {"columns": ["token_id", "sequence", "position"], "shards": []},
            SEQUENCES: {"rows": 0, "seq_len": None, "shard_rows": None, "shards": []},
            "meta": self.meta, "expect_rows": self.expect_rows,
        }  # fmt: skip

    def _check_matches(self, m: dict[str, Any]) -> None:
        checks = [
            ("was written by model ", m["model"], self.model_name),
            ("holds dtype ", m["dtype"], self.dtype),
            ("holds sites ", {s: v["d"] for s, v in m["sites"].items()}, self.sites),
            ("has shard_rows ", m["shard_rows"], self.shard_rows),
            *((f"was written with meta {k}=", m["meta"].get(k), self.meta.get(k))
              for k in sorted({*m["meta"], *self.meta})),
        ]  # fmt: skip
        for what, old, new in checks:
            if old != new:
                raise StoreError(f"store at {self.url} {what}{old}, not {new}")

    def _remove_orphans(self, m: dict[str, Any]) -> None:
        """Delete temp files, and shards a crash left behind before their manifest update."""
        streams = [*m["sites"].values(), m[TOKENS], m[SEQUENCES]]
        keep = {sh["file"] for sec in streams for sh in sec["shards"]}
        for path in self._fs.find(self._root):
            rel = path[len(self._root) + 1 :]
            folder, _, name = rel.rpartition("/")
            shard = folder in {*m["sites"], TOKENS, SEQUENCES} and name.startswith("shard-")
            if (shard and rel not in keep) or (not folder and ".tmp-" in name):
                self._fs.rm_file(path)

    def append(
        self,
        acts: Mapping[str, torch.Tensor],
        input_ids: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> None:
        """Add one token block: `input_ids` [B, T]; `acts[site]` [N, d] for the N positions where
        `mask` is True (row-major order), or [B, T, d] to be masked here. No mask keeps them all."""
        if self.complete:
            raise StoreError(f"store at {self.url} is complete; nothing more can be appended")
        if set(acts) != set(self.sites):
            raise StoreError(f"append got sites {sorted(acts)}; the store has {sorted(self.sites)}")
        # numpy rather than torch for the indexing: several times faster on a busy small CPU.
        ids = input_ids.detach().to("cpu", torch.int64).numpy()
        keep = np.ones(ids.shape, bool) if mask is None else mask.detach().cpu().bool().numpy()
        seq = self._m[SEQUENCES]
        if ids.ndim != 2 or keep.shape != ids.shape or ids.shape[1] > (seq["seq_len"] or 1 << 62):
            got = f"{list(ids.shape)} and {list(keep.shape)}"
            raise StoreError(f"input_ids and mask must be [B, T<={seq['seq_len']}], got {got}")
        if seq["seq_len"] is None:  # sequence shards hold about as many tokens as row shards
            seq["seq_len"] = ids.shape[1]
            seq["shard_rows"] = max(1, self.shard_rows // ids.shape[1])
        n_blocks, n_rows, n_seqs = self._fed
        b, t = np.nonzero(keep)
        tokens = np.stack([ids[b, t], b + n_seqs + self.sequence_offset, t], 1)
        rows = {TOKENS: _Rows(tokens)}
        flat = None if keep.all() else np.flatnonzero(keep)  # row-major, like b and t
        for s, x in acts.items():  # all checked before anything is written
            a = _to_numpy(x, self.dtype)
            if a.ndim == 3 and a.shape[:2] == keep.shape:  # masked as the shard file gathers it
                rows[s] = _Rows(a.reshape(-1, a.shape[2]), flat)
            else:
                rows[s] = _Rows(a)
            if a.shape[-1] != self.sites[s] or len(rows[s]) != len(b) or a.ndim not in (2, 3):
                want = [len(b), self.sites[s]]
                raise StoreError(f"acts[{s!r}] has shape {list(x.shape)}, expected {want}")
        seqs = np.full((len(ids), seq["seq_len"]), -1, np.int32)  # -1 pads a shorter block
        seqs[:, : ids.shape[1]] = ids
        if k := min(self._skip_rows, len(b)):  # stored before the crash: check, then drop
            at = n_rows - self._m["resume"]["rows"]
            if not np.array_equal(tokens[:k], self._expect[at : at + k]):
                hint = f"feed the same blocks in the same order from block {self.blocks_done} on"
                raise StoreError(f"resumed input differs from the store at {self.url}; {hint}")
            rows, self._skip_rows = {s: a[k:] for s, a in rows.items()}, self._skip_rows - k
        j = min(self._skip_seqs, len(seqs))
        self._skip_seqs -= j
        self._fed = (n_blocks + 1, n_rows + len(b), n_seqs + len(ids))
        self._boundaries.append(self._fed)
        wrote = self._feed(rows, self.shard_rows)
        if self._feed({SEQUENCES: _Rows(seqs[j:])}, seq["shard_rows"]) or wrote:
            self._commit(final=False)

    def close(self) -> None:
        """Write the tail shards and mark the store complete. A no-op on a complete store."""
        if self.complete:
            return
        if self._skip_rows or self._skip_seqs:
            raise StoreError(f"store at {self.url} holds rows of blocks not fed again yet")
        for group in ([*self.sites, TOKENS], [SEQUENCES]):
            if group[0] in self._filling:
                self._publish(group)
        self._commit(final=True)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:  # on an error, keep the committed part for a resume
            self.close()

    def _save(self) -> None:
        self._m["updated"] = _now()
        put_whole(self._fs, f"{self._root}/manifest.json", json.dumps(self._m, indent=1).encode())

    def _feed(self, rows: dict[str, _Rows], size: int) -> bool:
        """Write the rows of streams that advance together (all sites and tokens, or sequences)
        into their open shards, publishing each shard that fills. True if any was published."""
        names, n = list(rows), len(next(iter(rows.values())))
        published, lo = False, 0
        while lo < n:
            if names[0] not in self._filling:
                left = (self.expect_rows or 0) - self._m["rows"]
                planned = left if names[0] != SEQUENCES and 0 < left < size else size
                for name in names:
                    sec = self._section(name)
                    path = f"{self._root}/{name}/shard-{len(sec['shards']):06d}.npy"
                    self._fs.makedirs(f"{self._root}/{name}", exist_ok=True)
                    stats = self.dtype if name in self.sites else None
                    staging = self._staging.setdefault(name, _Staging())
                    self._filling[name] = _ShardFile(
                        self._fs, path, planned, self.checksum, staging, stats
                    )
            shard = self._filling[names[0]]
            hi = min(n, lo + shard.planned - shard.rows)
            for name in names:
                self._filling[name].write(rows[name][lo:hi])
            lo = hi
            if shard.rows == shard.planned:
                self._publish(names)
                published = True
        return published

    def _section(self, name: str) -> dict[str, Any]:
        return self._m["sites"].get(name) or self._m[name]  # type: ignore[no-any-return]

    def _publish(self, names: list[str]) -> None:
        """Make the open shards of `names` whole files; the manifest lists them on `_commit`."""
        for name in names:
            shard, sec = self._filling.pop(name), self._section(name)
            digest = shard.publish()
            rel = shard.path[len(self._root) + 1 :]
            sec["shards"].append({"file": rel, "rows": shard.rows, self.checksum: digest})
            for sq, total in shard.stats:  # part by part, as a resumed writer adds them too
                sec["sum_sq_norm"] += sq
                sec["sum"] = (np.asarray(sec["sum"]) + total).tolist()
        (self._m[SEQUENCES] if names[0] == SEQUENCES else self._m)["rows"] += shard.rows

    def _commit(self, final: bool) -> None:
        m = self._m
        # The resume point: the last block boundary that both streams have fully committed.
        while self._boundaries and self._boundaries[0][1] <= m["rows"]:
            if self._boundaries[0][2] > m[SEQUENCES]["rows"]:
                break
            blocks, rows, seqs = self._boundaries.popleft()
            m["resume"] = {"blocks": blocks, "rows": rows, "sequences": seqs}
        m["complete"] = final
        self._save()  # only now do the shards just published become part of the store


class ActivationStore(_Files):
    """Reads a store written by `StoreWriter`: a complete one, or the committed part of an
    interrupted one (as of opening; reopen to see more).

        store = ActivationStore("runs/acts")
        for batch in store.iter_batches(["L6.resid_post"], 4096, seed=0): x = batch["L6.resid_post"]
    """

    def __init__(self, url: str) -> None:
        super().__init__(url)
        m = self._read_manifest()
        if m is None:
            raise StoreError(f"no activation store at {url} (no manifest.json)")
        self._m = m
        self.model_name: str = m["model"]
        self.dtype: str = m["dtype"]
        self.rows: int = m["rows"]  # per site
        self.complete: bool = m["complete"]
        self.meta: dict[str, Any] = m["meta"]
        self.sites: list[str] = list(m["sites"])
        self.n_sequences: int = m[SEQUENCES]["rows"]
        self.expect_rows: int | None = m.get("expect_rows")  # what the harvest asked for, if known

    @staticmethod
    def exists(url: str) -> bool:
        """Whether ``url`` holds a store's manifest (complete or not)."""
        fs, root = fsspec.core.url_to_fs(url)
        return bool(fs.exists(f"{root.rstrip('/')}/manifest.json"))

    def verify(self) -> None:
        """Read every shard and check its checksum (StoreError naming the first bad one)."""
        streams = [*self._m["sites"].values(), self._m[TOKENS], self._m[SEQUENCES]]
        for shard in (sh for sec in streams for sh in sec["shards"]):
            self._read(shard)

    def _site(self, site: str) -> dict[str, Any]:
        if site not in self._m["sites"]:
            known = ", ".join(self.sites)
            raise StoreError(f"unknown site {site!r} in store at {self.url}; available: {known}")
        return self._m["sites"][site]  # type: ignore[no-any-return]

    def d(self, site: str) -> int:
        return int(self._site(site)["d"])

    def mean_sq_norm(self, site: str) -> float:
        """Mean of ‖x‖² over all rows, accumulated in float64 from the stored values."""
        return float(self._site(site)["sum_sq_norm"]) / max(self.rows, 1)

    def mean(self, site: str) -> torch.Tensor:
        total = torch.tensor(self._site(site)["sum"], dtype=torch.float64)
        return (total / max(self.rows, 1)).float()

    def _span(self, start: int, stop: int | None, total: int) -> tuple[int, int]:
        stop = total if stop is None else stop
        if not 0 <= start <= stop <= total:
            raise StoreError(f"rows [{start}, {stop}) are outside the {total} rows of {self.url}")
        return start, stop

    def read_rows(self, site: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of one site in stored order, as float32 [n, d]."""
        shards, (start, stop) = self._site(site)["shards"], self._span(start, stop, self.rows)
        if start == stop:
            return torch.empty(0, self.d(site))
        return _to_torch(self._read_range(shards, start, stop), self.dtype)

    def _token_info(self, start: int, stop: int | None) -> torch.Tensor:
        shards, span = self._m[TOKENS]["shards"], self._span(start, stop, self.rows)
        return torch.from_numpy(self._read_range(shards, *span).reshape(-1, 3))

    def token_ids(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Token id of each row in [start, stop): int64 [n]."""
        return self._token_info(start, stop)[:, 0]

    def token_positions(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """(sequence index, position) of each row in [start, stop): int64 [n, 2]. With `sequences`
        they give any row's context: `store.sequences(i, i + 1)[0, :pos + 1]`."""
        return self._token_info(start, stop)[:, 1:]

    def sequences(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Token sequences [start, stop) as fed (BOS, EOS, pad kept; -1 past a short block): [n, T]."""
        sec = self._m[SEQUENCES]
        span = self._span(start, stop, sec["rows"])
        a = self._read_range(sec["shards"], *span)
        return torch.from_numpy(a.reshape(-1, sec["seq_len"] or 0).astype(np.int64))

    def iter_batches(
        self,
        sites: Sequence[str],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle_buffer: int | None = None,
        loop: bool = False,
        start_batch: int = 0,
        verify: bool = True,
        return_rows: bool = False,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Shuffled float32 batches {site: [B, d]} holding the same rows for every site (and their
        global row index under "row" if `return_rows`).

        Each epoch visits the shards in a seed-given order, in groups of up to `shuffle_buffer`
        rows (default: as many as fit in `SHUFFLE_BYTES` for these sites, at least one shard), and
        permutes each group: every row comes once per epoch; without `loop` the last
        batch may be short. `start_batch=k` yields exactly what the k-th batch on would have been,
        reading only the shards needed from there. Shard checksums are checked unless `verify`
        is False (once per file version and store object)."""
        for s in sites:
            self._site(s)
        if not sites or batch_size < 1 or self.rows == 0:
            got = f"sites {list(sites)}, batch_size {batch_size}, {self.rows} rows"
            raise StoreError(f"iter_batches needs sites, batch_size >= 1 and rows; got {got}")
        if shuffle_buffer is None:  # the buffer holds a group of every site: bound its bytes
            row_bytes = sum(self.d(s) for s in sites) * DTYPES[self.dtype].itemsize
            shuffle_buffer = max(1, SHUFFLE_BYTES // row_bytes)
        args = (batch_size, seed, shuffle_buffer, loop, start_batch, verify, return_rows)
        return self._batches(list(sites), *args)

    def _batches(self, sites: list[str], bs: int, seed: int, limit: int, loop: bool, start: int,
                 verify: bool, return_rows: bool) -> Iterator[dict[str, torch.Tensor]]:  # fmt: skip
        counts = [sh["rows"] for sh in self._m[TOKENS]["shards"]]
        starts = np.cumsum([0, *counts])
        # One buffer per site, reused from group to group: refills cost no page faults.
        bufs = {s: np.empty((0, self.d(s)), DTYPES[self.dtype]) for s in sites}
        carry = np.empty(0, np.int64)  # ids of the rows left over from the last group (< bs)
        held, done = start == 0, 0  # whether bufs begin with the carried rows; batches passed

        def emit(sel: np.ndarray) -> dict[str, torch.Tensor]:
            out = {s: _to_torch(bufs[s][sel], self.dtype) for s in sites}
            return {**out, ROW: torch.from_numpy(ids[sel])} if return_rows else out

        def fill(pool: ThreadPoolExecutor, group: list[int]) -> None:
            c, n = len(carry), sum(counts[g] for g in group)
            for s, buf in bufs.items():
                if len(buf) < c + n:
                    bufs[s] = np.empty((c + n + bs, self.d(s)), buf.dtype)
                    bufs[s][: c * held] = buf[: c * held]
            if not held:  # we skipped to start_batch: fetch the carried rows by index
                shard_of = np.searchsorted(starts, carry, side="right") - 1
                for g in np.unique(shard_of).tolist():
                    at = shard_of == g
                    for s in sites:
                        rows = self._read(self._m["sites"][s]["shards"][g], verify=verify)
                        bufs[s][:c][at] = rows[carry[at] - starts[g]]

            def read(job: tuple[str, int, int]) -> None:
                s, g, o = job
                self._read(self._m["sites"][s]["shards"][g], bufs[s][o : o + counts[g]], verify)

            # Shards are read and hashed in parallel: file reads and hashlib release the GIL.
            offsets = (c + np.cumsum([0, *(counts[g] for g in group)])).tolist()
            list(pool.map(read, [(s, g, o) for s in sites for g, o in zip(group, offsets)]))

        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            for epoch in itertools.count():
                rng = np.random.default_rng([seed, epoch])
                for group in self._groups(rng.permutation(len(counts)), counts, limit):
                    # Carried rows lead unshuffled, so each row leaves by the next group's first
                    # batch. The draws are the same when skipping, so skipping reads nothing.
                    c, n = len(carry), sum(counts[g] for g in group)
                    order = np.concatenate([np.arange(c), c + rng.permutation(n)])
                    ids = np.concatenate(
                        [carry, *(np.arange(starts[g], starts[g + 1]) for g in group)]
                    )
                    n_full = len(order) // bs
                    if done + n_full > start:
                        fill(pool, group)
                    for j in range(n_full):
                        if done >= start:
                            yield emit(order[j * bs : (j + 1) * bs])
                        done += 1
                    rest, held = order[n_full * bs :], done > start
                    for s in sites if held else []:
                        bufs[s][: len(rest)] = bufs[s][rest]
                    carry = ids[rest]
                if not loop:
                    if len(carry) and done >= start:
                        if not held:
                            fill(pool, [])
                        ids = carry
                        yield emit(np.arange(len(carry)))
                    return

    @staticmethod
    def _groups(order: np.ndarray, counts: list[int], limit: int) -> Iterator[list[int]]:
        """Runs of consecutive shards of `order` holding at most `limit` rows (or one shard)."""
        group: list[int] = []
        for g in order.tolist():
            if group and sum(counts[i] for i in group) + counts[g] > limit:
                yield group
                group = []
            group.append(g)
        yield group
