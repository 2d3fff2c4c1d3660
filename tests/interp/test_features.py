"""The streaming statistics against brute force on random latents: top-k, histogram, bands."""

from __future__ import annotations

import pytest
import torch

from lmscope.interp import InterpError
from lmscope.interp.features import LatentStats, StatsConfig, band_bounds

B, T, D = 4, 16, 24


def _stream(cfg: StatsConfig, blocks: int = 8, seed: int = 0) -> tuple[LatentStats, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Feed random sparse latents whose scale grows block by block (so ranges keep doubling)."""
    gen = torch.Generator().manual_seed(seed)
    stats = LatentStats(D, cfg, seed=seed)
    fs, ids = [], []
    for i in range(blocks):
        f = torch.relu(torch.randn(B, T, D, generator=gen) * (1 + 3 * i) - 1.0)
        mask = torch.rand(B, T, generator=gen) > 0.15
        input_ids = torch.randint(0, 100, (B, T), generator=gen)
        stats.update(f, input_ids, mask, i * B)
        fs.append(f * mask[..., None])
        ids.append(input_ids)
    return stats, torch.cat(fs).reshape(-1, D), torch.cat(ids).reshape(-1)


def test_top_k_equals_a_full_sort_with_tokens_and_windows() -> None:
    cfg = StatsConfig(k=6, window=3)
    stats, f, ids = _stream(cfg)
    values, rows = f.topk(cfg.k, dim=0)
    assert torch.equal(stats.top.act, values)
    assert torch.equal(stats.top.token, rows)
    assert torch.equal(stats.top.token_id, ids[rows])
    for slot in range(cfg.k):
        for j in range(D):
            seq, pos = divmod(int(rows[slot, j]), T)
            for o in range(-3, 4):
                want = float(f[seq * T + pos + o, j]) if 0 <= pos + o < T else 0.0
                assert float(stats.top.window[slot, j, o + 3]) == want


def test_density_mean_and_histogram_equal_brute_force() -> None:
    cfg = StatsConfig(hist_bins=16)
    stats, f, _ = _stream(cfg)
    fired = f > 0
    assert torch.equal(stats.n_fire, fired.sum(0))
    assert torch.allclose(stats.mean_act(), (f.double().sum(0) / fired.sum(0)), rtol=1e-6)
    top = stats.hist_top()
    for j in range(D):
        acts = f[fired[:, j], j]
        assert top[j] / 2 <= acts.max() < top[j]  # the range is a power of two above the max
        want = torch.floor(acts.double() / top[j] * cfg.hist_bins).long().bincount(minlength=16)
        assert torch.equal(stats.hist[j], want)


def test_bands_hold_samples_of_their_range_ordered_and_as_many_as_exist() -> None:
    cfg = StatsConfig(bands=3, per_band=4)
    stats, f, _ = _stream(cfg)
    top = stats.hist_top()
    for j in range(D):
        acts = f[f[:, j] > 0, j]
        previous_min = float("inf")
        for b, buf in enumerate(stats.bands):
            lo, hi = band_bounds(float(top[j]), b, cfg.bands)
            held = buf.token[:, j] >= 0
            got = buf.act[held, j]
            assert ((got >= lo) & (got < hi)).all()
            assert len(got) == min(cfg.per_band, int(((acts >= lo) & (acts < hi)).sum()))
            assert torch.equal(f[buf.token[held, j], j], got)  # the stored act is the latent's
            if len(got):
                assert got.max() <= previous_min  # bands are ordered, strongest first
                previous_min = float(got.min())


def test_band_samples_are_uniform_across_blocks_and_range_doublings() -> None:
    """2,000 latents see the same 40 activations (10 per block, the scale doubling each block so
    the bottom band keeps absorbing the band above); all but the last block's max end in the
    bottom band, and each of those 39 should be sampled with probability 4/39."""
    d, per_band = 2000, 4
    stats = LatentStats(d, StatsConfig(bands=2, per_band=per_band, k=1, window=0), seed=1)
    for i in range(4):
        f = torch.zeros(1, 10, d)
        f[0, :, :] = (torch.arange(10, dtype=torch.float32)[:, None] + 1) / 1000 * 2**i
        f[0, 0, :] = 2.0**i * 100  # the max of the block
        stats.update(
            f, torch.zeros(1, 10, dtype=torch.long), torch.ones(1, 10, dtype=torch.bool), i
        )
    bottom = stats.bands[-1].token
    assert bool((bottom >= 0).all())
    picks = torch.bincount(bottom.flatten(), minlength=40)
    assert picks[30] == 0  # the overall max stays in the top band
    picks = torch.cat([picks[:30], picks[31:]])
    expected = d * per_band / 39
    assert ((picks - expected).abs() < 5 * expected**0.5).all(), picks


def test_bad_statistics_settings_are_errors() -> None:
    with pytest.raises(InterpError, match="power of two"):
        StatsConfig(hist_bins=10)
    with pytest.raises(InterpError, match="per_band"):
        StatsConfig(per_band=0)
