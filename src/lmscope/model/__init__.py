"""The model stage: load a causal LM (`loading`), name and hook its sites (`sites`), tiny test models (`tiny`)."""

from lmscope.model.loading import DEFAULT_MODEL, LoadedModel, cache_root, load_model
from lmscope.model.sites import KINDS, RunResult, Site, SiteModel, decoder_layers, parse_sites
from lmscope.model.tiny import TINY_ARCHS, tiny_model, tiny_tokenizer

__all__ = [
    "DEFAULT_MODEL",
    "KINDS",
    "TINY_ARCHS",
    "LoadedModel",
    "RunResult",
    "Site",
    "SiteModel",
    "cache_root",
    "decoder_layers",
    "load_model",
    "parse_sites",
    "tiny_model",
    "tiny_tokenizer",
]
