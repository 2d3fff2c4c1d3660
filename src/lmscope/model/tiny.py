"""Tiny random models of the real architectures, for tests: built offline in milliseconds, deterministic.

Each is the real transformers class (Gemma3ForCausalLM, Gemma2ForCausalLM, LlamaForCausalLM,
GPT2LMHeadModel) with 4 layers, d_model 64 and 4 heads of 16 dims, sharing one small byte-level BPE
tokenizer (trained in memory on a fixed paragraph) with `<pad>`=0, `<eos>`=1, `<bos>`=2 as in Gemma.
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from lmscope.errors import ModelError
from lmscope.model.loading import LoadedModel

TINY_ARCHS = ("gemma3", "gemma2", "llama", "gpt2")
N_LAYERS, D_MODEL, N_HEADS, N_KV_HEADS, D_HEAD, D_MLP = 4, 64, 4, 2, 16, 128
MAX_POSITIONS = 512
SLIDING_WINDOW = 8  # small, so that sequences in tests are longer than the window
VOCAB_SIZE = 384
PAD, EOS, BOS = 0, 1, 2
_SPECIALS = ["<pad>", "<eos>", "<bos>"]
_TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A language model reads text one token at a time and
predicts the next one. Sparse autoencoders break its activations into features that people can read:
a feature for French, one for Python code, one for numbers, one for the end of a sentence.
def add(a, b):
    return a + b
print(add(2, 3))  # 5
Paris is the capital of France; Berlin is the capital of Germany; Rome is the capital of Italy.
"""


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A 384-token byte-level BPE tokenizer that adds `<bos>` in front of every text, as Gemma's does."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, so no text is unknown
        show_progress=False,
    )
    # Training is deterministic (checked across processes); three copies give merges enough counts.
    tok.train_from_iterator([_TRAINING_TEXT] * 3, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS)]
    )
    assert tok.get_vocab_size() == VOCAB_SIZE
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def tiny_model(arch: str, seed: int = 0) -> LoadedModel:
    """A random-init model of `arch` (gemma3, gemma2, llama, gpt2) on cpu in float32, eval mode.

    >>> loaded = tiny_model("gemma3", seed=1)
    """
    if arch not in TINY_ARCHS:
        raise ModelError(f"unknown tiny architecture {arch!r}; use one of: {', '.join(TINY_ARCHS)}")
    # Seed a private copy of the RNG so that building a model leaves the caller's random state alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build(arch)
        # HF initialises norm weights to the identity; random ones make a forgotten norm weight
        # (e.g. in a logit lens or an identity test) show up as a test failure.
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith(
                    "RMSNorm"
                ):
                    for param in module.parameters():
                        param.add_(torch.randn_like(param) * 0.1)
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=tiny_tokenizer(),
        name=f"tiny-{arch}",
        arch=arch,
        device=torch.device("cpu"),
        dtype=torch.float32,
    )


def _build(arch: str) -> PreTrainedModel:
    # Eager attention: the same numbers on every machine and batch shape, which exact tests need.
    common: dict[str, Any] = dict(
        vocab_size=VOCAB_SIZE,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        attn_implementation="eager",
    )
    if arch == "gpt2":
        return GPT2LMHeadModel(
            GPT2Config(
                n_embd=D_MODEL,
                n_layer=N_LAYERS,
                n_head=N_HEADS,
                n_positions=MAX_POSITIONS,
                **common,
            )
        )
    shape: dict[str, Any] = dict(
        hidden_size=D_MODEL,
        intermediate_size=D_MLP,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV_HEADS,  # grouped-query attention, as the real models
        head_dim=D_HEAD,
        max_position_embeddings=MAX_POSITIONS,
        **common,
    )
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **shape))
    gemma: dict[str, Any] = dict(
        query_pre_attn_scalar=D_HEAD, sliding_window=SLIDING_WINDOW, **shape
    )
    if arch == "gemma2":
        return Gemma2ForCausalLM(Gemma2Config(**gemma))  # alternates sliding and global layers
    # Gemma 3 270M repeats five sliding layers then one global; four layers keep both kinds.
    layer_types = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    return Gemma3ForCausalLM(Gemma3TextConfig(layer_types=layer_types, **gemma))
