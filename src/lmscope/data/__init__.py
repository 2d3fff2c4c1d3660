"""Corpus → tokens: documents from the default corpus, files or Hugging Face, packed into BOS-led blocks."""

from lmscope.data.corpus import (
    FILE_FORMATS,
    corpus_fingerprint,
    iter_documents,
    split_rest_sections,
)
from lmscope.data.tokens import (
    SPLITS,
    TokenBatches,
    TokenBlock,
    in_eval_split,
    pack_tokens,
    shuffle_documents,
    special_ids,
    split_documents,
    tokenize,
    tokenize_reference,
)

__all__ = [
    "FILE_FORMATS",
    "SPLITS",
    "TokenBatches",
    "TokenBlock",
    "corpus_fingerprint",
    "in_eval_split",
    "iter_documents",
    "pack_tokens",
    "shuffle_documents",
    "special_ids",
    "split_documents",
    "split_rest_sections",
    "tokenize",
    "tokenize_reference",
]
