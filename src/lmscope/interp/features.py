"""Streaming per-latent statistics: top-k contexts, band samples, density and histogram.

Everything is kept as dense `[slots, d_sae]` tensors updated once per token block with batched
torch ops; no Python loop ever runs per latent, and memory depends on `d_sae`, `k`, the window and
the band sizes, never on how many tokens stream past.

Per block, the nonzero activations are listed once (`nonzero()`: a JumpReLU SAE fires on ~0.5–2% of
(token, latent) pairs), and each buffer only looks at the entries that beat its current worst slot,
so after the first blocks almost nothing reaches the sort.

Bands: the activation range of latent j is tracked as `R_j = 2^E_j` with `R_j/2 <= max_j < R_j`.
Band b holds activations in `[R/2^(b+1), R/2^b)` (the last band everything below), and each band keeps
a uniform sample of its activations by reservoir sampling with random priority keys (keep the m
largest keys). When the max grows past `R`, `E` rises by s: band b's interval becomes band b+s's and
the bottom band absorbs the rest; a sample of a union is the top m keys of the parts' samples, so the
shift is exact. The histogram uses the same range: `n_bins` linear bins over `[0, R)`, and doubling
`R` merges bins pairwise, which is exact too.

Random tokens (`TokenSample`): a uniform sample of the counted tokens, each with every latent's
activation there (sparse), shared by all latents of the SAE. Explanation scorers draw their
non-activating contexts from it: a latent's negatives are the sampled tokens where it is zero.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

WindowFn = Callable[[Tensor, Tensor], Tensor]  # (batch rows, latents) -> activations [n, width]
NO_FIRE = -(2**30)  # exponent of a latent that never fired


def rank_within_groups(groups: Tensor, score: Tensor, n_groups: int) -> tuple[Tensor, Tensor]:
    """Order entries by (group, score descending) and number them within their group from 0.

    Returns (order, rank): `order` indexes the entries, `rank[i]` is the rank of entry `order[i]`.
    """
    order = torch.argsort(score, descending=True, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]
    counts = torch.bincount(groups, minlength=n_groups)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(order), device=groups.device) - starts[groups[order]]
    return order, rank


class TopBuffer:
    """For every latent, the m entries with the highest score so far (sorted, best first), each with
    its activation, global token index (sequence · T + position), token id and the latent's
    activations in a window around the token."""

    def __init__(self, m: int, d: int, width: int, device: torch.device | str = "cpu") -> None:
        self.m, self.d, self.width = m, d, width
        self.score = torch.full((m, d), float("-inf"), device=device)
        self.act = torch.zeros((m, d), device=device)
        self.token = torch.full((m, d), -1, dtype=torch.long, device=device)
        self.token_id = torch.full((m, d), -1, dtype=torch.long, device=device)
        self.window = torch.zeros((m, d, width), device=device)

    def offer(self, j: Tensor, score: Tensor, act: Tensor, token: Tensor, row: Tensor,
              ids: Tensor, window_of: WindowFn) -> None:  # fmt: skip
        """Merge candidate entries (latent `j`, `score`, `act`, global `token`, batch `row`) into
        the buffer; `ids` are the block's token ids by batch row.

        Only the columns (latents) with a candidate better than their worst slot are touched."""
        better = score > self.score[-1, j]
        if not bool(better.any()):
            return
        j, score, act, token, row = (x[better] for x in (j, score, act, token, row))
        cols, j_col = torch.unique(j, return_inverse=True)
        order, rank = rank_within_groups(j_col, score, len(cols))
        keep = rank < self.m
        order, rank = order[keep], rank[keep]
        cand_score = torch.full((self.m, len(cols)), float("-inf"), device=score.device)
        cand_ref = torch.full((self.m, len(cols)), -1, dtype=torch.long, device=score.device)
        cand_score[rank, j_col[order]] = score[order]
        cand_ref[rank, j_col[order]] = order
        top, idx = torch.cat([self.score[:, cols], cand_score]).topk(self.m, dim=0)
        from_cand = idx >= self.m
        ref = torch.where(from_cand, cand_ref.gather(0, (idx - self.m).clamp(min=0)), -1)
        old = idx.clamp(max=self.m - 1)
        new_act = torch.where(from_cand, 0.0, self.act[:, cols].gather(0, old))
        new_token = torch.where(from_cand, -1, self.token[:, cols].gather(0, old))
        new_id = torch.where(from_cand, -1, self.token_id[:, cols].gather(0, old))
        window = self.window[:, cols].gather(0, old[..., None].expand(-1, -1, self.width))
        window[from_cand] = 0.0
        slot, col = (ref >= 0).nonzero(as_tuple=True)
        r = ref[slot, col]
        new_act[slot, col] = act[r]
        new_token[slot, col] = token[r]
        new_id[slot, col] = ids[row[r]]
        window[slot, col] = window_of(row[r], cols[col])
        self.score[:, cols], self.act[:, cols] = top, new_act
        self.token[:, cols], self.token_id[:, cols] = new_token, new_id
        self.window[:, cols] = window

    @staticmethod
    def regroup(buffers: list[TopBuffer], new_group: Tensor, cols: Tensor) -> None:
        """Redistribute the entries of `buffers` (one group each) among them, in columns `cols`:
        entry slot s of buffer p moves to buffer `new_group[p, c]`; each keeps its best m."""
        m, width = buffers[0].m, buffers[0].width
        pool = {name: torch.cat([getattr(b, name)[:, cols] for b in buffers])
                for name in ("score", "act", "token", "token_id", "window")}  # fmt: skip
        groups = new_group.repeat_interleave(m, dim=0)
        for g, buf in enumerate(buffers):
            score, idx = torch.where(groups == g, pool["score"], float("-inf")).topk(m, dim=0)
            empty = score == float("-inf")
            buf.score[:, cols] = score
            buf.act[:, cols] = torch.where(empty, 0.0, pool["act"].gather(0, idx))
            buf.token[:, cols] = torch.where(empty, -1, pool["token"].gather(0, idx))
            buf.token_id[:, cols] = torch.where(empty, -1, pool["token_id"].gather(0, idx))
            window = pool["window"].gather(0, idx[..., None].expand(-1, -1, width))
            window[empty] = 0.0
            buf.window[:, cols] = window


@dataclass
class StatsConfig:
    """How much to keep per latent."""

    k: int = 20  # top contexts
    window: int = 8  # tokens of context on each side
    bands: int = 4  # activation bands, each a factor of 2 below the previous
    per_band: int = 5  # samples per band
    hist_bins: int = 32  # a power of two, so that doubling the range merges bins exactly
    samples: int = 512  # random tokens kept with all their latents (negatives for explain scorers)

    def __post_init__(self) -> None:
        from lmscope.interp import InterpError

        if self.hist_bins < 2 or self.hist_bins & (self.hist_bins - 1):
            raise InterpError(f"hist_bins must be a power of two >= 2, got {self.hist_bins}")
        if min(self.k, self.bands, self.per_band) < 1 or self.window < 0 or self.samples < 0:
            raise InterpError(
                f"k, bands and per_band must be >= 1, window and samples >= 0, got k={self.k}, "
                f"bands={self.bands}, per_band={self.per_band}, window={self.window}, "
                f"samples={self.samples}"
            )

    @property
    def width(self) -> int:
        return 2 * self.window + 1


class LatentStats:
    """Every statistic interpret keeps for one SAE, updated one token block at a time.

    >>> stats = LatentStats(d_sae, StatsConfig())
    >>> stats.update(f.view(B, T, d_sae), input_ids, mask, first_sequence)  # f = sae.encode(x)
    """

    def __init__(self, d: int, cfg: StatsConfig, *, device: torch.device | str = "cpu",
                 seed: int = 0) -> None:  # fmt: skip
        self.d, self.cfg = d, cfg
        self.tokens = 0  # tokens seen (mask true)
        self.n_fire = torch.zeros(d, dtype=torch.long, device=device)
        self.sum = torch.zeros(d, dtype=torch.float64, device=device)
        self.exponent = torch.full((d,), NO_FIRE, dtype=torch.long, device=device)
        self.hist = torch.zeros((d, cfg.hist_bins), dtype=torch.long, device=device)
        self.top = TopBuffer(cfg.k, d, cfg.width, device)
        self.bands = [TopBuffer(cfg.per_band, d, cfg.width, device) for _ in range(cfg.bands)]
        self._gen = torch.Generator(device=device).manual_seed(seed)
        self._log2_bins = cfg.hist_bins.bit_length() - 1
        self.sample = TokenSample(cfg.samples, device=device, seed=seed)

    @torch.no_grad()
    def update(self, f: Tensor, input_ids: Tensor, mask: Tensor, first_seq: int) -> None:
        """Fold in one block: latents `f` [B, T, d] of the tokens `input_ids` [B, T], `mask` [B, T]
        (True where a token counts; `f` there is ignored), `first_seq` the global number of the
        block's first sequence."""
        B, T, d = f.shape
        f = f.reshape(B * T, d).float()
        counted = mask.to(f.device).reshape(-1)
        ids = input_ids.to(f.device).reshape(-1)
        self.tokens += int(counted.sum())
        self.sample.offer(f, counted, ids, first_seq * T)
        row, j = f.nonzero(as_tuple=True)
        keep = counted[row]
        row, j = row[keep], j[keep]
        if not len(row):
            return
        act = f[row, j]
        token = first_seq * T + row  # global token index = sequence · T + position
        self.n_fire += torch.bincount(j, minlength=d)
        self.sum += torch.bincount(j, weights=act.double(), minlength=d)
        window_of = self._window_fn(f, counted, T)
        self.top.offer(j, act, act, token, row, ids, window_of)

        batch_max = torch.zeros(d, device=f.device).scatter_reduce_(0, j, act, "amax")
        _, e_batch = torch.frexp(batch_max)  # batch_max in [2^(e-1), 2^e)
        new = torch.maximum(self.exponent, torch.where(batch_max > 0, e_batch.long(), NO_FIRE))
        shift = torch.where(self.exponent != NO_FIRE, new - self.exponent, 0)
        self.exponent = new
        if bool((shift > 0).any()):
            self._shift(shift)

        bins = torch.ldexp(act, self._log2_bins - self.exponent[j]).long().clamp(max=self.cfg.hist_bins - 1)  # fmt: skip
        self.hist.view(-1).index_add_(0, j * self.cfg.hist_bins + bins, torch.ones_like(bins))
        _, e_act = torch.frexp(act)
        band = (self.exponent[j] - e_act).clamp(0, self.cfg.bands - 1)
        key = torch.rand(len(act), generator=self._gen, device=act.device)
        worst = torch.stack([buf.score[-1] for buf in self.bands])  # [bands, d]
        hope = (key > worst[band, j]).nonzero().squeeze(1)  # most keys lose: drop them at once
        j, key, act, token, row, band = (x[hope] for x in (j, key, act, token, row, band))
        for b, buf in enumerate(self.bands):
            sel = band == b
            buf.offer(j[sel], key[sel], act[sel], token[sel], row[sel], ids, window_of)

    def _window_fn(self, f: Tensor, counted: Tensor, T: int) -> WindowFn:
        w = self.cfg.window
        offsets = torch.arange(-w, w + 1, device=f.device)

        def window_of(rows: Tensor, lat: Tensor) -> Tensor:
            pos = (rows % T)[:, None] + offsets
            src = (rows - rows % T)[:, None] + pos.clamp(0, T - 1)
            valid = (pos >= 0) & (pos < T) & counted[src]
            return f[src, lat[:, None]] * valid

        return window_of

    def _shift(self, shift: Tensor) -> None:
        """The range of some latents doubled `shift` times: merge histogram bins and bands."""
        for step in range(min(int(shift.max()), self._log2_bins)):
            rows = shift > step
            h = self.hist[rows]
            merged = h[:, 0::2] + h[:, 1::2]
            self.hist[rows] = torch.cat([merged, torch.zeros_like(merged)], dim=1)
        cols = (shift > 0).nonzero().squeeze(1)
        n = self.cfg.bands
        new_band = (torch.arange(n, device=shift.device)[:, None] + shift[cols]).clamp(max=n - 1)
        TopBuffer.regroup(self.bands, new_band, cols)

    # -- results -----------------------------------------------------------------------------
    def density(self) -> Tensor:
        return self.n_fire.double() / max(self.tokens, 1)

    def mean_act(self) -> Tensor:
        """Mean activation over the tokens where the latent fires (0 for dead latents)."""
        return torch.where(self.n_fire > 0, self.sum / self.n_fire.clamp(min=1), 0.0)

    def hist_top(self) -> Tensor:
        """R = 2^E per latent (0 for dead ones): the histogram covers [0, R) in `hist_bins` bins."""
        r = torch.ldexp(torch.ones(self.d, dtype=torch.float64, device=self.exponent.device),
                        self.exponent.clamp(min=-1000))  # fmt: skip
        return torch.where(self.exponent == NO_FIRE, 0.0, r)


def band_bounds(hist_top: float, band: int, n_bands: int) -> tuple[float, float]:
    """The activation interval [lo, hi) of `band` for a latent whose range is [0, hist_top)."""
    hi = hist_top / 2**band
    return (0.0 if band == n_bands - 1 else hi / 2), hi


class TokenSample:
    """A uniform sample of `m` counted tokens (reservoir sampling by random keys), each with its
    global token index, token id and the indices and values of the latents that fire there."""

    def __init__(self, m: int, *, device: torch.device | str = "cpu", seed: int = 0) -> None:
        self.m = m
        self.key = torch.empty(0, device=device)
        self.token = torch.empty(0, dtype=torch.long, device=device)
        self.token_id = torch.empty(0, dtype=torch.long, device=device)
        self.latents: list[Tensor] = []  # per kept token: firing latent indices (ascending)
        self.acts: list[Tensor] = []  # ... and their activations
        # its own stream, so that the band samples do not depend on whether tokens are sampled
        self._gen = torch.Generator(device=device).manual_seed(seed + 0x5EED)

    def offer(self, f: Tensor, counted: Tensor, ids: Tensor, first_token: int) -> None:
        """Fold in one block: `f` [rows, d], `counted` [rows], `ids` [rows], the block's first
        global token index `first_token`."""
        if self.m == 0:
            return
        rows = counted.nonzero().squeeze(1)
        key = torch.rand(len(rows), generator=self._gen, device=f.device)
        keys = torch.cat([self.key, key])
        if len(keys) > self.m:
            keep = keys.topk(self.m).indices.sort().values
        else:
            keep = torch.arange(len(keys), device=f.device)
        n_old = len(self.key)
        old, new = keep[keep < n_old], keep[keep >= n_old] - n_old
        sub = f[rows[new]]
        r, j = sub.nonzero(as_tuple=True)
        cuts = torch.bincount(r, minlength=len(new)).tolist()
        old_list = old.tolist()
        self.latents = [self.latents[i] for i in old_list] + list(j.split(cuts))
        self.acts = [self.acts[i] for i in old_list] + list(sub[r, j].split(cuts))
        self.key = torch.cat([self.key[old], key[new]])
        self.token = torch.cat([self.token[old], first_token + rows[new]])
        self.token_id = torch.cat([self.token_id[old], ids[rows[new]]])
