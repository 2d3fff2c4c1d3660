"""Activations straight from the model into a trainer, with no store in between.

For when disk is short and the hyper-parameters are known: each token block runs through the model
once (stopping after the deepest layer asked for) and its masked rows are cut into training batches
of exactly `batch_size` rows. Rows are in corpus order (documents are shuffled with the seed, rows
within a batch are not), so resuming at batch k is exact: skip k·batch_size stored positions, which
costs tokenization only, then run the model from the block that holds the next row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from lmscope.activations.harvest import read_sites
from lmscope.data import TokenBatches
from lmscope.model import LoadedModel, SiteModel, parse_sites


def stream_batches(
    loaded: LoadedModel,
    sites: Sequence[str],
    batch_size: int,
    *,
    corpus: str = "default",
    seq_len: int = 128,
    split: str = "train",
    seed: int = 0,
    model_batch: int = 8,
) -> Callable[[int], Iterator[dict[str, torch.Tensor]]]:
    """A data factory `start_batch -> iterator of {site: [batch_size, d]}` fed by the model.

    >>> data = stream_batches(load_model("tiny-gpt2"), ["L1.resid_post"], 4096)
    >>> next(data(0))["L1.resid_post"].shape   # torch.Size([4096, 64])
    """
    model = SiteModel(loaded)
    names = [str(s) for s in parse_sites(list(sites), model.n_layers)]

    def factory(start_batch: int) -> Iterator[dict[str, torch.Tensor]]:
        skip = start_batch * batch_size
        blocks = TokenBatches(
            corpus,
            loaded.tokenizer,
            seq_len=seq_len,
            batch_size=model_batch,
            split=split,
            seed=seed,
        )
        pending: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        have = 0
        for block in blocks:
            if skip >= block.n_tokens:  # already trained on: no forward pass needed
                skip -= block.n_tokens
                continue
            acts = read_sites(model, block.input_ids.to(loaded.device), names)
            mask = block.mask.to(loaded.device)
            for n in names:
                pending[n].append(acts[n][mask][skip:].float().cpu())
            have += block.n_tokens - skip
            skip = 0
            while have >= batch_size:
                rows = {n: torch.cat(pending[n]) for n in names}
                yield {n: r[:batch_size] for n, r in rows.items()}
                pending = {n: [r[batch_size:]] for n, r in rows.items()}
                have -= batch_size

    return factory
