"""Synthetic activations with known features, and how well an SAE recovers them.

Each row is ``x = Σ_i a_i·u_i + noise + mean``: ``u_i`` unit directions (``n_feat`` of them in
``d`` dims, more features than dims, so they overlap as in superposition), feature i firing
independently with probability ``p_i`` (Zipf-like: a few common, many rare) and magnitude
``a_i ~ 0.5 + Exp(1)``-ish. Scores (as SAELens's ``sae_lens.synthetic`` reports them):
- MCC: mean |cosine| between each true direction and its matched decoder row, over a one-to-one
  matching (greedy on the largest cosines: within 1e-3 of Hungarian on these problems, and no
  scipy needed);
- dead: latents that never fire on the held-out rows;
- shrinkage: mean ‖x̂ − b‖ / ‖x − b‖ with b the data mean (1 = no shrinkage).

    data = SyntheticFeatures(d=32, n_feat=256)
    train_suite(specs, data, cfg, out)      # a DataFactory, like a store's
    scores = score_sae(load_sae(path), data)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from lmscope.sae import SAE


class SyntheticFeatures:
    """A ``DataFactory`` of synthetic rows with known feature directions (``.features``)."""

    def __init__(self, *, d: int = 32, n_feat: int = 256, site: str = "L0.resid_post",
                 mean_l0: float = 6.0, zipf: float = 0.5, noise: float = 0.01,
                 batch: int = 256, seed: int = 0) -> None:  # fmt: skip
        g = torch.Generator().manual_seed(seed)
        u = torch.randn(n_feat, d, generator=g)
        self.features = u / u.norm(dim=1, keepdim=True)
        rank = torch.arange(1, n_feat + 1, dtype=torch.float64)
        p = rank**-zipf
        self.p = (p * mean_l0 / p.sum()).clamp(max=1.0).float()  # firing probabilities
        self.mean = 2.0 * torch.randn(d, generator=g)
        self.d, self.site, self.noise, self.batch, self.seed = d, site, noise, batch, seed

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(rows [n, d], true feature activations [n, n_feat])."""
        fire = torch.rand(n, len(self.p), generator=generator) < self.p
        mag = 0.5 + torch.empty(n, len(self.p)).exponential_(generator=generator)
        a = fire * mag
        x = a @ self.features + self.noise * torch.randn(n, self.d, generator=generator)
        return x + self.mean, a

    def __call__(self, start: int) -> Iterator[dict[str, Tensor]]:
        i = start
        while True:  # batch i is a pure function of (seed, i): resumable anywhere
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + i + 1)
            yield {self.site: self.sample(self.batch, g)[0]}
            i += 1

    def held_out(self, n: int = 8192) -> tuple[Tensor, Tensor]:
        return self.sample(n, torch.Generator().manual_seed(-1 - self.seed & 0xFFFF_FFFF))


def matched_cosines(true: Tensor, learned: Tensor) -> Tensor:
    """|cos| of each true direction with its one-to-one greedy match among ``learned`` rows."""
    t = true / true.norm(dim=1, keepdim=True)
    lrn = learned / learned.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = (t @ lrn.T).abs()
    n_t, n_l = cos.shape
    order = cos.reshape(-1).argsort(descending=True)
    used_t = torch.zeros(n_t, dtype=torch.bool)
    used_l = torch.zeros(n_l, dtype=torch.bool)
    out = torch.zeros(n_t)
    left = min(n_t, n_l)
    for flat in order.tolist():
        i, j = divmod(flat, n_l)
        if used_t[i] or used_l[j]:
            continue
        used_t[i] = used_l[j] = True
        out[i] = cos[i, j]
        left -= 1
        if left == 0:
            break
    return out


@dataclass
class SyntheticScores:
    mcc: float
    dead: float  # fraction of latents that never fire on the held-out rows
    shrinkage: float
    l0: float
    fvu: float


@torch.no_grad()
def score_sae(sae: SAE, data: SyntheticFeatures, n: int = 8192) -> SyntheticScores:
    """How well a (folded) SAE trained on ``data`` recovers its true features."""
    x, _ = data.held_out(n)
    f = sae.encode(x)
    x_hat = sae.decode(f)
    centre = x.mean(0)
    ratio = (x_hat - centre).norm(dim=1) / (x - centre).norm(dim=1).clamp_min(1e-12)
    return SyntheticScores(
        mcc=float(matched_cosines(data.features, sae.W_dec).mean()),
        dead=float((f == 0).all(0).float().mean()),
        shrinkage=float(ratio.mean()),
        l0=float((f != 0).float().sum(1).mean()),
        fvu=float((x - x_hat).pow(2).sum(1).mean() / (x - centre).pow(2).sum(1).mean()),
    )
