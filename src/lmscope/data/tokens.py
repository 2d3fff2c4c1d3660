"""From documents to fixed-length token sequences: split, shuffle, tokenize, pack, batch.

The stream is `doc EOS doc EOS doc EOS ...`, cut into pieces of `seq_len - 1` tokens, each prefixed with
BOS. Every sequence thus starts where the model expects (Gemma degrades badly without BOS) and no token
is wasted on padding; the price is that a sequence may start mid-document. Only the very last sequence
is padded. `mask` is False at BOS, EOS and pad, the positions an SAE never trains or evaluates on.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from hashlib import blake2b
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmscope.data.corpus import iter_documents
from lmscope.errors import CorpusError

SPLITS = ("train", "eval", "all")
_BUCKETS = 10_000


@dataclass(frozen=True)
class TokenBlock:
    """A batch of packed sequences: `input_ids` int64 [B, T], each row starting with BOS; `mask` bool
    [B, T], False at BOS, EOS and pad. Padding only ever trails, so a causal model needs no attention
    mask for it."""

    input_ids: torch.Tensor
    mask: torch.Tensor

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum())


def in_eval_split(text: str, eval_fraction: float) -> bool:
    """Whether a document belongs to the eval split: fixed by its text alone, on every run and machine.

    blake2b rather than `hash()`, which Python salts per process.
    """
    digest = blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % _BUCKETS < round(eval_fraction * _BUCKETS)


def split_documents(docs: Iterable[str], split: str, eval_fraction: float) -> Iterator[str]:
    """Keep the documents of `split` (`train`, `eval` or `all`)."""
    if split not in SPLITS:
        raise CorpusError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if not 0.0 <= eval_fraction <= 1.0:
        raise CorpusError(f"eval_fraction must be between 0 and 1, got {eval_fraction}")
    if split == "all":
        return iter(docs)
    want_eval = split == "eval"
    return (d for d in docs if in_eval_split(d, eval_fraction) == want_eval)


def shuffle_documents(docs: Iterable[str], seed: int, buffer_size: int) -> Iterator[str]:
    """Shuffle a stream within a bounded buffer: an exact shuffle when the corpus fits in the buffer.

    `random.Random` with an int seed gives the same sequence on every platform and Python 3 version.
    """
    rng = random.Random(seed)
    buffer: list[str] = []
    for doc in docs:
        if len(buffer) < buffer_size:
            buffer.append(doc)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = doc
    rng.shuffle(buffer)
    yield from buffer


def special_ids(tokenizer: Any) -> tuple[int, int, int]:
    """(bos, eos, pad) ids. Without a BOS token (Qwen, GPT-2 style) EOS starts sequences; without pad,
    EOS pads. Both are masked anyway."""
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    if bos is None and eos is None:
        raise CorpusError(
            "the tokenizer has neither a BOS nor an EOS token; packing needs one of them"
        )
    bos = eos if bos is None else bos
    eos = bos if eos is None else eos
    return bos, eos, eos if pad is None else pad


def tokenize(docs: list[str], tokenizer: Any) -> list[list[int]]:
    """Token ids of each document, without special tokens; a literal "<eos>" in a text becomes
    ordinary tokens, so special ids (and the mask built from them) only ever come from packing.

    Fast tokenizers go straight to the Rust backend's `encode_batch_fast` (no offsets: ~1.5x faster
    than `tokenizer(...)`); `tokenize_reference` is the plain path, and tests hold the two equal.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return tokenize_reference(docs, tokenizer)
    # The wrapper leaves truncation/padding state on the backend and resets it on its own next call.
    backend.no_truncation()
    backend.no_padding()
    saved = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        return [e.ids for e in backend.encode_batch_fast(docs, add_special_tokens=False)]
    finally:
        backend.encode_special_tokens = saved


def tokenize_reference(docs: list[str], tokenizer: Any) -> list[list[int]]:
    """`tokenize` through the tokenizer's own batched call (works for slow tokenizers too)."""
    enc = tokenizer(
        docs,
        add_special_tokens=False,
        split_special_tokens=True,
        return_attention_mask=False,
        verbose=False,  # long documents are fine here: they are cut by packing, not by the model
    )
    return list(enc["input_ids"])


def pack_tokens(
    docs: Iterable[str], tokenizer: Any, seq_len: int, *, docs_per_call: int = 256
) -> Iterator[np.ndarray]:
    """Yield int64 arrays [n, seq_len] of packed sequences (BOS + next seq_len-1 tokens of the stream).

    Arrays rather than single rows, so skipping and batching stay vectorised; `n` varies (may be 0).
    """
    if seq_len < 2:
        raise CorpusError(f"seq_len must be at least 2 (BOS + one token), got {seq_len}")
    bos, eos, pad = special_ids(tokenizer)
    width = seq_len - 1
    carry = np.empty(0, dtype=np.int64)  # tokens waiting for the next full sequence
    it = iter(docs)
    while batch := list(itertools.islice(it, docs_per_call)):
        ids = tokenize(batch, tokenizer)
        stream = np.concatenate([carry, *(np.array(t + [eos], dtype=np.int64) for t in ids)])
        n = len(stream) // width
        carry = stream[n * width :]
        yield np.concatenate(
            [np.full((n, 1), bos, dtype=np.int64), stream[: n * width].reshape(n, width)], axis=1
        )
    if len(carry):
        last = np.full((1, seq_len), pad, dtype=np.int64)
        last[0, 0] = bos
        last[0, 1 : 1 + len(carry)] = carry
        yield last


class TokenBatches(Iterator[TokenBlock]):
    """Batches of packed sequences from a corpus, reproducible from (corpus, tokenizer, arguments).

    `source` is anything `iter_documents` takes, or an iterable of document strings. Documents are
    split train/eval by text hash, shuffled with `seed` in a buffer of `shuffle_buffer` documents
    (`seed=None` keeps corpus order), tokenized and packed. The default buffer holds the whole default
    corpus (~17.7k documents), so its shuffle is exact.

    Resuming: `skip=k` drops the first k *sequences* (not batches) of the stream, so
    `TokenBatches(..., skip=it.position)` continues exactly after the last block `it` yielded.
    Skipped sequences are still tokenized (~1.5 s of CPU per million Gemma tokens), never made into
    tensors.
    `max_tokens` caps the mask-true tokens of the whole stream, skipped sequences included; the
    sequence that reaches it is the last one.

    Counters: `tokens` (mask-true positions yielded), `position` (sequences consumed, skipped included).

    >>> for block in TokenBatches("default", tok, seq_len=128, batch_size=8): ...
    """

    def __init__(
        self,
        source: str | Path | Iterable[str],
        tokenizer: Any,
        *,
        seq_len: int = 128,
        batch_size: int = 8,
        split: str = "train",
        seed: int | None = 0,
        eval_fraction: float = 0.05,
        shuffle_buffer: int = 32_768,
        max_tokens: int | None = None,
        skip: int = 0,
    ) -> None:
        if batch_size < 1 or skip < 0 or shuffle_buffer < 1:
            raise CorpusError(
                f"batch_size and shuffle_buffer must be >= 1 and skip >= 0, got {batch_size}, {shuffle_buffer}, {skip}"
            )
        docs = iter_documents(source) if isinstance(source, str | Path) else iter(source)
        docs = split_documents(docs, split, eval_fraction)
        if seed is not None:
            docs = shuffle_documents(docs, seed, shuffle_buffer)
        self._chunks = pack_tokens(docs, tokenizer, seq_len)
        self._special = torch.tensor(sorted(set(special_ids(tokenizer))))
        self._special_np = self._special.numpy()
        self.batch_size, self.max_tokens, self._skip = batch_size, max_tokens, skip
        self._pending = np.empty((0, seq_len), dtype=np.int64)
        self._pending_counts = np.empty(0, dtype=np.int64)  # mask-true tokens per pending row
        self._total = 0  # mask-true tokens of the stream so far, skipped sequences included
        self._done = False
        self.tokens = 0
        self.position = 0
        self._describe = (
            f"split {split!r} of {source if isinstance(source, str | Path) else 'the documents'}"
        )

    @property
    def stream_tokens(self) -> int:
        """Mask-true tokens of the stream consumed so far, skipped sequences included."""
        return self._total

    def __next__(self) -> TokenBlock:
        rows = self._take(self.batch_size)
        if rows is None:
            raise StopIteration
        ids = torch.from_numpy(rows)
        block = TokenBlock(ids, ~torch.isin(ids, self._special))
        self.tokens += block.n_tokens
        return block

    def _take(self, n: int) -> np.ndarray | None:
        """The next n sequences (fewer at the end), after any pending skip; None when exhausted."""
        parts: list[np.ndarray] = []
        have = 0
        while have < n and not self._done:
            if not len(self._pending):
                chunk = next(self._chunks, None)
                if chunk is None:
                    if self.position == 0:
                        raise CorpusError(f"no tokens in {self._describe}")
                    self._done = True
                    break
                self._pending = chunk
                self._pending_counts = (~np.isin(chunk, self._special_np)).sum(axis=1)
            rows, counts = self._pending, self._pending_counts
            keep = len(rows)
            if self.max_tokens is not None:  # stop at the first sequence reaching the cap
                reached = np.nonzero(self._total + np.cumsum(counts) >= self.max_tokens)[0]
                if len(reached):
                    keep = int(reached[0]) + 1
            drop = min(self._skip, keep)  # skipped rows are counted, never turned into tensors
            keep = min(keep, drop + n - have)
            if keep > drop:
                parts.append(rows[drop:keep])
                have += keep - drop
            self._skip -= drop
            self._total += int(counts[:keep].sum())
            self.position += keep
            self._pending, self._pending_counts = rows[keep:], counts[keep:]
            if self.max_tokens is not None and self._total >= self.max_tokens:
                self._done = True
        return np.concatenate(parts) if parts else None
