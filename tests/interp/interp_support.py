"""Helpers of the interp tests: the interpretation settings, and brute-force latents of the same tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmscope.data import TokenBatches
from lmscope.interp.features import StatsConfig
from lmscope.interp.pipeline import InterpretConfig
from lmscope.model import SiteModel, tiny_model
from lmscope.suite import Suite

CFG = InterpretConfig(tokens=1500, batch_size=4, stats=StatsConfig(k=5, window=3, bands=3, per_band=3))  # fmt: skip


@dataclass
class Interpreted:
    suite: Suite
    cfg: InterpretConfig
    ids: torch.Tensor  # [n_seq, T] token ids of every sequence read
    mask: torch.Tensor  # [n_seq, T] positions that count
    latents: dict[str, torch.Tensor]  # SAE name -> [n_seq, T, d_sae], encode() of every position


def brute_force_latents(suite: Suite, cfg: InterpretConfig) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """Every block the interpretation reads, run through the model and each SAE's `encode`."""
    loaded = tiny_model("gemma3")
    model = SiteModel(loaded)
    saes = {e["name"]: suite.load_sae(e["name"]) for e in suite.entries}
    batches = TokenBatches(suite.corpus, loaded.tokenizer, seq_len=suite.seq_len,
                           batch_size=cfg.batch_size, split=cfg.split, seed=cfg.seed,
                           max_tokens=cfg.tokens)  # fmt: skip
    ids, masks, latents = [], [], {name: [] for name in saes}
    with torch.no_grad():
        for block in batches:  # block by block, as interpret runs them
            ids.append(block.input_ids)
            masks.append(block.mask)
            acts = model.run(block.input_ids, read=suite.sites, return_logits=False).acts
            for e in suite.entries:
                x = acts[e["site"]]
                f = saes[e["name"]].encode(x.reshape(-1, x.shape[-1])).view(*x.shape[:2], -1)
                latents[e["name"]].append(f)
    mask = torch.cat(masks)
    flat = mask.view(-1)
    flat[flat.nonzero().squeeze(1)[cfg.tokens :]] = False  # exactly cfg.tokens positions count
    return torch.cat(ids), mask, {k: torch.cat(v) for k, v in latents.items()}
