"""Shared fixtures: tiny models of every supported architecture, and the real Gemma 3 270M (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmscope.model import TINY_ARCHS, LoadedModel, load_model, tiny_model

SENTENCES = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "def add(a, b):\n    return a + b",
]


@pytest.fixture(scope="session", params=TINY_ARCHS)
def tiny(request: pytest.FixtureRequest) -> LoadedModel:
    """Each tiny architecture in turn (gemma3, gemma2, llama, gpt2); shared, so never modify it."""
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def tiny_gemma3() -> LoadedModel:
    """The tiny Gemma 3 (sliding and global layers); shared, so never modify it."""
    return tiny_model("gemma3")


@pytest.fixture(scope="session")
def gemma_270m() -> LoadedModel:
    """The real Gemma 3 270M on cpu (converted on first use, then read from the lmscope cache)."""
    return load_model("gemma-3-270m", device="cpu")


@pytest.fixture(scope="session")
def tiny_batch(tiny: LoadedModel) -> tuple[torch.Tensor, torch.Tensor]:
    """Two right-padded sentences for `tiny`: token ids and attention mask, [2, T] each."""
    batch = tiny.tokenizer(SENTENCES, return_tensors="pt", padding=True, padding_side="right")
    return batch.input_ids, batch.attention_mask


def write_text_corpus(path: Path) -> Path:
    """A small real-text corpus of many short documents (jsonl), so both splits always get some:
    a single-document corpus lands whole in train or eval by its hash."""
    import json

    words = " ".join(p.read_text() for p in sorted(Path(__file__).parent.rglob("*.py"))).split()
    docs = [" ".join(words[i : i + 80]) for i in range(0, len(words), 80)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture
def text_corpus(tmp_path: Path) -> Path:
    """`write_text_corpus` in a fresh temp folder."""
    return write_text_corpus(tmp_path / "corpus.jsonl")


@pytest.fixture(scope="session")
def shared_text_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same corpus, made once for modules that build module-scoped state on it; never modify it."""
    return write_text_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl")


def build_tiny_suite(out: Path, sites: str = "L0-1.resid_post", width: int = 64, l0: float = 8.0,
                     tokens: int = 128 * 300, corpus: str = "default") -> Path:  # fmt: skip
    """Train a small JumpReLU suite on tiny-gemma3 (streamed, a few hundred steps) and write its manifest."""
    from lmscope.activations.stream import stream_batches
    from lmscope.model import SiteModel, parse_sites
    from lmscope.suite import record_training
    from lmscope.train import SAESpec, TrainConfig, train_suite

    loaded = tiny_model("gemma3")
    names = [str(s) for s in parse_sites(sites, SiteModel(loaded).n_layers)]
    specs = [SAESpec(n, width, target_l0=l0, model="tiny-gemma3") for n in names]
    cfg = TrainConfig(total_tokens=tokens, batch_size=128, lr=1e-3, lr_warmup_steps=20,
                      lambda_warmup_steps=50, norm_batches=4, progress=False, log_every=50)  # fmt: skip
    data = stream_batches(loaded, names, cfg.batch_size, corpus=corpus, seq_len=32)
    folders = train_suite(specs, data, cfg, out)
    record_training(out, folders, model="tiny-gemma3", corpus=corpus, seq_len=32)
    return out


@pytest.fixture(scope="session")
def tiny_suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained 2-SAE suite (tiny-gemma3, L0-1.resid_post, width 64); shared: copy it before changing it."""
    return build_tiny_suite(tmp_path_factory.mktemp("suite") / "suite")
