"""Suites and store manifests on remote storage (`s3://`, `gs://`, `memory://`) through fsspec.

Object stores have no atomic rename, but a single PUT becomes visible whole. So a remote suite is
published the way the activation store commits its shards: every file is one PUT, and the suite's
`manifest.json`, written last, lists each file with its sha256. The manifest is the commit point:
a reader that trusts only what it lists, and checks the hashes (`fetch_suite`), never sees a torn
or half-published suite. Training itself runs in a local folder (checkpoints want fsync + rename).

    publish_suite("runs/suite", "s3://bucket/suites/gemma-l6")
    fetch_suite("s3://bucket/suites/gemma-l6", "runs/copy")     # verified, then usable locally
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from lmscope.atomic import put_whole, temp_path
from lmscope.errors import LmscopeError

MANIFEST = "manifest.json"
# Training leftovers that are not part of a finished suite.
_SKIP_DIRS = {".checkpoints", ".ranks"}


class RemoteError(LmscopeError):
    """A remote suite is missing, incomplete or corrupt, or a URL cannot be used."""


def is_remote(url: str | Path) -> bool:
    """True for fsspec URLs that are not local paths (`s3://…`, `gs://…`, `memory://…`)."""
    fs, _ = fsspec.core.url_to_fs(str(url))
    return not isinstance(fs, LocalFileSystem)


def work_dir_for(url: str, work_dir: str | Path | None = None) -> Path:
    """Where a suite bound for `url` is trained: `url` itself when it is a local path, else
    `work_dir` or `$LMSCOPE_CACHE/runs/<hash of url>` (stable, so a rerun resumes there)."""
    if not is_remote(url):
        _, path = fsspec.core.url_to_fs(url)
        return Path(path)
    if work_dir is not None:
        return Path(work_dir)
    from lmscope.model.loading import cache_root

    return cache_root() / "runs" / hashlib.sha256(url.encode()).hexdigest()[:16]


def _suite_files(local: Path) -> list[Path]:
    out = []
    for p in sorted(local.rglob("*")):
        rel = p.relative_to(local)
        if p.is_file() and rel.name != MANIFEST and ".tmp" not in rel.name:
            if not _SKIP_DIRS.intersection(rel.parts) and not rel.name.startswith("."):
                out.append(p)
    return out


def publish_suite(local: str | Path, url: str) -> dict[str, Any]:
    """Copy the finished suite folder `local` to `url`; returns the manifest written there.

    Files first, each a whole PUT; then `manifest.json` with a `files` table (`{path: {"sha256",
    "bytes"}}`), the commit point. Checkpoints and temp files stay behind."""
    local = Path(local)
    if not (local / MANIFEST).is_file():
        raise RemoteError(f"{local} holds no suite manifest; train (and record) the suite first")
    manifest = json.loads((local / MANIFEST).read_text())
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    table: dict[str, dict[str, Any]] = {}
    for p in _suite_files(local):
        rel = p.relative_to(local).as_posix()
        data = p.read_bytes()
        fs.makedirs(f"{root}/{rel}".rsplit("/", 1)[0], exist_ok=True)
        put_whole(fs, f"{root}/{rel}", data)
        table[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    manifest["files"] = table
    put_whole(fs, f"{root}/{MANIFEST}", (json.dumps(manifest, indent=1) + "\n").encode())
    return dict(manifest)


def fetch_suite(url: str, local: str | Path) -> Path:
    """Download the suite published at `url` into the folder `local` (replaced whole), checking
    every file against the manifest's sha256; a mismatch or a missing file is a `RemoteError`."""
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    try:
        manifest = json.loads(fs.cat_file(f"{root}/{MANIFEST}"))
    except FileNotFoundError:
        raise RemoteError(f"no published suite at {url} (no {MANIFEST})") from None
    if "files" not in manifest:
        raise RemoteError(f"{url}/{MANIFEST} lists no files: not published by publish_suite")
    local = Path(local)
    tmp = Path(temp_path(local))
    tmp.mkdir(parents=True)
    try:
        for rel, want in manifest["files"].items():
            try:
                data = fs.cat_file(f"{root}/{rel}")
            except FileNotFoundError:
                raise RemoteError(f"{url}/{rel} is listed in the manifest but missing") from None
            if hashlib.sha256(data).hexdigest() != want["sha256"]:
                raise RemoteError(f"{url}/{rel} does not match its sha256 in the manifest")
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if local.exists():
            shutil.rmtree(local)
        os.replace(tmp, local)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return local
