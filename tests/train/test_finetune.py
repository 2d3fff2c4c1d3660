"""The KL phase: top-k + tail KL vs the exact KL, it lowers the spliced KL, resume is exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmscope.model import LoadedModel, SiteModel, tiny_model
from lmscope.sae import SAEConfig, build_sae, load_sae, save_sae
from lmscope.train import TrainConfig, TrainingInterrupted
from lmscope.train.finetune import (
    _normalised,
    clean_topk,
    finetune_suite,
    spliced_kl_loss,
    topk_tail_kl,
)

SITES = ("L1.resid_post", "L0.mlp_out")


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return tiny_model("gemma3")  # our own copy: the KL phase toggles requires_grad


def _suite(tmp: Path, model: LoadedModel, corpus: Path) -> list[Path]:
    """Two poorly trained (random) folded SAEs with a plausible scale, like an MSE phase's."""
    tmp.mkdir(parents=True, exist_ok=True)
    sm = SiteModel(model)
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    acts = sm.run(ids, read=SITES, return_logits=False).acts
    out = []
    for i, site in enumerate(SITES):
        x = acts[site].reshape(-1, sm.site_dim(site))
        c = float((x - x.mean(0)).pow(2).sum(1).mean().sqrt())
        cfg = SAEConfig("jumprelu", d_in=x.shape[1], d_sae=64, site=site, model=model.name,
                        input_scale=c)  # fmt: skip
        sae = build_sae(cfg, generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            sae.b_dec.copy_(x.mean(0) / c)
            sae.threshold.fill_(0.05)
        f = sae.folded()
        f.cfg.training = {"input_scale": c}
        out.append(save_sae(f, tmp / site.replace(".", "-")))
    return out


def _cfg(**kw: object) -> TrainConfig:
    base: dict[str, object] = dict(kl_tokens=16 * 4 * 24, kl_batch_size=4, kl_lr=1e-2,
                                   kl_top_k=8, checkpoint_every=0, progress=False)  # fmt: skip
    return TrainConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_topk_tail_kl_with_k_at_vocab_is_the_exact_kl(model: LoadedModel) -> None:
    sm = SiteModel(model)
    g = torch.Generator().manual_seed(0)
    h_clean = torch.randn(10, sm.site_dim("L1.resid_post"), generator=g)
    h_spliced = h_clean + 0.5 * torch.randn(h_clean.shape, generator=g)
    vocab = sm.unembedding.shape[1]
    cols, clean_v, tail = clean_topk(sm, h_clean, vocab)
    assert len(cols) == vocab and torch.isinf(tail).all()
    lp = torch.log_softmax(sm.unembed(h_clean).double(), -1)
    lq = torch.log_softmax(sm.unembed(h_spliced).double(), -1)
    exact = (lp.exp() * (lp - lq)).sum(-1).mean()
    with torch.no_grad():
        spliced_v = sm.unembed(h_spliced)[:, cols]
    approx = topk_tail_kl(clean_v, tail, spliced_v.float())
    assert float(approx) == pytest.approx(float(exact), rel=1e-4)
    # a smaller k is a coarser partition of the vocabulary: a lower bound when the tail is exact
    cols8, clean8, tail8 = clean_topk(sm, h_clean, 8)
    with torch.no_grad():
        z = sm.unembed(h_spliced).float()
        out = torch.ones(vocab, dtype=torch.bool)
        out[cols8] = False
        tail_spliced = torch.logsumexp(z.masked_fill(~out, -torch.inf), -1)
    lp8 = torch.log_softmax(torch.cat([clean8, tail8[:, None]], 1), -1)
    lq8 = torch.log_softmax(torch.cat([z[:, cols8], tail_spliced[:, None]], 1), -1)
    coarse = (lp8.exp() * (lp8 - lq8)).sum(-1).mean()
    assert float(coarse) <= float(exact) + 1e-6


def _spliced_kl(model: LoadedModel, paths: list[Path], corpus: Path) -> list[float]:
    """Exact-vocabulary spliced KL of each saved SAE on a fixed batch of eval-like tokens."""
    from lmscope.data import TokenBatches

    sm = SiteModel(model)
    block = next(iter(TokenBatches(corpus, model.tokenizer, seq_len=16, batch_size=8,
                                   split="eval", seed=0)))  # fmt: skip
    last = f"L{sm.n_layers - 1}.resid_post"
    with torch.no_grad():
        acts = sm.run(block.input_ids, read=[*SITES, last, "L0.resid_pre"],
                      return_logits=False).acts  # fmt: skip
        vocab = sm.unembedding.shape[1]
        ref = clean_topk(sm, acts[last][block.mask], vocab)
        out = []
        for p in paths:
            sae = _normalised(load_sae(p))
            out.append(float(spliced_kl_loss(sm, sae, acts, block.mask, ref, 0.0)[1]))
    return out


def test_kl_phase_lowers_the_spliced_kl(model: LoadedModel, tmp_path: Path, shared_text_corpus: Path) -> None:  # fmt: skip
    paths = _suite(tmp_path, model, shared_text_corpus)
    before = _spliced_kl(model, paths, shared_text_corpus)
    finetune_suite(model, paths, _cfg(), corpus=str(shared_text_corpus), seq_len=16)
    after = _spliced_kl(model, paths, shared_text_corpus)
    for b, a in zip(before, after, strict=True):
        assert a < 0.8 * b, (before, after)
    rec = load_sae(paths[0]).cfg.training["kl"]
    assert rec["steps"] == 24 and rec["kl_last"] < rec["kl_first"]
    assert load_sae(paths[0]).cfg.is_folded
    assert not (tmp_path / ".finetune").exists()
    # finished: a second call leaves the SAEs alone
    w = load_sae(paths[0]).W_dec.clone()
    finetune_suite(model, paths, _cfg(), corpus=str(shared_text_corpus), seq_len=16, resume=True)
    assert torch.equal(load_sae(paths[0]).W_dec, w)


def test_kl_phase_resume_equals_uninterrupted(model: LoadedModel, tmp_path: Path, shared_text_corpus: Path) -> None:  # fmt: skip
    a = _suite(tmp_path / "a", model, shared_text_corpus)
    b = _suite(tmp_path / "b", model, shared_text_corpus)
    kw = dict(corpus=str(shared_text_corpus), seq_len=16)
    finetune_suite(model, a, _cfg(), **kw)  # type: ignore[arg-type]
    with pytest.raises(TrainingInterrupted):
        finetune_suite(model, b, _cfg(), max_steps=3, **kw)  # type: ignore[arg-type]
    assert "kl" not in load_sae(b[0]).cfg.training  # nothing saved before the phase ends
    finetune_suite(model, b, _cfg(), resume=True, **kw)  # type: ignore[arg-type]
    for pa, pb in zip(a, b, strict=True):
        sa, sb = load_sae(pa).state_dict(), load_sae(pb).state_dict()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
