"""Interventions and attribution: splice SAEs into the model, steer, clamp and ablate latents,
generate with them, and attribute a logit to every active latent (docs/intervene.md)."""

from lmscope.intervene.attribution import AttributionGraph, attribute, target_ids
from lmscope.intervene.generate import (
    compare,
    encode_prompt,
    generate,
    generate_ids,
    next_token_logits,
)
from lmscope.intervene.hooks import (
    Ablate,
    Clamp,
    Hooks,
    Intervention,
    Splice,
    Steer,
    intervene,
    latent_means,
)

__all__ = [
    "Ablate",
    "AttributionGraph",
    "Clamp",
    "Hooks",
    "Intervention",
    "Splice",
    "Steer",
    "attribute",
    "compare",
    "encode_prompt",
    "generate",
    "generate_ids",
    "intervene",
    "latent_means",
    "next_token_logits",
    "target_ids",
]
