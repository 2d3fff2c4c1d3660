"""What to train (``SAESpec``, a suite of them) and how (``TrainConfig``), from Python or TOML.

A suite TOML file has an optional ``[train]`` table (any ``TrainConfig`` field) and one or more
``[[sae]]`` groups; each group expands into the cross product of its list-valued axes::

    [train]
    total_tokens = 200_000_000
    lr = 7e-5

    [[sae]]                          # 2 sites × 3 layers × 2 widths × 2 L0s = 24 SAEs
    sites = ["resid_post", "mlp_out"]
    layers = "0-2"                   # "0-17", "0,6,12", [0, 6] or 6; omit when sites are "L6.x"
    widths = [16384, "64k"]
    target_l0 = [32, 64]

    [[sae]]                          # a transcoder mlp_in → mlp_out
    architecture = "jumprelu_transcoder"
    sites = ["mlp_in"]
    out_site = "mlp_out"
    layers = 6
    widths = 16384
    target_l0 = 64
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmscope.errors import ConfigError

ARCHITECTURES = (
    *("jumprelu", "topk", "batchtopk", "matryoshka_batchtopk", "relu", "jumprelu_transcoder"),
)
TOPK_ARCHITECTURES = ("topk", "batchtopk", "matryoshka_batchtopk")
SITE_KINDS = ("resid_pre", "attn_z", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_post")
NORMALISATIONS = ("centred", "second_moment", "per_dim")
DEAD_LOSSES = ("none", "auxk", "preact")  # lmscope.train.dead
_SITE_RE = re.compile(r"^L(\d+)\.([a-z_]+)$")


def check_site(site: str) -> str:
    m = _SITE_RE.match(site)
    if not m or m.group(2) not in SITE_KINDS:
        raise ConfigError(
            f"bad site {site!r}; expected L<layer>.<kind>, kind in {', '.join(SITE_KINDS)}"
        )
    return site


def _type_ok(value: Any, annotation: str) -> bool | None:
    """Whether ``value`` fits a simple field annotation (None: an annotation not checked here).

    TOML and JSON give bools where ints are typed (``batch_size = true``) and floats where ints
    are (``2000.7``); Python's ``bool <: int`` and dataclasses' silence let both through."""
    kinds = [k.strip() for k in annotation.split("|")]
    if "None" in kinds and value is None:
        return True
    checks = {
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "bool": lambda v: isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "tuple[float, float]": lambda v: isinstance(v, list | tuple) and len(v) == 2
        and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v),
    }  # fmt: skip
    known = [checks[k] for k in kinds if k in checks]
    if len(known) != len([k for k in kinds if k != "None"]):
        return None
    return any(c(value) for c in known)


def check_field_types(obj: Any, table: str) -> None:
    """ConfigError naming the first field of dataclass ``obj`` whose value has the wrong type."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if _type_ok(value, str(f.type)) is False:
            want = str(f.type).replace("tuple[float, float]", "[float, float]")
            raise ConfigError(
                f"{table} {f.name} must be {want.replace(' | None', ' (or unset)')}, "
                f"got {value!r} ({type(value).__name__})"
            )


def _fmt_float(v: float) -> str:
    return f"{v:g}"


@dataclass(frozen=True)
class SAESpec:
    """One SAE to train. Sparsity: ``target_l0`` (λ adapted to reach it), or a fixed
    ``sparsity_coeff`` λ, or ``k`` for TopK/BatchTopK (``target_l0`` there just sets ``k``)."""

    site: str  # e.g. "L6.resid_post"; the input site of a transcoder
    width: int  # d_sae
    architecture: str = "jumprelu"
    target_l0: float | None = None
    sparsity_coeff: float | None = None
    k: int | None = None
    out_site: str | None = None  # transcoders only, e.g. "L6.mlp_out"
    skip: bool = False  # transcoders: affine skip connection
    lr: float | None = None  # None → TrainConfig.lr
    model: str = ""

    def __post_init__(self) -> None:
        check_field_types(self, "[[sae]]")
        check_site(self.site)
        arch = self.architecture
        if arch not in ARCHITECTURES:
            raise ConfigError(f"unknown architecture {arch!r}; valid: {', '.join(ARCHITECTURES)}")
        if self.width <= 0:
            raise ConfigError(f"width must be positive, got {self.width}")
        if arch in TOPK_ARCHITECTURES:
            if self.k is None and self.target_l0 is not None:
                object.__setattr__(self, "k", int(round(self.target_l0)))
            if self.k is None or not 0 < self.k <= self.width:
                raise ConfigError(f"{arch} needs k (or target_l0) in 1..{self.width}, got {self.k}")
            if self.sparsity_coeff is not None:
                raise ConfigError(f"{arch} takes k, not sparsity_coeff")
        else:
            if (self.target_l0 is None) == (self.sparsity_coeff is None):
                raise ConfigError(f"{arch} needs exactly one of target_l0 or sparsity_coeff")
            if self.target_l0 is not None and not 0 < self.target_l0 < self.width:
                raise ConfigError(f"target_l0 must be in (0, {self.width}), got {self.target_l0}")
            if self.k is not None:
                raise ConfigError(f"k is only for topk/batchtopk, not {arch}")
        if (arch == "jumprelu_transcoder") != (self.out_site is not None):
            raise ConfigError("out_site is required for jumprelu_transcoder and only valid there")
        if self.out_site is not None:
            check_site(self.out_site)
        if self.skip and arch != "jumprelu_transcoder":
            raise ConfigError("skip=True is only valid for jumprelu_transcoder")

    @property
    def sites(self) -> tuple[str, ...]:
        """Every site this SAE reads from a batch."""
        return (self.site,) if self.out_site is None else (self.site, self.out_site)

    def _parts(self) -> list[tuple[str, str]]:
        """(readable, folder-safe) pieces of the name."""
        site = self.site if self.out_site is None else f"{self.site}-to-{self.out_site}"
        parts = [(site, site)]
        if self.architecture != "jumprelu":
            parts.append((self.architecture, self.architecture))
        parts.append((f"w{self.width}", f"w{self.width}"))
        if self.k is not None:
            parts.append((f"k_{self.k}", f"k{self.k}"))
        elif self.target_l0 is not None:
            t = _fmt_float(self.target_l0)
            parts.append((f"l0_{t}", f"l0{t}"))
        else:
            c = _fmt_float(self.sparsity_coeff or 0.0)
            parts.append((f"lam_{c}", f"lam{c}"))
        return parts

    @property
    def name(self) -> str:
        """e.g. ``L6.resid_post/w16384/l0_64``."""
        return "/".join(p for p, _ in self._parts())

    @property
    def folder(self) -> str:
        """Folder-safe name, e.g. ``L6.resid_post-w16384-l064``."""
        return "-".join(p for _, p in self._parts())


@dataclass
class TrainConfig:
    """The Gemma Scope recipe by default; every step count is in optimiser steps (batches).

    Short runs: both warm-ups are capped at ``warmup_max_frac`` of the run's total steps, so a
    2,000-step test still spends most of its time at full lr and full λ (Gemma Scope's runs are
    ~10⁵–10⁶ steps, where the cap never bites). ``lr_decay_frac`` > 0 adds a cosine decay to 0 over
    that final fraction of the run (off by default, as in Gemma Scope).
    """

    total_tokens: int = 100_000_000
    batch_size: int = 4096  # what data factories built from a store use; the trainer counts rows
    lr: float = 7e-5
    adam_betas: tuple[float, float] = (0.0, 0.999)
    lr_warmup_steps: int = 1_000  # cosine ramp from 0.1·lr to lr
    lr_decay_frac: float = 0.0
    lambda_warmup_steps: int = 10_000  # linear ramp of a fixed λ from 0
    warmup_max_frac: float = 0.1
    bandwidth: float = 0.001  # ε of the rectangle kernel
    threshold_init: float = 0.001  # θ₀
    # JumpReLU with a target L0: start each latent's θ at the quantile of its own pre-activations
    # (on the calibration sample) above which it fires on target_l0 / width of rows, floored at
    # threshold_init. L0 starts at the target and every latent fires from step 0: no dense
    # first phase while a small fixed θ₀ lets hundreds of latents fire (the sparse kernel works
    # from step 0), and no latent starts silent as a large fixed θ₀ leaves many.
    threshold_init_from_data: bool = False
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    fast: bool = True  # JumpReLU: sparse-aware kernel when lmscope.train.kernels is available
    fast_max_density: float = 1 / 32  # ...used while the last step's L0 ≤ this × width
    # Normalisation: "centred" divides by sqrt(E‖x − μ‖²) (see trainer._calibrate for why);
    # "second_moment" is Gemma Scope's sqrt(E‖x‖²); "per_dim" also equalises every dimension's variance
    # (one dimension carries 63-76% of the variance at Gemma 3 sites, and MSE then spends itself
    # there while the model reacts to the others; folded exactly, decoder rows not unit-norm).
    normalise: str = "centred"
    norm_batches: int = 32  # batches used to estimate C and μ before training
    # Target-L0 controller (schedules.L0Controller): log λ starts at log(lambda_init) and moves by
    # at most l0_gain·lr·√d_in per step (the gain is matched to how fast θ can follow, see _Run).
    lambda_init: float = 1e-3
    l0_gain: float = 2.0
    l0_ema: float = 0.95
    # ...and JumpReLU thresholds are also scaled directly, θ ← θ·exp(l0_theta_gain·log(L0/L0*))
    # clipped to ±l0_theta_gain per step: λ only reaches L0 through Adam's ~lr-per-step moves of
    # θ, a lag that made the λ loop overshoot (64 asked, 86 reached on Gemma L6); acting on θ
    # answers within tens of steps. 0 turns it off (λ control alone).
    l0_theta_gain: float = 0.01
    dead_after_tokens: int = 10_000_000  # a latent is dead if it has not fired for this many rows
    # JumpReLU family: an auxiliary loss on dead latents (lmscope.train.dead): "auxk" (dead
    # latents reconstruct the residual, k_aux of them per row; 0 → d/2), "preact" (push their
    # pre-activations up to θ) or "none". TopK/BatchTopK always use AuxK.
    dead_loss: str = "none"
    dead_coeff: float = 1 / 32
    dead_k_aux: int = 0
    # The KL phase after the MSE phase (lmscope.train.finetune; `lmscope build` runs it): each SAE
    # spliced in, loss = KL(clean ‖ spliced) + kl_mse_coeff·MSE, over kl_tokens train tokens in
    # batches of kl_batch_size sequences; the KL over each token's top kl_top_k clean next tokens
    # (their union over the batch) plus a tail bucket. 0 tokens: no KL phase.
    kl_tokens: int = 0
    kl_batch_size: int = 4
    kl_lr: float = 1e-4
    kl_mse_coeff: float = 1.0
    kl_top_k: int = 64
    checkpoint_every: int = 10_000  # steps; 0 → only on signals and at max_steps
    log_every: int = 100
    max_steps: int | None = None  # stop early (with a checkpoint): time-boxing, tests
    progress: bool = True
    tensorboard: bool = False

    def __post_init__(self) -> None:
        check_field_types(self, "[train]")
        self.adam_betas = (float(self.adam_betas[0]), float(self.adam_betas[1]))
        if self.normalise not in NORMALISATIONS:
            raise ConfigError(
                f"unknown normalise {self.normalise!r}; valid: {', '.join(NORMALISATIONS)}"
            )
        if self.dead_loss not in DEAD_LOSSES:
            raise ConfigError(
                f"unknown dead_loss {self.dead_loss!r}; valid: {', '.join(DEAD_LOSSES)}"
            )
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"training dtype must be float32 or float64, got {self.dtype!r}")
        for f in ("total_tokens", "batch_size", "norm_batches", "log_every", "lr", "kl_lr"):
            if not getattr(self, f) > 0:  # `not >` also refuses NaN
                raise ConfigError(f"{f} must be positive, got {getattr(self, f)}")
        if not 0 <= self.lr_decay_frac < 1 or not 0 < self.warmup_max_frac <= 1:
            raise ConfigError("lr_decay_frac must be in [0, 1) and warmup_max_frac in (0, 1]")

    @property
    def total_steps(self) -> int:
        return max(1, self.total_tokens // self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown [train] keys {unknown}; valid: {', '.join(sorted(names))}")
        return cls(**d)


# --- suite expansion --------------------------------------------------------------------------


def parse_layers(v: int | str | list[int]) -> list[int]:
    """``6``, ``[0, 6]``, ``"0-17"``, ``"0-5,12"`` → sorted unique layers."""
    if isinstance(v, int):
        return [v]
    if isinstance(v, list):
        return sorted({int(x) for x in v})
    out: set[int] = set()
    for part in str(v).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise ConfigError(f"bad layers {v!r}; expected e.g. 6, [0, 6], '0-17' or '0-5,12'")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        out.update(range(lo, hi + 1))
    return sorted(out)


def parse_width(v: int | str) -> int:
    """``16384`` or ``"16k"`` (×1024) / ``"1m"`` (×1024²)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    m = re.fullmatch(r"(\d+)([kKmM]?)", str(v).strip())
    if not m:
        raise ConfigError(f"bad width {v!r}; expected an int or e.g. '16k'")
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[m.group(2).lower()]


def _as_list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else [v]


_GROUP_KEYS = {"sites", "layers", "widths", "architecture", "target_l0", "sparsity_coeff", "k"}
_GROUP_KEYS |= {"out_site", "skip", "lr", "model"}


def expand_group(group: dict[str, Any]) -> list[SAESpec]:
    """One ``[[sae]]`` table → its SAESpecs (cross product of sites × layers × widths × sparsity)."""
    unknown = sorted(set(group) - _GROUP_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown [[sae]] keys {unknown}; valid: {', '.join(sorted(_GROUP_KEYS))}"
        )
    if "sites" not in group or "widths" not in group:
        raise ConfigError("each [[sae]] group needs 'sites' and 'widths'")
    kinds = [str(s) for s in _as_list(group["sites"])]
    layers = parse_layers(group["layers"]) if "layers" in group else [None]
    sparsity = [
        (key, v)
        for key in ("target_l0", "sparsity_coeff", "k")
        for v in _as_list(group.get(key, []))
    ]
    if not sparsity:
        raise ConfigError("each [[sae]] group needs one of target_l0, sparsity_coeff or k")
    common = {k: group[k] for k in ("architecture", "skip", "lr", "model") if k in group}
    specs = []
    for layer, kind, width, (skey, sval) in itertools.product(
        layers, kinds, _as_list(group["widths"]), sparsity
    ):
        site = kind if layer is None else f"L{layer}.{kind}"
        out = group.get("out_site")
        out_site = None if out is None else (out if layer is None else f"L{layer}.{out}")
        specs.append(
            SAESpec(
                site=site, width=parse_width(width), out_site=out_site, **{skey: sval}, **common
            )
        )
    return specs


def check_unique(specs: list[SAESpec]) -> None:
    seen: set[str] = set()
    for s in specs:
        if s.folder in seen:
            raise ConfigError(f"SAE {s.name} appears twice in the suite")
        seen.add(s.folder)


def suite_from_dict(d: dict[str, Any]) -> tuple[list[SAESpec], TrainConfig]:
    unknown = sorted(set(d) - {"train", "sae"})
    if unknown:
        raise ConfigError(f"unknown suite tables {unknown}; valid: train, sae")
    train = TrainConfig.from_dict(dict(d.get("train", {})))
    specs = [s for g in d.get("sae", []) for s in expand_group(g)]
    if not specs:
        raise ConfigError("the suite has no [[sae]] groups")
    check_unique(specs)
    return specs, train


def load_suite(path: str | Path) -> tuple[list[SAESpec], TrainConfig]:
    """Read a suite TOML file (format in this module's docstring)."""
    try:
        with open(path, "rb") as f:
            d = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"suite config {path} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"suite config {path} is not valid TOML: {e}") from None
    return suite_from_dict(d)
