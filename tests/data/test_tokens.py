"""Packing, masks, splits, shuffling and resuming of token blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmscope.data import (
    TokenBatches,
    in_eval_split,
    pack_tokens,
    shuffle_documents,
    split_documents,
    tokenize,
    tokenize_reference,
)
from lmscope.errors import CorpusError

SEQ = 16


def rows(blocks) -> torch.Tensor:
    return torch.cat([b.input_ids for b in blocks])


def unpack(ids: torch.Tensor, tokenizer) -> list[str]:
    """Undo packing: drop each row's BOS, join the rows, cut at EOS, drop trailing pads, decode."""
    stream = ids[:, 1:].reshape(-1).tolist()
    while stream and stream[-1] == tokenizer.pad_token_id:
        stream.pop()
    docs, cur = [], []
    for t in stream:
        if t == tokenizer.eos_token_id:
            docs.append(tokenizer.decode(cur))
            cur = []
        else:
            cur.append(t)
    assert cur == []  # the stream ends with the last document's EOS
    return docs


def test_every_sequence_starts_with_bos_and_has_seq_len_tokens(docs, tokenizer):
    blocks = list(TokenBatches(docs, tokenizer, seq_len=SEQ, batch_size=4))
    assert all(b.input_ids.shape[1] == SEQ and b.input_ids.dtype == torch.long for b in blocks)
    assert all(b.input_ids.shape[0] == 4 for b in blocks[:-1])
    assert (rows(blocks)[:, 0] == tokenizer.bos_token_id).all()


def test_mask_is_false_exactly_at_bos_eos_and_pad(docs, tokenizer):
    it = TokenBatches(docs, tokenizer, seq_len=SEQ, batch_size=3, split="all")
    blocks = list(it)
    ids, mask = rows(blocks), torch.cat([b.mask for b in blocks])
    special = torch.tensor([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id])
    assert torch.equal(mask, ~torch.isin(ids, special))
    n_text = sum(len(t) for t in tokenize(docs, tokenizer))
    assert int(mask.sum()) == n_text == it.tokens
    assert int((ids == tokenizer.eos_token_id).sum()) == len(docs)
    assert (ids[:-1] != tokenizer.pad_token_id).all()  # only the last row is padded


def test_decoding_the_blocks_gives_back_the_documents_in_order(docs, tokenizer):
    blocks = TokenBatches(docs, tokenizer, seq_len=SEQ, split="all", seed=None)
    assert unpack(rows(blocks), tokenizer) == docs


def test_shuffled_blocks_hold_every_document_once(docs, tokenizer):
    got = unpack(rows(TokenBatches(docs, tokenizer, seq_len=SEQ, split="all", seed=3)), tokenizer)
    assert got != docs and sorted(got) == sorted(docs)


def test_special_token_strings_in_text_are_not_special(tokenizer):
    ids = tokenize(["a <eos> b <bos> c <pad>"], tokenizer)[0]
    assert not {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id} & set(ids)


def test_split_is_deterministic_disjoint_and_covers_everything():
    texts = [f"document {i}" for i in range(4000)]
    train = list(split_documents(texts, "train", 0.05))
    evals = list(split_documents(texts, "eval", 0.05))
    assert not set(train) & set(evals) and sorted(train + evals) == sorted(texts)
    assert 0.03 < len(evals) / len(texts) < 0.07
    assert evals == [t for t in texts if in_eval_split(t, 0.05)]
    # Pinned: the split must not change between runs, machines or library versions.
    assert evals[:5] == ["document 2", "document 41", "document 42", "document 50", "document 73"]
    assert (
        list(split_documents(texts, "eval", 0.0)) == []
        and len(list(split_documents(texts, "eval", 1.0))) == 4000
    )


def test_same_seed_gives_the_same_blocks_and_another_seed_another_order(docs, tokenizer):
    def ids(seed):
        return rows(TokenBatches(docs, tokenizer, seq_len=SEQ, split="all", seed=seed))

    assert torch.equal(ids(1), ids(1))
    assert not torch.equal(ids(1), ids(2))


def test_a_small_shuffle_buffer_still_yields_a_permutation():
    texts = [str(i) for i in range(100)]
    out = list(shuffle_documents(texts, seed=0, buffer_size=8))
    assert sorted(out) == sorted(texts) and out != texts
    assert out == list(shuffle_documents(texts, seed=0, buffer_size=8))


@pytest.mark.parametrize("skip", [0, 1, 5, 8, 13, 10_000])
def test_skipping_k_sequences_equals_dropping_them(docs, tokenizer, skip):
    full = rows(TokenBatches(docs, tokenizer, seq_len=SEQ, batch_size=4, split="all"))
    skipped = list(TokenBatches(docs, tokenizer, seq_len=SEQ, batch_size=4, split="all", skip=skip))
    assert torch.equal(rows(skipped) if skipped else full[:0], full[skip:])


def test_resuming_at_position_continues_with_the_same_blocks(docs, tokenizer):
    kwargs = dict(seq_len=SEQ, batch_size=4, split="all", seed=7)
    reference = list(TokenBatches(docs, tokenizer, **kwargs))
    first = TokenBatches(docs, tokenizer, **kwargs)
    head = [next(first), next(first), next(first)]
    assert first.position == 12
    rest = list(TokenBatches(docs, tokenizer, skip=first.position, **kwargs))
    assert len(head) + len(rest) == len(reference)
    for got, want in zip(head + rest, reference):
        assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.mask, want.mask)


def test_max_tokens_stops_at_the_sequence_reaching_it_even_when_resuming(docs, tokenizer):
    kwargs = dict(seq_len=SEQ, batch_size=4, split="all", max_tokens=100)
    it = TokenBatches(docs, tokenizer, **kwargs)
    blocks = list(it)
    per_row = torch.cat([b.mask for b in blocks]).sum(1)
    assert it.tokens == int(per_row.sum()) >= 100 > it.tokens - int(per_row[-1])
    resumed = rows(TokenBatches(docs, tokenizer, skip=3, **kwargs))
    assert torch.equal(resumed, rows(blocks)[3:])


def test_empty_splits_and_bad_arguments_raise_corpus_errors(docs, tokenizer):
    with pytest.raises(CorpusError, match="no tokens in split 'eval'"):
        next(TokenBatches(docs, tokenizer, split="eval", eval_fraction=0.0))
    with pytest.raises(CorpusError, match="unknown split 'test'; valid: train, eval, all"):
        TokenBatches(docs, tokenizer, split="test")
    with pytest.raises(CorpusError, match="seq_len must be at least 2"):
        next(TokenBatches(docs, tokenizer, seq_len=1))


def test_default_corpus_gives_blocks(tokenizer):
    block = next(TokenBatches("default", tokenizer, seq_len=32, batch_size=2))
    assert block.input_ids.shape == (2, 32) and block.mask[:, 1:].any()


def test_fast_tokenize_equals_the_reference_path_even_after_truncating_calls(docs, tokenizer):
    tokenizer(docs, truncation=True, max_length=4, padding=True)  # leaves state on the backend
    assert tokenize(docs, tokenizer) == tokenize_reference(docs, tokenizer)
    assert max(map(len, tokenize(docs, tokenizer))) > 4


def test_packing_does_not_depend_on_how_documents_are_batched_for_the_tokenizer(docs, tokenizer):
    def packed(per_call):
        return np.concatenate(list(pack_tokens(docs, tokenizer, SEQ, docs_per_call=per_call)))

    assert np.array_equal(packed(3), packed(1000))


def test_skipping_across_tokenizer_calls_equals_dropping(docs, tokenizer):
    many = [f"{i}: {d}" for i in range(13) for d in docs]  # 650 documents: three tokenizer calls
    kwargs = dict(seq_len=SEQ, batch_size=16, split="all", seed=5)
    full = rows(TokenBatches(many, tokenizer, **kwargs))
    for skip in (500, 1001):
        assert torch.equal(rows(TokenBatches(many, tokenizer, skip=skip, **kwargs)), full[skip:])
