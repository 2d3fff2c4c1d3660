"""Matryoshka BatchTopK SAE (Bussmann et al. 2025; Nabeshima 2024): nested dictionaries.

Latents are ordered: the first m₁ < m₂ < … < W form nested prefixes, and *each* prefix is trained
to reconstruct the input on its own (``x̂_m = f[:, :m] W_dec[:m] + b_dec``), so early latents
learn general features that later ones refine instead of absorbing them (feature absorption),
and few latents are left without a job. Selection is BatchTopK over the whole dictionary, so
inference is the same JumpReLU on the running threshold as ``BatchTopKSAE`` (``to_jumprelu``).

Prefix sizes: ``SAEConfig.prefixes`` (increasing, last = d_sae), or by default W/16, W/8, W/4,
W/2, W (as many of those as are ≥ 1 and distinct).
"""

from __future__ import annotations

from torch import Tensor

from lmscope.errors import SAEError
from lmscope.sae.base import LossOutput, SAEConfig, register, squared_error
from lmscope.sae.topk import AUXK_COEFF, BatchTopKSAE, auxk_loss


def default_prefixes(d_sae: int) -> list[int]:
    return sorted({max(1, d_sae // 2**i) for i in range(5)})


def prefix_sizes(cfg: SAEConfig) -> list[int]:
    """The nested dictionary sizes of a Matryoshka SAE, checked."""
    p = list(cfg.prefixes) if cfg.prefixes else default_prefixes(cfg.d_sae)
    if any(b <= a for a, b in zip(p, p[1:])) or p[0] < 1 or p[-1] != cfg.d_sae:
        raise SAEError(f"matryoshka prefixes must increase from ≥ 1 to d_sae={cfg.d_sae}, got {p}")
    return p


def prefix_reconstructions(f: Tensor, W_dec: Tensor, b_dec: Tensor, sizes: list[int]) -> list[Tensor]:  # fmt: skip
    """``x̂_m`` for every prefix size m, accumulated group by group (no repeated work)."""
    out, x_hat, start = [], b_dec.expand(f.shape[0], -1), 0
    for m in sizes:
        x_hat = x_hat + f[:, start:m] @ W_dec[start:m]
        out.append(x_hat)
        start = m
    return out


@register
class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """BatchTopK selection; loss = mean over prefixes of each prefix's squared error."""

    architecture = "matryoshka_batchtopk"

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.sizes = prefix_sizes(cfg)

    def training_loss(
        self,
        x: Tensor,
        *,
        sparsity_coeff: float = 0.0,
        bandwidth: float = 0.001,
        target: Tensor | None = None,
        target_l0: float | None = None,
        dead_mask: Tensor | None = None,
        aux_coeff: float = AUXK_COEFF,
        k_aux: int | None = None,
    ) -> LossOutput:
        if target_l0 is not None:
            raise SAEError(f"target_l0 is not used by {self.architecture}; set k instead")
        target = x if target is None else target
        z = self.pre_acts(x)
        f = self._train_acts(z)
        recons = prefix_reconstructions(f, self.W_dec, self.b_dec, self.sizes)
        errs = [squared_error(r, target) for r in recons]
        x_hat, mse = recons[-1], errs[-1]
        loss = sum(errs[1:], errs[0]) / len(errs)
        aux = {f"mse_{m}": e.detach() for m, e in zip(self.sizes, errs, strict=True)}
        if dead_mask is not None and aux_coeff > 0:
            k_aux = k_aux or max(1, self.cfg.d_in // 2)
            aux["auxk"] = auxk_loss(self, z, (target - x_hat).detach(), dead_mask, k_aux)
            loss = loss + aux_coeff * aux["auxk"]
        l0 = (f != 0).to(x.dtype).sum(-1).mean()
        return LossOutput(loss=loss, mse=mse, l0=l0, f=f, x_hat=x_hat, aux=aux)
