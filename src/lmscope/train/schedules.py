"""Learning-rate and sparsity schedules, and the controller that steers λ to a target L0.

All functions of the step are pure, so a resumed run recomputes exactly the values an
uninterrupted one would have used; the controller's state is two floats saved in checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar


def capped_warmup(nominal: int, total_steps: int, max_frac: float) -> int:
    """Warm-up length: the recipe's ``nominal`` steps, but at most ``max_frac`` of a short run."""
    if nominal <= 0:
        return 0
    return max(1, min(nominal, int(max_frac * total_steps)))


def lr_scale(step: int, total_steps: int, warmup: int, decay_frac: float = 0.0) -> float:
    """Multiplier on the base lr: cosine ramp 0.1 → 1 over ``warmup`` steps (Gemma Scope), then
    constant; with ``decay_frac`` > 0 a cosine decay to 0 over the last ``decay_frac`` of the run."""
    s = 1.0
    if step < warmup:
        s = 0.1 + 0.9 * 0.5 * (1.0 - math.cos(math.pi * step / warmup))
    decay = int(decay_frac * total_steps)
    start = total_steps - decay
    if decay > 0 and step >= start:
        s *= 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - start) / decay)))
    return s


def lambda_scale(step: int, warmup: int) -> float:
    """Linear warm-up of a fixed sparsity coefficient from 0 (Gemma Scope: 10,000 steps)."""
    return 1.0 if warmup <= 0 else min(1.0, step / warmup)


@dataclass
class L0Controller:
    """Integral control of log λ towards a target L0, on an EMA of the measured L0.

    Why a controller rather than Gemma Scope 2's quadratic penalty ``λ(L0/L0* − 1)²``: the
    quadratic's optimum sits where its pull balances the reconstruction gain, so it lands *near*
    L0* with an offset that depends on λ and the data; an integrator has zero steady-state error
    by construction and needs no per-site λ sweep. Working on log λ and log(L0/L0*) makes the
    loop scale-free: the same gain fits λ of 1e-6 or 1 and targets of 8 or 512. λ's magnitude only
    sets the balance between the θ gradients of the MSE and of the L0 term, and Adam normalises
    step sizes, so L0 responds smoothly to λ with a lag of a few hundred steps; the EMA filters
    batch noise and the per-step change is clipped to ``gain`` so early huge errors (L0 ≈ d_sae/2
    at init) ramp λ up gradually (this replaces the fixed-λ warm-up in target mode).

    λ stays within [LAM_MIN, LAM_MAX] (anti-windup). A target *above* the L0 that reconstruction
    alone settles at (λ → 0) cannot be reached with a non-negative penalty: λ then rests at
    LAM_MIN and the logged L0 shows the gap (on real LM sites with W ≫ L0* this does not arise).
    """

    LAM_MIN: ClassVar[float] = 1e-9
    LAM_MAX: ClassVar[float] = 1e3

    target: float
    log_lam: float
    gain: float = 0.02
    ema_beta: float = 0.95
    ema: float = -1.0  # EMA of L0; < 0 until the first measurement

    @classmethod
    def start(cls, target: float, lam_init: float, gain: float, ema_beta: float) -> L0Controller:
        return cls(target=target, log_lam=math.log(lam_init), gain=gain, ema_beta=ema_beta)

    @property
    def lam(self) -> float:
        return math.exp(self.log_lam)

    def update(self, l0: float) -> None:
        """Feed the L0 measured at this step; moves λ for the next one."""
        self.ema = l0 if self.ema < 0 else self.ema_beta * self.ema + (1 - self.ema_beta) * l0
        err = math.log(max(self.ema, 1e-3) / self.target)  # > 0: too dense → raise λ
        step = self.gain * max(-1.0, min(1.0, err))
        self.log_lam = min(math.log(self.LAM_MAX), max(math.log(self.LAM_MIN), self.log_lam + step))

    def state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> L0Controller:
        return cls(**d)
