"""Harvest: run the model over a corpus once per batch and store every requested site.

One forward pass per token block serves all sites; the pass stops after the deepest layer asked for
and never computes the unembedding. Writing (masking, checksums, statistics, file I/O) runs on
a background thread so the model keeps both cores busy, and shards are written as their blocks
arrive, so little is left to write after the last forward pass: torch, numpy, xxhash and file writes
all release the GIL. The writer's share of the CPU is kept small (O_DIRECT writes, xxh3 checksums,
masking fused into the one copy it makes; see `lmscope.activations.store`), and freed site tensors
stay in the heap for the next block (`_retain_freed_memory`).

The store commits at block boundaries, so a killed harvest resumes by skipping the blocks it already
holds (`StoreWriter.blocks_done`) and feeding the rest: same seed, same blocks.
"""

from __future__ import annotations

import ctypes
import itertools
import queue
import shutil
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lmscope.activations.store import DTYPES, ActivationStore, StoreWriter
from lmscope.data import TokenBatches, TokenBlock, corpus_fingerprint
from lmscope.errors import CorpusError, StoreError
from lmscope.model import LoadedModel, SiteModel, load_model, parse_sites


@dataclass
class HarvestConfig:
    """What to harvest. The defaults are the README's main job on the embedded Gemma 3 270M."""

    model: str = "gemma-3-270m"
    sites: str = "all.resid_post,all.mlp_out,all.attn_z"
    corpus: str = "default"
    tokens: int = 20_000
    seq_len: int = 128
    batch_size: int = 8
    split: str = "train"
    seed: int = 0
    dtype: str = "float32"
    model_dtype: str = "float32"
    device: str | None = None
    shard_rows: int = 8192

    def __post_init__(self) -> None:
        for name in ("tokens", "batch_size", "shard_rows"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise StoreError(f"harvest {name} must be a positive integer, got {getattr(self, name)!r}")  # fmt: skip
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise StoreError(f"harvest seq_len must be at least 2 (BOS and one token), got {self.seq_len!r}")  # fmt: skip
        if self.split not in ("train", "eval"):
            raise StoreError(f"harvest split must be train or eval, got {self.split!r}")
        if self.dtype not in DTYPES:
            raise StoreError(f"unknown store dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")  # fmt: skip


def check_feasible(cfg: HarvestConfig, model: SiteModel, out: str, dims: list[int]) -> None:
    """Refuse, before any file is written, a harvest the model or the disk cannot hold."""
    context = getattr(model.loaded.model.config, "max_position_embeddings", None)
    if context and cfg.seq_len > context:
        raise StoreError(f"seq_len {cfg.seq_len:,} is beyond {model.loaded.name}'s context of {context:,} tokens")  # fmt: skip
    need = cfg.tokens * (sum(dims) * DTYPES[cfg.dtype].itemsize + 24)  # + token id, seq, pos
    if "://" in out:
        return
    where = Path(out).absolute()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if need > free:
        raise StoreError(
            f"{cfg.tokens:,} tokens × {len(dims)} sites need {need / 1e9:,.1f} GB of disk for the "
            f"store; {where} has {free / 1e9:,.1f} GB free: ask for fewer --tokens or sites"
        )


def read_sites(
    model: SiteModel, input_ids: torch.Tensor, names: list[str]
) -> dict[str, torch.Tensor]:
    """The named sites for one token block, from a forward pass that stops after the deepest of
    them and computes no logits: what harvesting and streaming both need."""
    last = max(model.site(n).layer for n in names)
    with torch.inference_mode():
        return model.run(input_ids, read=names, stop_after_layer=last, return_logits=False).acts


def token_batches(cfg: HarvestConfig, loaded: LoadedModel, *, skip_blocks: int = 0) -> TokenBatches:
    """The token blocks a harvest of `cfg` feeds the model, from block `skip_blocks` on."""
    return TokenBatches(cfg.corpus, loaded.tokenizer, seq_len=cfg.seq_len,
                        batch_size=cfg.batch_size, split=cfg.split, seed=cfg.seed,
                        max_tokens=cfg.tokens, skip=skip_blocks * cfg.batch_size)  # fmt: skip


def _store_meta(cfg: HarvestConfig) -> dict[str, Any]:
    """What a resumed harvest must share with the original for the store to stay consistent."""
    keep = ("corpus", "seq_len", "batch_size", "split", "seed", "model_dtype")
    meta = {k: v for k, v in asdict(cfg).items() if k in keep}
    meta["corpus_fingerprint"] = corpus_fingerprint(cfg.corpus) if cfg.corpus else ""
    return meta


def _trim_to(block: TokenBlock, excess: int) -> TokenBlock:
    """Drop the last `excess` stored positions of a block (row-major), so a harvest stores exactly
    the tokens asked for."""
    if excess <= 0:
        return block
    mask = block.mask.clone()
    flat = mask.view(-1)
    on = flat.nonzero().squeeze(1)
    flat[on[len(on) - excess :]] = False
    return TokenBlock(block.input_ids, mask)


def _blocks(batches: TokenBatches, tokens: int) -> Iterator[TokenBlock]:
    """The batches, with the final one trimmed to land on exactly `tokens` stored positions."""
    held = next(batches, None)
    while held is not None:
        nxt = next(batches, None)
        if nxt is None:
            held = _trim_to(held, batches.stream_tokens - tokens)
        yield held
        held = nxt


def _retain_freed_memory() -> None:
    """Ask glibc to keep freed memory for reuse instead of handing it back to the OS.

    A harvest keeps every site of a block alive until the writer has stored it (~170 MB a block
    for Gemma 3 270M's 54 sites), so by default glibc returns those pages when they are freed and
    the next block's forward pass faults them in again, zeroed: a few percent of the forward pass.
    With a high trim threshold (and the mmap threshold, which setting it would otherwise fix at
    128 KiB) the pages stay in the heap. The process keeps its peak memory; a no-op off glibc."""
    global _RETAINED
    if _RETAINED or sys.platform != "linux":
        return
    _RETAINED = True
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    mallopt(m_mmap_threshold, 256 << 20)
    mallopt(m_trim_threshold, 1 << 30)


_RETAINED = False


def release_freed_memory() -> None:
    """Undo `_retain_freed_memory` and hand freed heap pages back to the OS (glibc only).

    The retention is for the harvest loop; left on, a build's later stages kept every page the
    train stage had touched (the quick build held 11 GB in eval, issue 16)."""
    global _RETAINED
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL(None)
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return
    if _RETAINED:
        m_trim_threshold, m_mmap_threshold = -1, -3
        mallopt(m_mmap_threshold, 128 << 10)  # glibc's defaults
        mallopt(m_trim_threshold, 128 << 10)
        _RETAINED = False
    malloc_trim(0)


class _BackgroundWriter:
    """Feeds `StoreWriter.append` from a thread; errors surface in the caller on the next put/close."""

    def __init__(self, writer: StoreWriter, depth: int = 2) -> None:
        self._writer = writer
        self._q: queue.Queue[tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor] | None]
        self._q = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="lmscope-store-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._q.get()) is not None:
            if self._error is None:
                try:
                    self._writer.append(*item)
                except BaseException as e:  # re-raised in the harvesting thread
                    self._error = e

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, acts: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor) -> None:
        self._check()
        self._q.put((acts, ids, mask))

    def finish(self) -> None:
        """Wait for every queued block to be appended (committed shards stay on any error)."""
        self._q.put(None)
        self._thread.join()
        self._check()


def harvest(
    cfg: HarvestConfig,
    out: str,
    *,
    resume: bool = True,
    loaded: LoadedModel | None = None,
    progress: bool = True,
    max_blocks: int | None = None,
    block_range: tuple[int, int] | None = None,
) -> ActivationStore:
    """Harvest `cfg.tokens` tokens of every site in `cfg.sites` into the store at `out`.

    An existing store at `out` is resumed (unless `resume=False`): it must have been written with the
    same model, sites, dtype and corpus settings. `max_blocks` stops after that many new blocks
    without completing the store (tests use it to interrupt a harvest). `block_range=(i, j)`
    harvests only blocks i..j-1 of the run, numbering sequences as the whole run does: one rank's
    part of a distributed harvest (`lmscope.distributed.harvest_parts` merges the parts).

    >>> store = harvest(HarvestConfig(sites="L6.resid_post", tokens=10_000), "runs/acts")
    """
    if cfg.tokens < 1:
        raise CorpusError(f"--tokens must be at least 1, got {cfg.tokens}")
    loaded = loaded or load_model(cfg.model, device=cfg.device, dtype=cfg.model_dtype)
    model = SiteModel(loaded)
    sites = parse_sites(cfg.sites, model.n_layers)
    names = [str(s) for s in sites]
    first, stop = block_range or (0, None)
    dims = [model.site_dim(s) for s in sites]
    if not ActivationStore.exists(out):  # a rerun of a finished store needs no room
        check_feasible(cfg, model, out, dims)
    writer = StoreWriter(
        out,
        sites={str(s): model.site_dim(s) for s in sites},
        model_name=loaded.name,
        dtype=cfg.dtype,
        shard_rows=cfg.shard_rows,
        meta=_store_meta(cfg) | ({"blocks": list(block_range)} if block_range else {}),
        resume=resume,
        checksum="xxh3_64",  # ~50x cheaper than sha256: every CPU cycle here is the model's
        sequence_offset=first * cfg.batch_size,
        expect_rows=None if block_range else cfg.tokens,  # what `_blocks` trims the run to
    )
    if writer.complete:
        done_store = ActivationStore(out)
        held = done_store.expect_rows or done_store.rows
        if block_range is None and held != cfg.tokens:
            raise StoreError(
                f"the store at {out} is complete with {done_store.rows:,} tokens, harvested for "
                f"{held:,}; you asked {cfg.tokens:,}: harvest into a new --out"
            )
        done_store.verify()  # a rerun is how a user checks a store: look at every shard
        return done_store
    todo = None if stop is None else max(stop - first - writer.blocks_done, 0)
    batches = token_batches(cfg, loaded, skip_blocks=first + writer.blocks_done)
    bar = tqdm(
        total=cfg.tokens,
        initial=writer.rows_committed,
        unit="tok",
        unit_scale=True,
        desc=f"harvest {len(names)} sites",
        disable=not progress,
    )
    store_dtype = getattr(torch, cfg.dtype)
    _retain_freed_memory()
    background = _BackgroundWriter(writer)
    done = 0
    try:
        for block in itertools.islice(_blocks(batches, cfg.tokens), todo):
            if max_blocks is not None and done >= max_blocks:
                break
            acts = read_sites(model, block.input_ids.to(loaded.device), names)
            # Rounding to a 16-bit store dtype here uses torch's threads (and the GPU, if any),
            # and halves what the writer thread copies and hashes.
            acts = {n: acts[n].to("cpu", store_dtype) for n in names}
            background.put(acts, block.input_ids, block.mask)
            done += 1
            bar.update(block.n_tokens)
    finally:
        bar.close()
        background.finish()
        release_freed_memory()
    if max_blocks is not None and done >= max_blocks:
        return ActivationStore(out)
    writer.close()
    store = ActivationStore(out)
    if block_range is not None:  # a part: the merged store is checked as a whole
        return store
    if store.rows < cfg.tokens:
        warnings.warn(
            f"the corpus {cfg.corpus!r} ({cfg.split} split) ran out after {store.rows:,} tokens "
            f"of the {cfg.tokens:,} asked; the store at {out} holds them all",
            stacklevel=2,
        )
    elif store.rows != cfg.tokens:
        raise StoreError(f"store at {out} holds {store.rows:,} rows, not the {cfg.tokens:,} asked")
    return store
