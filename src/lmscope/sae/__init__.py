"""Sparse autoencoders: one module per architecture, a registry, folding, file formats.

Importing this package registers every architecture, so ``build_sae`` knows them all.
"""

from lmscope.sae.base import (
    ARCHITECTURES,
    SAE,
    LossOutput,
    SAEConfig,
    build_sae,
    check_compatible,
    sae_class,
)
from lmscope.sae.formats import FORMATS, detect_format, export_sae, import_sae, load_sae, save_sae
from lmscope.sae.jumprelu import JumpReLUSAE
from lmscope.sae.matryoshka import MatryoshkaBatchTopKSAE
from lmscope.sae.relu import ReLUSAE
from lmscope.sae.topk import BatchTopKSAE, TopKSAE
from lmscope.sae.transcoder import JumpReLUTranscoder

__all__ = [
    "ARCHITECTURES",
    "FORMATS",
    "SAE",
    "BatchTopKSAE",
    "JumpReLUSAE",
    "JumpReLUTranscoder",
    "LossOutput",
    "MatryoshkaBatchTopKSAE",
    "ReLUSAE",
    "SAEConfig",
    "TopKSAE",
    "build_sae",
    "check_compatible",
    "detect_format",
    "export_sae",
    "import_sae",
    "load_sae",
    "sae_class",
    "save_sae",
]
