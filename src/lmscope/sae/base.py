"""The SAE module contract shared by every architecture: config, parameters, encode/decode, folding.

Two states of one SAE:
- *training* (``apply_b_dec_to_input=True``, ``input_scale=C``): it sees ``x / C`` and subtracts
  ``b_dec`` before encoding, as in the Gemma Scope recipe;
- *folded* (``apply_b_dec_to_input=False``, ``input_scale=1``): it runs on raw activations, latents
  come out C times larger and the reconstruction is in raw units (``SAE.folded``).

Example::

    sae = build_sae(SAEConfig("jumprelu", d_in=640, d_sae=16384, site="L6.resid_post"))
    out = sae.training_loss(x / C, sparsity_coeff=1e-3)
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from lmscope.errors import SAEError

ARCHITECTURES = (
    *("jumprelu", "topk", "batchtopk", "matryoshka_batchtopk", "relu", "jumprelu_transcoder"),
)
TOPK_ARCHITECTURES = ("topk", "batchtopk", "matryoshka_batchtopk")  # sparsity set by k
DTYPES = ("float32", "float64", "bfloat16", "float16")
THRESHOLD_INIT = 0.001
# Thresholds are stored directly (not as log θ); this floor keeps them positive after an optimiser
# step, so the JumpReLU stays a ReLU-with-a-gap and θ' = C·θ stays valid when folding.
THRESHOLD_MIN = 1e-6

_REGISTRY: dict[str, type[SAE]] = {}
S = TypeVar("S", bound="SAE")


@dataclass
class SAEConfig:
    """Everything needed to rebuild an SAE's module; JSON-serialisable with ``to_dict``/``from_dict``."""

    architecture: str
    d_in: int
    d_sae: int
    d_out: int | None = None  # None → d_in; transcoders set it
    site: str = ""  # e.g. "L6.resid_post" (the input site of a transcoder)
    out_site: str | None = None  # transcoders: e.g. "L6.mlp_out"
    model: str = ""
    k: int | None = None  # topk / batchtopk: active latents per row
    prefixes: list[int] | None = None  # matryoshka_batchtopk: nested sizes (None: W/16 … W)
    apply_b_dec_to_input: bool = True  # True while training, False once folded
    input_scale: float = 1.0  # C: training inputs are x / C; 1.0 once folded
    output_scale: float | None = None  # transcoders: C_out for targets (None → input_scale)
    skip: bool = False  # transcoders: affine skip W_skip
    dtype: str = "float32"
    training: dict[str, Any] = field(
        default_factory=dict
    )  # tokens, steps, lam, target_l0, metrics…

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise SAEError(
                f"unknown SAE architecture {self.architecture!r}; valid: {', '.join(ARCHITECTURES)}"
            )
        if self.dtype not in DTYPES:
            raise SAEError(f"unknown SAE dtype {self.dtype!r}; valid: {', '.join(DTYPES)}")
        if self.d_in <= 0 or self.d_sae <= 0 or (self.d_out is not None and self.d_out <= 0):
            raise SAEError(f"SAE widths must be positive, got d_in={self.d_in} d_sae={self.d_sae}")
        if self.architecture in TOPK_ARCHITECTURES and not (self.k and 0 < self.k <= self.d_sae):
            raise SAEError(f"{self.architecture} needs 0 < k <= d_sae={self.d_sae}, got k={self.k}")
        if self.is_transcoder:
            self.apply_b_dec_to_input = False  # input and output spaces differ
        elif self.d_out not in (None, self.d_in):
            raise SAEError(
                f"d_out={self.d_out} differs from d_in={self.d_in}; only transcoders may"
            )
        if self.skip and not self.is_transcoder:
            raise SAEError("skip=True is only valid for architecture 'jumprelu_transcoder'")
        if self.input_scale <= 0 or (self.output_scale is not None and self.output_scale <= 0):
            raise SAEError("input_scale and output_scale must be positive")

    @property
    def is_transcoder(self) -> bool:
        return self.architecture.endswith("transcoder")

    @property
    def out_dim(self) -> int:
        return self.d_in if self.d_out is None else self.d_out

    @property
    def out_scale(self) -> float:
        return self.input_scale if self.output_scale is None else self.output_scale

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def is_folded(self) -> bool:
        return not self.apply_b_dec_to_input and self.input_scale == 1.0 and self.out_scale == 1.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise SAEError(f"unknown SAE config keys {unknown}; valid: {', '.join(sorted(names))}")
        return cls(**d)


@dataclass
class LossOutput:
    """One training step's loss and what the trainer logs; ``aux`` holds architecture extras."""

    loss: Tensor  # scalar, what to backpropagate
    mse: Tensor  # squared error summed over dims, mean over batch
    l0: Tensor  # mean active latents per row (float)
    f: Tensor  # latents [B, d_sae]
    x_hat: Tensor  # reconstruction [B, d_out]
    aux: dict[str, Tensor] = field(default_factory=dict)


def register(cls: type[S]) -> type[S]:
    """Class decorator: make ``build_sae`` know ``cls.architecture``."""
    _REGISTRY[cls.architecture] = cls
    return cls


def sae_class(architecture: str) -> type[SAE]:
    if architecture not in _REGISTRY:
        raise SAEError(
            f"unknown SAE architecture {architecture!r}; valid: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[architecture]


def build_sae(cfg: SAEConfig, generator: torch.Generator | None = None) -> SAE:
    """A freshly initialised SAE of ``cfg.architecture`` (Gemma Scope init)."""
    return sae_class(cfg.architecture).init(cfg, generator=generator)


def squared_error(x_hat: Tensor, target: Tensor) -> Tensor:
    """Squared error summed over dimensions, mean over the batch (the Gemma Scope MSE)."""
    return (x_hat - target).pow(2).sum(-1).mean()


class SAE(nn.Module):
    """Base SAE: ``f = σ((x − b_dec·[apply]) @ W_enc + b_enc)``, ``x̂ = f @ W_dec + b_dec``.

    Subclasses set ``architecture`` and implement ``encode`` (the activation σ) and ``training_loss``.
    Build with ``SAE.init(cfg)`` (random) or ``cls(cfg)`` followed by ``load_state_dict``.
    """

    architecture: ClassVar[str] = ""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        if self.architecture and cfg.architecture != self.architecture:
            raise SAEError(f"config says {cfg.architecture!r} but class is {self.architecture!r}")
        self.cfg = cfg
        dt = cfg.torch_dtype
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae, dtype=dt))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dt))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.out_dim, dtype=dt))
        self.b_dec = nn.Parameter(torch.zeros(cfg.out_dim, dtype=dt))

    @classmethod
    def init(cls: type[S], cfg: SAEConfig, generator: torch.Generator | None = None) -> S:
        """Gemma Scope init: He-uniform ``W_dec`` with unit-norm rows, ``W_enc = W_decᵀ``, zero biases.

        Transcoders with ``d_in != d_out`` cannot tie, so ``W_enc`` gets its own He-uniform draw with
        unit-norm columns.
        """
        sae = cls(cfg)
        with torch.no_grad():
            w = torch.empty(cfg.d_sae, cfg.out_dim, dtype=torch.float64)
            nn.init.kaiming_uniform_(w, generator=generator)
            w /= w.norm(dim=1, keepdim=True)
            sae.W_dec.copy_(w)
            if cfg.d_in == cfg.out_dim:
                sae.W_enc.copy_(w.T)  # a copy: untied from here on
            else:
                we = torch.empty(cfg.d_sae, cfg.d_in, dtype=torch.float64)
                nn.init.kaiming_uniform_(we, generator=generator)
                sae.W_enc.copy_((we / we.norm(dim=1, keepdim=True)).T)
        return sae

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    def pre_acts(self, x: Tensor) -> Tensor:
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, f: Tensor) -> Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def training_loss(
        self,
        x: Tensor,
        *,
        sparsity_coeff: float,
        bandwidth: float = 0.001,
        target: Tensor | None = None,
        target_l0: float | None = None,
    ) -> LossOutput:
        """Loss on normalised inputs ``x`` (= raw / C); ``target`` defaults to ``x`` (SAEs).

        ``target_l0`` (JumpReLU family only) swaps ``λ·L0`` for ``λ·(L0/L0* − 1)²``.
        """
        raise NotImplementedError

    # --- the decoder constraint (Gemma Scope: unit-norm rows, tangent-only gradients) ---

    @torch.no_grad()
    def renormalise_decoder(self) -> None:
        """Rescale each latent's decoder row to unit norm (after every optimiser step)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Drop from ``W_dec.grad`` the part parallel to each row (before the optimiser step)."""
        g = self.W_dec.grad
        if g is None:
            return
        w = self.W_dec
        coef = (g * w).sum(1, keepdim=True) / w.pow(2).sum(1, keepdim=True).clamp_min(1e-12)
        g -= coef * w

    @torch.no_grad()
    def after_step(self) -> None:
        """Everything a trainer must do after ``optimizer.step()``: unit-norm rows, θ floor."""
        self.renormalise_decoder()

    # --- folding ---

    def folded(self: S, C: float | None = None, C_out: float | None = None) -> S:
        """An inference copy running on raw activations: folds C (and C_out) and the b_dec shift.

        With ``f = σ(pre(x/C_in))`` and ``x̂ = f·W_dec + b_dec (+ (x/C_in)·W_skip)`` in normalised
        units, the folded SAE satisfies ``pre'(x) = C_out·pre(x/C_in)``, so (σ positively homogeneous,
        thresholds scaled) ``f' = C_out·f`` and ``x̂' = C_out·x̂``:
        ``W_enc' = (C_out/C_in)·W_enc``, ``b_enc' = C_out·(b_enc − [apply]·b_dec·W_enc)``,
        ``b_dec' = C_out·b_dec``, ``θ' = C_out·θ``, ``W_skip' = (C_out/C_in)·W_skip``; ``W_dec``
        is unchanged (rows stay unit-norm). For SAEs C_in = C_out = C, so every W is unchanged.
        Defaults come from ``cfg.input_scale`` / ``cfg.out_scale``; folding a folded SAE is a no-op.
        """
        c_in = float(self.cfg.input_scale if C is None else C)
        if self.cfg.is_transcoder:
            if C_out is not None:
                c_out = float(C_out)
            else:  # an explicit C alone means C_out = C
                c_out = float(self.cfg.out_scale) if C is None else c_in
        else:
            if C_out is not None and float(C_out) != c_in:
                raise SAEError("C_out != C is only meaningful for transcoders")
            c_out = c_in
        if c_in <= 0 or c_out <= 0:
            raise SAEError(f"fold scales must be positive, got C_in={c_in} C_out={c_out}")
        sd = {k: v.detach().clone() for k, v in self.state_dict().items()}
        with torch.no_grad():
            b_enc = sd["b_enc"]
            if self.cfg.apply_b_dec_to_input:
                b_enc = b_enc - sd["b_dec"] @ sd["W_enc"]
            sd["b_enc"] = c_out * b_enc
            sd["W_enc"] = (c_out / c_in) * sd["W_enc"]
            sd["b_dec"] = c_out * sd["b_dec"]
            if "threshold" in sd:
                sd["threshold"] = c_out * sd["threshold"]
            if "W_skip" in sd:
                sd["W_skip"] = (c_out / c_in) * sd["W_skip"]
        cfg = dataclasses.replace(
            copy.deepcopy(self.cfg),
            apply_b_dec_to_input=False,
            input_scale=1.0,
            output_scale=None,
        )
        out = type(self)(cfg)
        out.load_state_dict(sd)
        return out.to(self.W_enc.device)


def fold_dim_scales(sae: S, r_in: Tensor, r_out: Tensor) -> S:
    """An SAE trained on ``x / r_in`` (per dimension, reconstructing ``target / r_out``) as one on
    ``x`` reconstructing ``target``, the ``b_dec`` shift folded into ``b_enc``:
    ``W_enc' = diag(1/r_in)·W_enc``, ``b_enc' = b_enc − [apply]·(b_dec/… )·W_enc`` (in the scaled
    space), ``W_dec' = W_dec·diag(r_out)``, ``b_dec' = r_out ⊙ b_dec``, ``W_skip' =
    diag(1/r_in)·W_skip·diag(r_out)``; latents and θ are unchanged. Decoder rows are then no longer
    unit-norm. A scalar C (``input_scale``) still applies on top, folded by ``folded()``.
    """
    sd = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    r_in, r_out = r_in.to(sd["W_enc"]), r_out.to(sd["W_dec"])
    with torch.no_grad():
        if sae.cfg.apply_b_dec_to_input:
            sd["b_enc"] = sd["b_enc"] - sd["b_dec"] @ sd["W_enc"]
        sd["W_enc"] = sd["W_enc"] / r_in[:, None]
        sd["W_dec"] = sd["W_dec"] * r_out
        sd["b_dec"] = sd["b_dec"] * r_out
        if "W_skip" in sd:
            sd["W_skip"] = sd["W_skip"] / r_in[:, None] * r_out
    cfg = dataclasses.replace(copy.deepcopy(sae.cfg), apply_b_dec_to_input=False)
    out = type(sae)(cfg)
    out.load_state_dict(sd)
    return out.to(sae.W_enc.device)


def check_compatible(sae: SAE, site: str, d: int, *, out_d: int | None = None) -> None:
    """Raise ``SAEError`` when the model's site width ``d`` differs from what the SAE expects."""
    if sae.cfg.d_in != d:
        raise SAEError(f"SAE expects d_in={sae.cfg.d_in} at {site} but the model's site has {d}")
    if out_d is not None and sae.cfg.out_dim != out_d:
        raise SAEError(
            f"SAE expects d_out={sae.cfg.out_dim} at {sae.cfg.out_site or 'its output site'} "
            f"but the model's site has {out_d}"
        )
