"""Synthetic activations for trainer tests: sparse combinations of random unit directions."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor


class SparseSites:
    """A data factory ``data(start_batch)`` over in-memory rows, several sites aligned by row.

    Each *sparse* site is ``x = Σ_i a_i·u_i + noise + mean`` with ``n_active`` of ``n_feat`` random unit
    directions ``u_i`` per row (its own dictionary and a large mean, so sites differ detectably).
    ``linked`` sites are a fixed linear map of another site (a transcoder target). Batch ``i`` is
    the same on every call: rows come from a seeded permutation per epoch.
    """

    def __init__(
        self,
        dims: dict[str, int],
        *,
        linked: dict[str, tuple[str, int]] | None = None,
        rows: int = 16384,
        batch: int = 256,
        n_feat: int = 512,
        n_active: int = 8,
        noise: float = 0.05,
        mean_scale: float = 3.0,
        held_out: int = 2048,
        seed: int = 0,
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        self.batch, self.seed = batch, seed
        self.rows = rows  # training rows; ``held_out`` more follow them in the pool
        rows += held_out
        self.pool: dict[str, Tensor] = {}
        for site, d in dims.items():
            u = torch.randn(n_feat, d, generator=g)
            u /= u.norm(dim=1, keepdim=True)
            idx = torch.randint(0, n_feat, (rows, n_active), generator=g)
            mag = 0.5 + torch.rand(rows, n_active, generator=g)
            x = (u[idx] * mag[..., None]).sum(1) + noise * torch.randn(rows, d, generator=g)
            self.pool[site] = x + mean_scale * torch.randn(d, generator=g)
        for site, (src, d) in (linked or {}).items():
            m = torch.randn(self.pool[src].shape[1], d, generator=g) / d**0.5
            self.pool[site] = (self.pool[src] - self.pool[src].mean(0)).relu() @ m + 1.0

    def batch_rows(self, i: int) -> Tensor:
        per_epoch = self.rows // self.batch
        epoch, j = divmod(i, per_epoch)
        perm = torch.randperm(self.rows, generator=torch.Generator().manual_seed(self.seed + epoch))
        return perm[j * self.batch : (j + 1) * self.batch]

    def __call__(self, start: int) -> Iterator[dict[str, Tensor]]:
        i = start
        while True:
            rows = self.batch_rows(i)
            yield {s: x[rows] for s, x in self.pool.items()}
            i += 1

    def held_out(self, site: str) -> Tensor:
        """Rows of ``site`` never served in batches (same dictionary and mean): for evaluation."""
        return self.pool[site][self.rows :]


@pytest.fixture
def sparse_sites() -> type[SparseSites]:
    """The class itself, for tests that build their own data."""
    return SparseSites


@pytest.fixture
def tiny_data() -> SparseSites:
    return SparseSites(
        {"L0.resid_post": 16}, rows=2048, batch=64, n_feat=64, n_active=4, held_out=512
    )


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matmuls gain nothing from threads, and on a shared, busy CPU an OpenMP barrier waiting
    for a descheduled thread makes each step ~10× slower: run trainer tests single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
