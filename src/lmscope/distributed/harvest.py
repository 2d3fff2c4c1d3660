"""A harvest split by data across ranks: disjoint parts of one store, joined by one manifest.

The token blocks of a run are fixed by the corpus, tokenizer and `HarvestConfig` alone. Every rank
counts them (tokenization only, no model: ~0.7 M tokens/s per core with Gemma's tokenizer), takes a
contiguous range of blocks and harvests it into its own part, `<out>/parts/rank-NNNNN/`, numbering
sequences as the whole run would. When every part is complete, rank 0 writes `<out>/manifest.json`
listing the parts' shards in block order: the same rows, in the same order, as a one-process harvest
(only shard boundaries, and float64 rounding of the summed statistics, differ). That manifest is
the commit point: until it exists there is no store at `<out>`, and a rerun resumes each part.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import fsspec

from lmscope.activations.harvest import HarvestConfig, harvest, token_batches
from lmscope.activations.store import SEQUENCES, TOKENS, ActivationStore
from lmscope.atomic import put_whole
from lmscope.distributed.context import DistributedError, Ranks
from lmscope.errors import StoreError
from lmscope.model import LoadedModel, load_model

PARTS = "parts"


def part_url(out: str, rank: int) -> str:
    return f"{out.rstrip('/')}/{PARTS}/rank-{rank:05d}"


def count_blocks(cfg: HarvestConfig, loaded: LoadedModel) -> int:
    """How many token blocks a harvest of `cfg` feeds the model (the last may be trimmed)."""
    return sum(1 for _ in token_batches(cfg, loaded))


def split_range(n: int, world: int) -> list[tuple[int, int]]:
    """`[0, n)` in `world` contiguous pieces whose sizes differ by at most one."""
    return [(r * n // world, (r + 1) * n // world) for r in range(world)]


def harvest_parts(
    cfg: HarvestConfig,
    out: str,
    ranks: Ranks,
    *,
    resume: bool = True,
    loaded: LoadedModel | None = None,
    progress: bool = True,
) -> ActivationStore:
    """`harvest(cfg, out)` with the blocks split among `ranks`; every rank calls it.

    A world of one is a plain `harvest`. Every rank must see `out` (a shared file system or an
    object store), so `memory://` works only in one process.

    >>> with session() as ranks: store = harvest_parts(HarvestConfig(tokens=10**6), "s3://b/acts", ranks)
    """
    if ranks.world == 1:
        return harvest(cfg, out, resume=resume, loaded=loaded, progress=progress)
    if out.startswith("memory://"):
        raise DistributedError("memory:// stores live in one process; give the ranks a shared URL")
    fs, root = fsspec.core.url_to_fs(out)
    if fs.exists(f"{root.rstrip('/')}/manifest.json"):  # every rank sees the same answer
        if not resume:
            raise StoreError(f"a store exists at {out}; drop --restart to keep it, or a new URL")
        return ActivationStore(out)
    if loaded is None:
        loaded = load_model(cfg.model, device=ranks.device(cfg.device), dtype=cfg.model_dtype)
    n = count_blocks(cfg, loaded)
    if n < ranks.world:
        raise DistributedError(f"{n} token blocks cannot feed {ranks.world} ranks; use fewer ranks")
    part = split_range(n, ranks.world)[ranks.rank]
    rank_cfg = replace(cfg, device=ranks.device(cfg.device))
    harvest(
        rank_cfg,
        part_url(out, ranks.rank),
        resume=resume,
        loaded=loaded,
        progress=progress and ranks.leader,
        block_range=part,
    )
    ranks.barrier()  # every part complete
    if ranks.leader:
        merge_parts(out, [part_url(out, r) for r in range(ranks.world)])
    ranks.barrier()  # the manifest is written
    return ActivationStore(out)


def _read_manifest(fs: Any, url: str) -> dict[str, Any]:
    _, root = fsspec.core.url_to_fs(url)
    try:
        m: dict[str, Any] = json.loads(fs.cat_file(f"{root.rstrip('/')}/manifest.json"))
    except FileNotFoundError:
        raise StoreError(f"part {url} has no manifest.json: its rank never started") from None
    if not m["complete"]:
        raise StoreError(f"part {url} is incomplete; rerun the harvest to resume it")
    return m


def merge_parts(out: str, parts: list[str]) -> dict[str, Any]:
    """Write `<out>/manifest.json` joining complete part stores that hold consecutive block ranges
    of one harvest (`block_range`); returns it. Shard files stay where the parts wrote them."""
    fs, root = fsspec.core.url_to_fs(out)
    root = root.rstrip("/")
    ms = [_read_manifest(fs, p) for p in parts]
    first, meta = ms[0], {k: v for k, v in ms[0]["meta"].items() if k != "blocks"}
    at = 0
    for url, m in zip(parts, ms):
        same = all(m[k] == first[k] for k in ("model", "dtype", "shard_rows"))
        same &= {s: v["d"] for s, v in m["sites"].items()} == {
            s: v["d"] for s, v in first["sites"].items()
        }
        if not same or {k: v for k, v in m["meta"].items() if k != "blocks"} != meta:
            raise StoreError(f"part {url} was harvested with other settings than {parts[0]}")
        lo, hi = m["meta"].get("blocks", (-1, -1))
        if lo != at or m["resume"]["blocks"] != hi - lo:
            raise StoreError(f"part {url} holds blocks {lo}..{hi}, not the next ones from {at}")
        at = hi
    prefix = [p[len(out.rstrip("/")) + 1 :] if p.startswith(out) else p for p in parts]

    def shards(section: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**sh, "file": f"{pre}/{sh['file']}"} for pre, sec in zip(prefix, section)
                for sh in sec["shards"]]  # fmt: skip

    seq = next((m[SEQUENCES] for m in ms if m[SEQUENCES]["seq_len"] is not None), first[SEQUENCES])
    now = datetime.now(UTC).isoformat(timespec="seconds")
    sites = {}
    for s, v in first["sites"].items():
        sums = [sum(col) for col in zip(*(m["sites"][s]["sum"] for m in ms))]
        sites[s] = {"d": v["d"], "sum_sq_norm": sum(m["sites"][s]["sum_sq_norm"] for m in ms),
                    "sum": sums, "shards": shards([m["sites"][s] for m in ms])}  # fmt: skip
    merged = {
        **{k: first[k] for k in ("format", "version", "model", "dtype", "shard_rows")},
        "rows": sum(m["rows"] for m in ms), "complete": True, "created": now, "updated": now,
        "resume": {k: sum(int(m["resume"][k]) for m in ms) for k in ("blocks", "rows", "sequences")},
        "sites": sites,
        TOKENS: {**first[TOKENS], "shards": shards([m[TOKENS] for m in ms])},
        SEQUENCES: {**seq, "rows": sum(m[SEQUENCES]["rows"] for m in ms),
                    "shards": shards([m[SEQUENCES] for m in ms])},
        "meta": meta,
        PARTS: prefix,
    }  # fmt: skip
    put_whole(fs, f"{root}/manifest.json", json.dumps(merged, indent=1).encode())
    return merged
