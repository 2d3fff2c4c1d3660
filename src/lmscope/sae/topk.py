"""TopK (Gao et al. 2024) and BatchTopK (Bussmann et al. 2024) SAEs.

TopK keeps the k largest pre-activations of each row (then ReLU). Top-k selection and ReLU commute
with a positive scale, so folding C is exact with the shared ``SAE.folded`` algebra.

BatchTopK keeps the k·B largest (ReLU'd) pre-activations over the whole batch while training, so
rows may use more or fewer than k latents. Inference cannot depend on the batch, so it runs as a
JumpReLU with ``threshold`` (a buffer, not learned): the paper's global estimate, the running
mean of the smallest activation kept in each training batch, broadcast to every latent. It is stored
per latent so that ``to_jumprelu()`` is a plain copy and a later per-latent refinement needs no new
format.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import Tensor

from lmscope.errors import SAEError
from lmscope.sae.base import SAE, LossOutput, SAEConfig, register, squared_error
from lmscope.sae.jumprelu import JumpReLUSAE

AUXK_COEFF = 1 / 32  # Gao et al.: α = 1/32


def _topk_rows(z: Tensor, k: int) -> Tensor:
    vals, idx = z.topk(k, dim=-1)
    return torch.zeros_like(z).scatter(-1, idx, vals.relu())


def auxk_loss(sae: SAE, z: Tensor, residual: Tensor, dead_mask: Tensor, k_aux: int) -> Tensor:
    """AuxK: dead latents alone (their top ``k_aux`` per row) try to reconstruct the residual.

    It gives dead latents a gradient again; ``residual`` (target − x̂) is detached by the caller.
    """
    n_dead = int(dead_mask.sum())
    if n_dead == 0:
        return z.new_zeros(())
    z_dead = z.masked_fill(~dead_mask, float("-inf"))
    f_aux = _topk_rows(z_dead, min(k_aux, n_dead))  # picks dead latents only
    return squared_error(f_aux @ sae.W_dec, residual)


@register
class TopKSAE(SAE):
    """Exactly ``k`` active latents per row (fewer if pre-activations are negative)."""

    architecture = "topk"

    @property
    def k(self) -> int:
        assert self.cfg.k is not None  # SAEConfig checks this
        return self.cfg.k

    def encode(self, x: Tensor) -> Tensor:
        return _topk_rows(self.pre_acts(x), self.k)

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
        """Squared error only (k fixes sparsity; ``sparsity_coeff``/``bandwidth`` are ignored).

        Pass ``dead_mask`` (bool [d_sae], latents that have not fired for a while: the trainer keeps
        that count) to add ``aux_coeff``·AuxK with ``k_aux`` (default ``d_in // 2``) dead latents.
        """
        if target_l0 is not None:
            raise SAEError(f"target_l0 is not used by {self.architecture}; set k instead")
        target = x if target is None else target
        z = self.pre_acts(x)
        f = self._train_acts(z)
        x_hat = self.decode(f)
        mse = squared_error(x_hat, target)
        loss, aux = mse, {}
        if dead_mask is not None and aux_coeff > 0:
            k_aux = k_aux or max(1, self.cfg.d_in // 2)
            aux["auxk"] = auxk_loss(self, z, (target - x_hat).detach(), dead_mask, k_aux)
            loss = loss + aux_coeff * aux["auxk"]
        l0 = (f != 0).to(x.dtype).sum(-1).mean()
        return LossOutput(loss=loss, mse=mse, l0=l0, f=f, x_hat=x_hat, aux=aux)

    def _train_acts(self, z: Tensor) -> Tensor:
        return _topk_rows(z, self.k)


@register
class BatchTopKSAE(TopKSAE):
    """Top ``k·B`` over the batch while training; a JumpReLU on ``threshold`` at inference."""

    architecture = "batchtopk"
    THRESHOLD_MOMENTUM = 0.99

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        # 0 until the first training batch: inference is then a plain ReLU
        self.register_buffer("threshold", torch.zeros(cfg.d_sae, dtype=cfg.torch_dtype))

    threshold: Tensor

    def encode(self, x: Tensor) -> Tensor:
        z = self.pre_acts(x)
        return z.relu() * (z > self.threshold).to(z.dtype)

    def _train_acts(self, z: Tensor) -> Tensor:
        flat = z.relu().reshape(-1)
        kb = min(self.k * (flat.numel() // self.cfg.d_sae), flat.numel())
        vals, idx = flat.topk(kb)
        f = torch.zeros_like(flat).scatter(0, idx, vals).reshape(z.shape)
        if self.training:
            self.update_threshold(vals)
        return f

    @torch.no_grad()
    def update_threshold(self, kept: Tensor) -> None:
        """Move the running threshold towards this batch's smallest kept positive activation."""
        pos = kept[kept > 0]
        if pos.numel() == 0:
            return
        m = pos.min().to(self.threshold.dtype)
        if bool((self.threshold == 0).all()):
            self.threshold.fill_(m)
        else:
            self.threshold.mul_(self.THRESHOLD_MOMENTUM).add_((1 - self.THRESHOLD_MOMENTUM) * m)

    def to_jumprelu(self) -> JumpReLUSAE:
        """The inference model as a JumpReLU SAE (same weights, θ = the running threshold).

        Exact: ``encode`` here already is that JumpReLU.
        """
        cfg = dataclasses.replace(
            copy.deepcopy(self.cfg), architecture="jumprelu", k=None, prefixes=None
        )
        cfg.training = {**cfg.training, "converted_from": self.cfg.architecture, "k": self.cfg.k}
        if self.cfg.prefixes is not None:
            cfg.training["prefixes"] = self.cfg.prefixes
        out = JumpReLUSAE(cfg)
        sd = {k: v.detach().clone() for k, v in self.state_dict().items()}
        out.load_state_dict(sd)
        return out.to(self.W_enc.device)
