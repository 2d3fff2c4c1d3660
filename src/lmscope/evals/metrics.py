"""The metrics of one SAE on held-out tokens, accumulated batch by batch, and their definitions.

Reconstruction (over the eval tokens: BOS, EOS and pad excluded):
- L0: active latents per token (mean, and its distribution);
- FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖², with x̄ the mean over the eval tokens (mean-centred, not relative
  to zero); explained variance = 1 − FVU; cosine similarity of x and x̂ (mean over tokens);
- dead latents never fire on the eval tokens, dense ones fire on more than `dense_threshold` of them.

Next-token loss (at positions whose token and next token are both real: BOS, EOS and pad masked):
- ΔLM loss = CE(spliced) − CE(clean), the spliced model having x̂ in place of the site at every
  eval token, with no error term; KL(clean ‖ spliced) of the next-token distributions;
- CE loss recovered = (CE(zero) − CE(spliced)) / (CE(zero) − CE(clean)), CE(zero) with the site
  zero-ablated at the same tokens: 1 is a perfect reconstruction, 0 no better than ablation.

Each also by token position (reconstruction FVU and ΔLM loss per position in the sequence).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

DENSE_THRESHOLD = 0.1
FREQ_EDGES = [round(-8 + 0.25 * i, 2) for i in range(33)]  # log10 firing frequency, -8 … 0
_CHUNK = 128  # rows per unembedding chunk: [128, vocab] float32 is 128 MiB for Gemma's 262k vocab


def _zeros(n: int) -> Tensor:
    return torch.zeros(n, dtype=torch.float64)


@dataclass
class ReconStats:
    """Running sums for the reconstruction metrics of one SAE (float64, on the cpu)."""

    d_out: int
    d_sae: int
    seq_len: int
    n: int = 0
    sse: float = 0.0  # Σ‖x − x̂‖²
    sum_sq: float = 0.0  # Σ‖x‖²
    cos: float = 0.0  # Σ cos(x, x̂)
    sum_x: Tensor = field(init=False)  # Σx per dimension
    fires: Tensor = field(init=False)  # tokens on which each latent fired
    l0_counts: Tensor = field(init=False)  # tokens with L0 = 0, 1, …, d_sae
    pos_sse: Tensor = field(init=False)
    pos_n: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.sum_x = _zeros(self.d_out)
        self.fires = torch.zeros(self.d_sae, dtype=torch.int64)
        self.l0_counts = torch.zeros(self.d_sae + 1, dtype=torch.int64)
        self.pos_sse, self.pos_n = (
            _zeros(self.seq_len),
            torch.zeros(self.seq_len, dtype=torch.int64),
        )

    def update(self, x: Tensor, x_hat: Tensor, f: Tensor, pos: Tensor) -> None:
        """One batch of eval tokens: targets x [n, d], reconstructions x̂ [n, d], latents f [n, d_sae],
        positions in the sequence [n]."""
        x, x_hat = x.double().cpu(), x_hat.double().cpu()
        active = (f != 0).cpu()
        err = (x - x_hat).pow(2).sum(-1)
        self.n += len(x)
        self.sse += float(err.sum())
        self.sum_sq += float(x.pow(2).sum())
        self.sum_x += x.sum(0)
        self.cos += float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1, eps=1e-12).sum())
        self.fires += active.sum(0)
        self.l0_counts += torch.bincount(active.sum(-1), minlength=self.d_sae + 1)
        pos = pos.cpu()
        self.pos_sse.index_add_(0, pos, err)
        self.pos_n.index_add_(0, pos, torch.ones_like(pos))

    def centred_ss(self) -> float:
        """Σ‖x − x̄‖²: the squared error of predicting every token by the mean."""
        return self.sum_sq - float(self.sum_x.pow(2).sum()) / max(self.n, 1)


@dataclass
class LossStats:
    """Running sums for the next-token loss metrics of one SAE."""

    seq_len: int
    n: int = 0
    ce_clean: float = 0.0
    ce_spliced: float = 0.0
    ce_zero: float = 0.0
    kl: float = 0.0
    pos_delta: Tensor = field(init=False)
    pos_kl: Tensor = field(init=False)
    pos_n: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.pos_delta, self.pos_kl = _zeros(self.seq_len), _zeros(self.seq_len)
        self.pos_n = torch.zeros(self.seq_len, dtype=torch.int64)

    def update(
        self, ce_clean: Tensor, ce_spliced: Tensor, kl: Tensor, ce_zero: Tensor, pos: Tensor
    ) -> None:
        """Per-row losses [n] at the loss positions `pos` [n] of one batch."""
        ce_clean, ce_spliced, kl, ce_zero, pos = (
            t.double().cpu() for t in (ce_clean, ce_spliced, kl, ce_zero, pos)
        )
        pos = pos.long()
        self.n += len(pos)
        self.ce_clean += float(ce_clean.sum())
        self.ce_spliced += float(ce_spliced.sum())
        self.ce_zero += float(ce_zero.sum())
        self.kl += float(kl.sum())
        self.pos_delta.index_add_(0, pos, ce_spliced - ce_clean)
        self.pos_kl.index_add_(0, pos, kl)
        self.pos_n.index_add_(0, pos, torch.ones_like(pos))


def next_token_losses(
    logits: Tensor, targets: Tensor, logp_clean: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """Cross-entropy [n] of `targets` [n] under `logits` [n, vocab], and KL(clean ‖ these) [n] when
    the clean log-probabilities [n, vocab] are given. Computed in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ce = -logp.gather(1, targets[:, None]).squeeze(1)
    if logp_clean is None:
        return ce, None
    kl = (logp_clean.exp() * (logp_clean - logp)).sum(-1)
    return ce, kl


@dataclass
class CleanReference:
    """What the spliced passes' CE and KL need of the clean model at the loss rows: logits z
    [n, vocab], logsumexp(z), Σ p and the cross-entropy [n]. The probabilities p = exp(z − lse)
    are recomputed a chunk at a time: held whole they were another n × 262k floats (issue 16)."""

    logits: Tensor
    lse: Tensor
    mass: Tensor
    ce: Tensor


def clean_reference(unembed: Any, h: Tensor, targets: Tensor) -> CleanReference:
    """The clean model's `CleanReference` at final residual rows h [n, d], a chunk at a time."""
    if not len(h):
        z = unembed(h).float()
        return CleanReference(z, *(z.new_zeros(0) for _ in range(3)))
    logits, parts = None, []
    for i in range(0, len(h), _CHUNK):
        z = unembed(h[i : i + _CHUNK]).float()
        if logits is None:  # filled in place: a list then torch.cat held the logits twice
            logits = z.new_empty(len(h), z.shape[-1])
        logits[i : i + len(z)] = z
        lse = torch.logsumexp(z, -1)
        p = torch.exp(z - lse[:, None])
        ce = lse - z.gather(1, targets[i : i + _CHUNK, None]).squeeze(1)
        parts.append((lse, p.sum(-1), ce))
    assert logits is not None
    lse, mass, ce = (torch.cat(t) for t in zip(*parts))
    return CleanReference(logits, lse, mass, ce)


def spliced_losses(
    unembed: Any, h: Tensor, targets: Tensor, clean: CleanReference | None = None
) -> tuple[Tensor, Tensor | None]:
    """Cross-entropy [n] of `targets` under `unembed(h)` for final residual rows h [n, d], and
    KL(clean ‖ spliced) [n] when `clean` is given; equal to `next_token_losses` to rounding.

    The same sums in fewer passes over the vocabulary, a chunk of rows at a time: with z the
    spliced logits, KL = Σ p·(log p − log q) = Σ p·(z_clean − z) + (lse(z) − lse(z_clean))·Σ p.
    The differences are small where the splice changes little, so float32 keeps them accurate,
    and an unchanged z gives exactly 0.
    """
    ces, kls = [], []
    for i in range(0, len(h), _CHUNK):
        j = slice(i, i + _CHUNK)
        z = unembed(h[j]).float()
        lse = torch.logsumexp(z, -1)
        ces.append(lse - z.gather(1, targets[j, None]).squeeze(1))
        if clean is not None:
            # in z's buffer (no longer needed); sum() adds pairwise, bmm's dot loses ~1e-4 here
            p = torch.exp(clean.logits[j] - clean.lse[j, None])  # as clean_reference made it
            terms = torch.sub(clean.logits[j], z, out=z).mul_(p)
            kls.append(terms.sum(-1) + (lse - clean.lse[j]) * clean.mass[j])
    return torch.cat(ces), torch.cat(kls) if kls else None


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def _l0_summary(counts: Tensor) -> tuple[dict[str, float], dict[str, list]]:
    n = int(counts.sum())
    values = torch.arange(len(counts), dtype=torch.float64)
    mean = float((counts * values).sum()) / max(n, 1)
    var = float((counts * (values - mean) ** 2).sum()) / max(n, 1)
    cdf = torch.cumsum(counts, 0)

    def quantile(q: float) -> float:
        return float(torch.searchsorted(cdf, torch.tensor(math.ceil(q * n)).clamp_min(1)))

    top = int(torch.nonzero(counts).max()) if n else 0
    step = max(1, math.ceil((top + 1) / 64))  # at most 64 bins
    edges = list(range(0, top + step + 1, step))
    hist = [int(counts[a:b].sum()) for a, b in zip(edges[:-1], edges[1:])]
    scalars = {
        "l0": mean,
        "l0_std": math.sqrt(var),
        "l0_p10": quantile(0.1),
        "l0_median": quantile(0.5),
        "l0_p90": quantile(0.9),
        "l0_max": float(top),
    }
    return scalars, {"edges": edges, "counts": hist}


def summarise(
    recon: ReconStats, loss: LossStats, *, dense_threshold: float = DENSE_THRESHOLD
) -> tuple[dict[str, float], dict[str, Any]]:
    """(scalars for the suite manifest, arrays for eval.json) from the accumulated sums."""
    l0, l0_hist = _l0_summary(recon.l0_counts)
    freq = recon.fires.double() / max(recon.n, 1)
    fvu = _ratio(recon.sse, recon.centred_ss())
    dead = int((recon.fires == 0).sum())
    dense = int((freq > dense_threshold).sum())
    ce_clean, ce_spliced = _ratio(loss.ce_clean, loss.n), _ratio(loss.ce_spliced, loss.n)
    ce_zero = _ratio(loss.ce_zero, loss.n)
    scalars = {
        "tokens": recon.n,
        "loss_tokens": loss.n,
        **l0,
        "fvu": fvu,
        "explained_variance": 1.0 - fvu,
        "mse": _ratio(recon.sse, recon.n),
        "cos_sim": _ratio(recon.cos, recon.n),
        "ce_clean": ce_clean,
        "ce_spliced": ce_spliced,
        "ce_zero": ce_zero,
        "delta_lm_loss": ce_spliced - ce_clean,
        "kl": _ratio(loss.kl, loss.n),
        "ce_recovered": _ratio(ce_zero - ce_spliced, ce_zero - ce_clean),
        "dead": dead,
        "dead_frac": dead / recon.d_sae,
        "dense": dense,
        "dense_frac": dense / recon.d_sae,
    }
    alive = freq[freq > 0].log10()
    freq_hist = torch.histogram(
        alive.clamp(FREQ_EDGES[0], 0.0), torch.tensor(FREQ_EDGES, dtype=torch.float64)
    )
    per_token_var = recon.centred_ss() / max(recon.n, 1)
    pos_n, lpos_n = recon.pos_n.double(), loss.pos_n.double()
    arrays = {
        "l0_hist": l0_hist,
        "freq_hist": {
            "log10_edges": FREQ_EDGES,
            "counts": [int(c) for c in freq_hist.hist],
            "dead": dead,
        },
        "latent_frequency": [float(f"{v:.6g}") for v in freq.tolist()],
        "by_position": {
            "tokens": recon.pos_n.tolist(),
            "fvu": _nan_list(recon.pos_sse / pos_n / per_token_var),
            "loss_tokens": loss.pos_n.tolist(),
            "delta_lm_loss": _nan_list(loss.pos_delta / lpos_n),
            "kl": _nan_list(loss.pos_kl / lpos_n),
        },
    }
    return scalars, arrays


def _nan_list(t: Tensor) -> list[float | None]:
    """JSON has no NaN: positions without tokens become null."""
    return [None if math.isnan(v) or math.isinf(v) else v for v in t.tolist()]
