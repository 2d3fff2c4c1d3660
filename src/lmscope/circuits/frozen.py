"""Freeze a model's attention patterns and normalisation denominators, so every path is linear.

Inside ``with Frozen(model) as frozen:`` every norm computes ``x · s ⊙ w`` with the scale ``s``
(``1/rms(x)``, or ``1/std(x)`` after centring for LayerNorm) detached, and every attention layer
computes ``pattern @ V`` with the softmax pattern detached. The first forward pass *records* each
``s`` and pattern; after ``frozen.replay()`` later passes reuse the recorded ones whatever their
input, so with a batch of perturbed copies of the prompt each row is the prompt's linearised model
(recorded tensors have batch 1 and broadcast). Values are unchanged on the recorded pass, so the
clean logits come out as usual; gradients flow only through V, the output projections, the norm
gains and the residual stream.

Attention is swapped through transformers' attention registry (eager math, eager masks), so a model
loaded with ``sdpa`` computes eager attention while frozen.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from lmscope.errors import CircuitError

_IMPL = "lmscope_frozen"
_STATE = "_lmscope_frozen"  # attribute naming the active Frozen on an attention module


def _repeat_kv(x: Tensor, groups: int) -> Tensor:
    """[B, kv_heads, T, d] → [B, kv_heads·groups, T, d] (grouped-query attention)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _frozen_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    **_: Any,
) -> tuple[Tensor, Tensor]:
    frozen: Frozen = getattr(module, _STATE)
    groups = int(getattr(module, "num_key_value_groups", 1))

    def pattern() -> Tensor:  # eager attention's own math, without gradient
        scale = scaling if scaling is not None else int(getattr(module, "head_dim", 0) or 1) ** -0.5
        scores = query.detach() @ _repeat_kv(key.detach(), groups).transpose(2, 3) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if attention_mask is not None:
            scores = scores + attention_mask[..., : scores.shape[-1]]
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)

    weights = frozen.recall(module, pattern)
    out = weights @ _repeat_kv(value, groups)
    return out.transpose(1, 2).contiguous(), weights


def _register() -> None:
    # Registering a name is idempotent; eager masks, because _frozen_attention adds them itself.
    ALL_ATTENTION_FUNCTIONS.register(_IMPL, _frozen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(_IMPL, eager_mask)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


class Frozen:
    """Context manager freezing ``model``'s norms and attention patterns (see the module doc)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.recording = True
        self._saved: dict[int, Tensor] = {}
        self._patched: list[tuple[nn.Module, Any]] = []
        self._impl: Any = None

    # -- record / replay -------------------------------------------------------------------------
    def recall(self, module: nn.Module, compute: Callable[[], Tensor]) -> Tensor:
        """The module's recorded tensor (replay), or ``compute()`` recorded now (detached)."""
        key = id(module)
        if self.recording:
            value = compute().detach()
            self._saved[key] = value
            return value
        if key not in self._saved:
            raise CircuitError(f"nothing recorded for {type(module).__name__}; run a pass first")
        return self._saved[key]

    def replay(self) -> None:
        """From now on, reuse the recorded scales and patterns instead of computing them."""
        if not self._saved:
            raise CircuitError("replay() before any recorded forward pass")
        self.recording = False

    # -- patching --------------------------------------------------------------------------------
    def __enter__(self) -> Frozen:
        _register()
        for module in self.model.modules():
            if is_norm(module):
                self._patch(module, self._norm_forward(module))
            if hasattr(module, "o_proj") and hasattr(module, "v_proj"):
                setattr(module, _STATE, self)
        config: Any = self.model.config
        self._impl = config._attn_implementation
        config._attn_implementation = _IMPL
        return self

    def __exit__(self, *exc: object) -> None:
        config: Any = self.model.config
        config._attn_implementation = self._impl
        for module, forward in reversed(self._patched):
            if forward is None:
                del module.forward
            else:
                module.forward = forward
        self._patched.clear()
        for module in self.model.modules():
            if hasattr(module, _STATE):
                delattr(module, _STATE)

    def _patch(self, module: nn.Module, forward: Callable[[Tensor], Tensor]) -> None:
        self._patched.append((module, module.__dict__.get("forward")))
        module.forward = forward  # type: ignore[method-assign]

    def _norm_forward(self, norm: nn.Module) -> Callable[[Tensor], Tensor]:
        if isinstance(norm, nn.LayerNorm):

            def layer_norm(x: Tensor) -> Tensor:
                centred = x - x.mean(-1, keepdim=True)  # linear: kept live
                s = self.recall(
                    norm, lambda: torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + norm.eps)
                )
                out = centred * s
                return out * norm.weight + norm.bias if norm.elementwise_affine else out

            return layer_norm
        eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))
        weight = getattr(norm, "weight", None)
        # Gemma's RMSNorms scale by (1 + w) in float32 then cast; Llama's cast, then scale by w.
        gemma = type(norm).__name__.startswith("Gemma")

        def rms_norm(x: Tensor) -> Tensor:
            xf = x.float()
            s = self.recall(norm, lambda: torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))
            if weight is None:
                return (xf * s).type_as(x)
            if gemma:
                return (xf * s * (1.0 + weight.float())).type_as(x)
            return weight * (xf * s).to(x.dtype)

        return rms_norm


__all__ = ["Frozen", "is_norm"]
