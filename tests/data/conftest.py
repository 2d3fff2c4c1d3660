"""A small byte-level tokenizer and a small corpus, so data tests need neither a model nor the network."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "    indented first line\nand a second line\n\nafter a blank line",
    "Ünïcödé — naïve café, 東京, emoji 🦊.",
    "def f(x):\n    return x + 1",
    "A literal <eos> and <bos> in the text are just text.",
] + [
    f"Document number {i}: " + " ".join(f"word{j * i % 17}" for j in range(i % 23 + 1))
    for i in range(45)
]


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(DOCS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


@pytest.fixture
def docs() -> list[str]:
    return list(DOCS)
