"""Steer from a graph: clamp or ablate transcoder features in the *real* model, see the new logits.

Each edited feature (layer, position, latent) is re-encoded from the live ``mlp_in`` and its
contribution moved to the asked value inside ``mlp_out``: ``mlp_out + (v − a)·W_dec[latent]``,
the transcoder's error and every other feature kept. Nothing is frozen here: later layers,
attention and norms respond, which is how a graph's prediction is tested on the model itself.

>>> logits = clamp_features(loaded, transcoders, ids, {(5, 12, 301): 0.0})  # ablate F5.12.301
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lmscope.circuits.replacement import check_transcoders
from lmscope.errors import CircuitError
from lmscope.model import LoadedModel, SiteModel
from lmscope.model.sites import ReplaceFn, Site
from lmscope.sae import SAE

Feature = tuple[int, int, int]  # layer, position, latent


def clamp_features(
    loaded: LoadedModel,
    transcoders: Sequence[SAE],
    ids: Tensor,
    values: Mapping[Feature, float],
) -> Tensor:
    """Next-token logits [V] at the last position with each feature of ``values`` set to its value."""
    sites = SiteModel(loaded)
    tcs = check_transcoders(sites, transcoders)
    t = ids.shape[1]
    by_layer: dict[int, list[tuple[int, int, float]]] = {}
    for (layer, pos, latent), v in values.items():
        if not (0 <= layer < len(tcs) and 0 <= pos < t and 0 <= latent < tcs[layer].cfg.d_sae):
            raise CircuitError(
                f"feature {(layer, pos, latent)} is out of range: layers 0-{len(tcs) - 1}, "
                f"positions 0-{t - 1}, latents 0-{tcs[0].cfg.d_sae - 1}"
            )
        by_layer.setdefault(layer, []).append((pos, latent, float(v)))
    mlp_in: dict[int, Tensor] = {}

    def read_in(layer: int) -> ReplaceFn:
        def fn(x: Tensor) -> Tensor:
            mlp_in[layer] = x
            return x

        return fn

    def edit_out(layer: int) -> ReplaceFn:
        tc = tcs[layer]

        def fn(x: Tensor) -> Tensor:
            out = x.clone()
            for pos, latent, v in by_layer[layer]:
                a = tc.encode(mlp_in[layer][:, pos].to(tc.W_dec.dtype))[:, latent]
                out[:, pos] += ((v - a)[:, None] * tc.W_dec[latent]).to(x.dtype)
            return out

        return fn

    replace: dict[str | Site, ReplaceFn] = {}
    for layer in by_layer:
        replace[f"L{layer}.mlp_in"] = read_in(layer)
        replace[f"L{layer}.mlp_out"] = edit_out(layer)
    with torch.no_grad():
        logits = sites.run(ids.to(loaded.device), replace=replace).logits
    assert logits is not None
    return logits[0, -1]


__all__ = ["Feature", "clamp_features"]
