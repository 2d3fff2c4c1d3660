"""JumpReLU transcoder (Gemma Scope): reads ``site`` (e.g. ``L6.mlp_in``), predicts ``out_site``
(e.g. ``L6.mlp_out``), optionally with an affine skip ``x @ W_skip`` (Gemma Scope 2's
``affine_skip_connection``).

Input and output live in different spaces, so there is no ``b_dec`` pre-subtraction, and the two
sides have their own normalisation scalars: inputs are divided by ``input_scale`` (C_in), targets
by ``output_scale`` (C_out). ``decode(f)`` is the latent part only; ``forward(x)`` adds the skip.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmscope.errors import SAEError
from lmscope.sae.base import LossOutput, SAEConfig, register
from lmscope.sae.jumprelu import JumpReLUSAE, jumprelu_loss


@register
class JumpReLUTranscoder(JumpReLUSAE):
    architecture = "jumprelu_transcoder"

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        if cfg.skip:  # zero init: training starts from the plain transcoder
            self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, cfg.out_dim, dtype=cfg.torch_dtype))

    def skip_out(self, x: Tensor) -> Tensor | None:
        """The skip path's contribution ``x @ W_skip`` (None without a skip)."""
        return x @ self.W_skip if self.cfg.skip else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.decode(self.encode(x))
        skip = self.skip_out(x)
        return out if skip is None else out + skip

    def training_loss(
        self,
        x: Tensor,
        *,
        sparsity_coeff: float,
        bandwidth: float = 0.001,
        target: Tensor | None = None,
        target_l0: float | None = None,
    ) -> LossOutput:
        """``x`` = input site / C_in, ``target`` = output site / C_out (required)."""
        if target is None:
            raise SAEError(
                f"a transcoder needs target= (the {self.cfg.out_site or 'output-site'} activations)"
            )
        return jumprelu_loss(
            self,
            x,
            target,
            self.threshold,
            sparsity_coeff=sparsity_coeff,
            bandwidth=bandwidth,
            target_l0=target_l0,
            skip=self.skip_out(x),
        )
