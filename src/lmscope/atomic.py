"""Whole-file publishing: a reader sees all of a file or none of it, never a torn write.

On a local disk a file is written to a temp name beside its target, fsynced and renamed over it;
on other fsspec filesystems (object stores, `memory://`) it is one PUT, which those make visible
whole. Every stage writes its manifests, records and reports through here.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def temp_path(path: str | Path) -> str:
    """A fresh temp name beside `path` (a crash leaves it behind; resumes delete `*.tmp-*`)."""
    p = Path(path)
    return str(p.parent / f".{p.name}.tmp-{uuid.uuid4().hex[:8]}")


def write_bytes_atomic(path: str | Path, chunks: bytes | Sequence[bytes | memoryview]) -> None:
    """Publish `chunks` at the local `path`: temp file, fsync, rename."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            if isinstance(chunks, bytes):
                f.write(chunks)
            else:
                f.writelines(chunks)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1) + "\n")


def put_whole(fs: Any, path: str, chunks: bytes | Sequence[bytes | memoryview]) -> None:
    """Publish at `path` on the fsspec filesystem `fs`: atomically renamed on a local disk, one
    PUT elsewhere."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        write_bytes_atomic(path, chunks)
    else:
        fs.pipe_file(path, chunks if isinstance(chunks, bytes) else b"".join(chunks))
