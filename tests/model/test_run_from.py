"""`SiteModel.run_from` runs only the layers from L on, given resid_pre[L], and equals a full run."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

from lmscope.errors import SiteError
from lmscope.model import KINDS, LoadedModel, SiteModel

Batch = tuple[Tensor, Tensor]


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One torch thread: on a busy shared machine two threads wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def long_batch(tiny: LoadedModel) -> Batch:
    """Right-padded sequences longer than the tiny Gemmas' sliding window (8), so local layers matter."""
    texts = [
        "The capital of France is Paris, and the capital of Italy is Rome. " * 2,
        "def add(a, b):\n    return a + b",
    ]
    batch = tiny.tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
    assert batch.input_ids.shape[1] > 16
    return batch.input_ids, batch.attention_mask


def clean_streams(sm: SiteModel, batch: Batch) -> tuple[dict[str, Tensor], Tensor]:
    names = [f"L{i}.resid_pre" for i in range(sm.n_layers)] + [f"L{sm.n_layers - 1}.resid_post"]
    with torch.no_grad():
        out = sm.run(*batch, read=names)
    assert out.logits is not None
    return out.acts, out.logits


def resid_in(sm: SiteModel, acts: dict[str, Tensor], layer: int) -> Tensor:
    last = f"L{sm.n_layers - 1}.resid_post"
    return acts[last] if layer == sm.n_layers else acts[f"L{layer}.resid_pre"]


def test_from_any_layer_the_clean_stream_gives_the_clean_logits(
    tiny: LoadedModel, long_batch: Batch
) -> None:
    sm = SiteModel(tiny)
    acts, logits = clean_streams(sm, long_batch)
    for layer in range(sm.n_layers + 1):
        with torch.no_grad():
            out = sm.run_from(layer, resid_in(sm, acts, layer), long_batch[1])
        assert out.logits is not None
        torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_a_replacement_from_its_own_layer_equals_the_full_forward(
    tiny: LoadedModel, long_batch: Batch, kind: str
) -> None:
    sm = SiteModel(tiny)
    acts, _ = clean_streams(sm, long_batch)
    for layer in range(sm.n_layers):
        site = f"L{layer}.{kind}"
        later = f"L{sm.n_layers - 1}.mlp_out"

        def fn(x: Tensor) -> Tensor:
            return 1.5 * x + 0.1

        with torch.no_grad():
            full = sm.run(*long_batch, read=[later], replace={site: fn})
            fast = sm.run_from(
                layer, acts[f"L{layer}.resid_pre"], long_batch[1], read=[later], replace={site: fn}
            )
        assert full.logits is not None and fast.logits is not None
        assert not torch.allclose(full.logits, clean_streams(sm, long_batch)[1])
        torch.testing.assert_close(fast.logits, full.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast.acts[later], full.acts[later], rtol=1e-5, atol=1e-5)


def test_the_layers_below_are_not_computed(tiny: LoadedModel, long_batch: Batch) -> None:
    sm = SiteModel(tiny)
    acts, _ = clean_streams(sm, long_batch)
    computed: list[int] = []
    # A skipped layer is still called (it passes its input through) but its attention never runs.
    attn = [layer.get_submodule(sm.adapter.o_proj) for layer in sm.layers]
    handles = [
        m.register_forward_pre_hook(lambda *_, i=i: computed.append(i)) for i, m in enumerate(attn)
    ]
    try:
        with torch.no_grad():
            sm.run_from(2, acts["L2.resid_pre"], long_batch[1])
    finally:
        for h in handles:
            h.remove()
    assert computed == list(range(2, sm.n_layers))


def test_the_model_is_restored_after_run_from_even_when_it_raises(
    tiny: LoadedModel, long_batch: Batch
) -> None:
    sm = SiteModel(tiny)
    acts, logits = clean_streams(sm, long_batch)

    def boom(x: Tensor) -> Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        sm.run_from(3, acts["L3.resid_pre"], long_batch[1], replace={"L3.mlp_out": boom})
    assert all("forward" not in layer.__dict__ for layer in sm.layers)
    with torch.no_grad():
        again = sm.run(*long_batch)
    assert again.logits is not None
    torch.testing.assert_close(again.logits, logits, rtol=0, atol=0)


def test_reads_without_logits_stop_after_the_last_layer_read(
    tiny_gemma3: LoadedModel, tiny_batch_gemma3: Batch
) -> None:
    sm = SiteModel(tiny_gemma3)
    acts, _ = clean_streams(sm, tiny_batch_gemma3)
    with torch.no_grad():
        out = sm.run_from(1, acts["L1.resid_pre"], read=["L2.resid_pre"], return_logits=False)
    assert out.logits is None
    torch.testing.assert_close(out.acts["L2.resid_pre"], acts["L2.resid_pre"])


def test_bad_layers_and_earlier_sites_are_site_errors(
    tiny_gemma3: LoadedModel, tiny_batch_gemma3: Batch
) -> None:
    sm = SiteModel(tiny_gemma3)
    resid = torch.zeros(1, 4, sm.d_model)
    with pytest.raises(SiteError, match="valid: 0-4"):
        sm.run_from(5, resid)
    with pytest.raises(SiteError, match="L1.resid_post come before run_from layer 2"):
        sm.run_from(2, resid, read=["L1.resid_post"])


@pytest.fixture(scope="module")
def tiny_batch_gemma3(tiny_gemma3: LoadedModel) -> Batch:
    ids = tiny_gemma3.tokenizer(["a tiny test sentence for the run"], return_tensors="pt")
    return ids.input_ids, ids.attention_mask
