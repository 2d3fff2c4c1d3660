"""ReLU SAE with the Anthropic-style L1 (April 2024 update): the baseline.

Penalty ``λ·Σ_i f_i·‖W_dec,i‖``: weighting by the decoder norm stops the model from shrinking f
and growing rows to dodge the penalty, so the decoder need not be constrained (the shared
``renormalise_decoder`` is still available to a trainer that wants Gemma Scope's constraint).
"""

from __future__ import annotations

from torch import Tensor

from lmscope.errors import SAEError
from lmscope.sae.base import SAE, LossOutput, register, squared_error


@register
class ReLUSAE(SAE):
    architecture = "relu"

    def encode(self, x: Tensor) -> Tensor:
        return self.pre_acts(x).relu()

    def training_loss(
        self,
        x: Tensor,
        *,
        sparsity_coeff: float,
        bandwidth: float = 0.001,
        target: Tensor | None = None,
        target_l0: float | None = None,
    ) -> LossOutput:
        """Squared error + λ·Σ f·‖W_dec row‖ (mean over batch); ``bandwidth`` is unused."""
        if target_l0 is not None:
            raise SAEError("target_l0 is only supported by jumprelu and jumprelu_transcoder")
        target = x if target is None else target
        f = self.encode(x)
        x_hat = self.decode(f)
        mse = squared_error(x_hat, target)
        l1 = (f * self.W_dec.norm(dim=1)).sum(-1).mean()
        l0 = (f > 0).to(x.dtype).sum(-1).mean()
        return LossOutput(
            loss=mse + sparsity_coeff * l1, mse=mse, l0=l0, f=f, x_hat=x_hat, aux={"l1": l1}
        )
