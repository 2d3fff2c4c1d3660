"""`interpret`: one streaming pass over N tokens serves every SAE of a suite, then the decoder-only
analyses (logit lens, neighbours), all written to `<suite>/features.db`.

Each token block runs the model once, stopping after the deepest site the suite needs; each SAE
encodes its site and folds the latents into its `LatentStats`. The block's sequences go straight to
the (temp) database, so memory does not grow with N.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lmscope.activations.harvest import read_sites
from lmscope.data import TokenBatches, TokenBlock
from lmscope.interp import InterpError
from lmscope.interp.db import FeatureDBWriter
from lmscope.interp.explain.store import carry_over
from lmscope.interp.features import LatentStats, StatsConfig
from lmscope.interp.lens import logit_lens, nearest, residual_directions
from lmscope.model import LoadedModel, SiteModel
from lmscope.sae import SAE
from lmscope.suite import Suite


@dataclass
class InterpretConfig:
    """What `lmscope interpret` reads and keeps. Corpus and sequence length come from the suite."""

    tokens: int = 50_000
    batch_size: int = 8
    split: str = "all"
    seed: int = 0
    stats: StatsConfig = field(default_factory=StatsConfig)
    n_logits: int = 10  # tokens per logit-lens list
    n_neighbours: int = 10  # nearest latents within the SAE and in the layers next to it
    device: str | None = None


def suite_fingerprint(suite: Suite) -> str:
    """What ties a database to its suite: the manifest's creation time and model."""
    return json.dumps([suite.model, suite.manifest.get("created")])


def _batches(suite: Suite, tokenizer: Any, cfg: InterpretConfig) -> TokenBatches:
    return TokenBatches(suite.corpus, tokenizer, seq_len=suite.seq_len, batch_size=cfg.batch_size,
                        split=cfg.split, seed=cfg.seed, max_tokens=cfg.tokens)  # fmt: skip


def check_corpus_size(suite: Suite, tokenizer: Any, cfg: InterpretConfig) -> None:
    """Fail before the model runs when the corpus holds fewer than `cfg.tokens` tokens (this only
    tokenizes: ~1.5 s per million tokens)."""
    if cfg.tokens < 1:
        raise InterpError(f"--tokens must be at least 1, got {cfg.tokens}")
    batches = _batches(suite, tokenizer, cfg)
    for _ in batches:
        pass
    if batches.stream_tokens < cfg.tokens:
        raise InterpError(
            f"the corpus {suite.corpus!r} ({cfg.split} split) has only {batches.stream_tokens:,} "
            f"tokens; ask for --tokens {batches.stream_tokens} or fewer"
        )


def _blocks(batches: TokenBatches, tokens: int) -> Iterator[TokenBlock]:
    """The blocks, the last one's mask cut so that exactly `tokens` positions count."""
    seen = 0
    for block in batches:
        mask = block.mask
        if seen + block.n_tokens > tokens:
            flat = mask.clone().view(-1)
            on = flat.nonzero().squeeze(1)
            flat[on[tokens - seen :]] = False
            mask = flat.view_as(mask)
        seen += int(mask.sum())
        yield TokenBlock(block.input_ids, mask)


def token_blocks(suite: Suite, tokenizer: Any, cfg: InterpretConfig) -> Iterator[TokenBlock]:
    """The blocks `interpret` reads: the suite's corpus, exactly `cfg.tokens` counted positions."""
    return _blocks(_batches(suite, tokenizer, cfg), cfg.tokens)


def _layer_pairs(entries: list[dict[str, Any]]) -> dict[str, tuple[str | None, str | None]]:
    """Each SAE's partner one layer down and one up: same site kind (and output kind), same width
    when there is one, else the first by width."""

    def partner(e: dict[str, Any], layer: int) -> str | None:
        out_kind = (e.get("out_site") or ".").split(".")[1]
        same = [o for o in entries if o["layer"] == layer and o["kind"] == e["kind"]
                and (o.get("out_site") or ".").split(".")[1] == out_kind]  # fmt: skip
        same.sort(key=lambda o: (o["d_sae"] != e["d_sae"], o["d_sae"], o["name"]))
        return same[0]["name"] if same else None

    return {e["name"]: (partner(e, e["layer"] - 1), partner(e, e["layer"] + 1)) for e in entries}


def collect(
    model: SiteModel,
    modules: dict[str, SAE],
    entries: list[dict[str, Any]],
    blocks: Iterable[TokenBlock],
    stats: dict[str, LatentStats],
    *,
    on_block: Callable[[int, TokenBlock], None] | None = None,
) -> None:
    """The streaming pass: one forward per block (stopping after the deepest site) feeds every
    SAE, whose latents go into its `LatentStats`; `on_block(first_sequence, block)` after each."""
    sites = list(dict.fromkeys(e["site"] for e in entries))
    seq = 0
    with torch.inference_mode():
        for block in blocks:
            acts = read_sites(model, block.input_ids.to(model.loaded.device), sites)
            for e in entries:
                x = acts[e["site"]].float()
                f = modules[e["name"]].encode(x.reshape(-1, x.shape[-1]))
                stats[e["name"]].update(f.view(*x.shape[:2], -1), block.input_ids, block.mask, seq)
            if on_block is not None:
                on_block(seq, block)
            seq += len(block.input_ids)


def interpret(
    suite: Suite | str | Path,
    cfg: InterpretConfig | None = None,
    *,
    saes: list[str] | None = None,
    loaded: LoadedModel | None = None,
    progress: bool = True,
) -> Path:
    """Interpret every SAE of `suite` (or those named in `saes`) over `cfg.tokens` tokens of the
    suite's corpus; returns the path of the database written.

    >>> interpret("runs/suite", InterpretConfig(tokens=100_000))
    """
    cfg = cfg or InterpretConfig()
    suite = suite if isinstance(suite, Suite) else Suite.open(suite)
    suite.require_site_saes("interpret")
    names = [suite.resolve(s) for s in saes] if saes else suite.names
    entries = [e for e in suite.entries if e["name"] in names]
    loaded = loaded or suite.load_model(device=cfg.device)
    if loaded.name != suite.model:
        raise InterpError(f"suite {suite.path} is of {suite.model!r}, but the model given is {loaded.name!r}")  # fmt: skip
    check_corpus_size(suite, loaded.tokenizer, cfg)
    model = SiteModel(loaded)
    modules = {e["name"]: suite.load_sae(e["name"], device=loaded.device).eval() for e in entries}
    stats = {e["name"]: LatentStats(e["d_sae"], cfg.stats, device=loaded.device, seed=cfg.seed + i)
             for i, e in enumerate(entries)}  # fmt: skip
    ids = {e["name"]: i for i, e in enumerate(entries)}
    with FeatureDBWriter(suite.features_db) as db:
        bar = tqdm(total=cfg.tokens, unit="tok", unit_scale=True, disable=not progress,
                   desc=f"interpret {len(entries)} SAEs")  # fmt: skip

        def on_block(seq: int, block: TokenBlock) -> None:
            db.add_sequences(seq, block.input_ids)
            bar.update(block.n_tokens)

        with bar:
            collect(model, modules, entries, token_blocks(suite, loaded.tokenizer, cfg), stats,
                    on_block=on_block)  # fmt: skip
        pairs = _layer_pairs(entries)
        for e in tqdm(entries, desc="logit lens, neighbours", disable=not progress):
            name = e["name"]
            prev, nxt = pairs[name]
            db.add_sae(ids[name], e, stats[name].tokens, ids.get(prev or ""), ids.get(nxt or ""))
            db.add_stats(ids[name], stats[name], suite.seq_len)
            db.add_samples(ids[name], stats[name], suite.seq_len)
            _add_directions(db, model, ids, e, modules, pairs[name], cfg)
        db.set_meta({"suite": suite_fingerprint(suite), "model": suite.model, "corpus": suite.corpus,
                     "split": cfg.split, "seed": cfg.seed, "seq_len": suite.seq_len,
                     "tokens": cfg.tokens, "config": json.dumps(asdict(cfg)),
                     "created": datetime.now(UTC).isoformat(timespec="seconds")})  # fmt: skip
        # same suite and settings, so the same records: the old database's labels still hold
        carry_over(suite.features_db, db.conn)
        return db.finish(lambda token_ids: [str(loaded.tokenizer.decode([i])) for i in token_ids])


def _add_directions(db: FeatureDBWriter, model: SiteModel, ids: dict[str, int], e: dict[str, Any],
                    modules: dict[str, Any], pair: tuple[str | None, str | None],
                    cfg: InterpretConfig) -> None:  # fmt: skip
    name = e["name"]
    w_dec = modules[name].W_dec.detach().float()
    # a transcoder's decoder writes its output site (mlp_out); an SAE's its own site
    kind = (e.get("out_site") or e["site"]).split(".", 1)[1]
    directions = residual_directions(model, kind, e["layer"], w_dec)
    if directions is not None:
        db.add_lens(ids[name], *logit_lens(model, directions, cfg.n_logits))
    db.add_neighbours(ids[name], "same", ids[name], *nearest(w_dec, None, cfg.n_neighbours))
    for relation, other in zip(("prev", "next"), pair):
        if other is not None:
            w_other = modules[other].W_dec.detach()
            db.add_neighbours(ids[name], relation, ids[other], *nearest(w_dec, w_other, cfg.n_neighbours))  # fmt: skip
