"""Train a whole suite of SAEs in one pass over the data (the Gemma Scope recipe).

Each batch ``{site: [B, d]}`` feeds every SAE its own site (a transcoder its in-site and out-site),
so one harvest or one model forward trains SAEs of all sites, widths and sparsities at once. Each SAE
has its own Adam, schedules and (in target-L0 mode) λ controller.

    specs, cfg = load_suite("suite.toml")
    store = ActivationStore("runs/acts")
    train_suite(specs, store_data(store, store.sites, cfg.batch_size), cfg, "runs/suite")
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lmscope.errors import ConfigError, LmscopeError
from lmscope.sae import SAE, BatchTopKSAE, JumpReLUSAE, SAEConfig, build_sae, save_sae
from lmscope.sae.base import fold_dim_scales
from lmscope.train import checkpoint as ck
from lmscope.train.config import TOPK_ARCHITECTURES, SAESpec, TrainConfig, check_unique
from lmscope.train.dead import add_dead_latent_grads
from lmscope.train.schedules import L0Controller, capped_warmup, lambda_scale, lr_scale

try:  # the sparse-aware JumpReLU step; written separately, optional
    from lmscope.train import kernels as _kernels
except ImportError:  # pragma: no cover
    _kernels = None  # type: ignore[assignment]

DataFactory = Callable[[int], Iterator[dict[str, Tensor]]]
"""``data(start_batch)``: batches from position ``start_batch`` on, identical on every call."""


class StepSync(Protocol):
    """The ranks that train the same SAEs data-parallel (``lmscope.distributed.DataParallel``)."""

    def batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """This rank's rows of the global batch."""

    def grads(self, params: list[Tensor]) -> None:
        """Make every rank's ``.grad`` (of its rows' mean loss) the global batch's, in place."""

    def stats(self, vals: Tensor, fires: Tensor, rows: int) -> tuple[Tensor, Tensor, int]:
        """Global-batch means of the per-row means ``vals``, summed fire counts, global rows."""


class TrainingInterrupted(LmscopeError):
    """Training stopped early (signal or ``max_steps``) after writing a checkpoint."""


def store_data(store: Any, sites: Sequence[str], batch_size: int, *, seed: int = 0) -> DataFactory:
    """A data factory over an ``ActivationStore`` (looping, so ``total_tokens`` decides the end)."""
    sites = list(sites)
    return lambda start: store.iter_batches(
        sites, batch_size, seed=seed, loop=True, start_batch=start
    )


# --- normalisation ---------------------------------------------------------------------------


@dataclass
class SiteStats:
    mean: Tensor  # float64 [d]
    mean_sq_norm: float  # E‖x‖²
    var: float  # E‖x − μ‖²
    var_dim: Tensor | None = None  # float64 [d]: E(x_j − μ_j)²
    sample: Tensor | None = None  # float32 [≤ SAMPLE_ROWS, d]: the first rows, for data-based θ₀

    def dim_scale(self) -> Tensor:
        """``normalise = "per_dim"``: r_j = sqrt(d·var_j / var), so that x / (C·r) has every
        dimension's variance equal and E‖x/(C·r) − μ/(C·r)‖² = 1 as with "centred" scaling."""
        assert self.var_dim is not None
        d = self.var_dim.numel()
        return (self.var_dim.clamp_min(1e-12) * d / max(self.var, 1e-12)).sqrt().float()

    def scale(self, normalise: str) -> float:
        """C such that the SAE sees ``x / C``.

        "centred" (our default) makes E‖x/C − μ/C‖² = 1; Gemma Scope's "second_moment" makes
        E‖x/C‖² = 1. On Gemma 3 270M a near-constant mean carries ~85% of ‖x‖², so the latter leaves
        the part SAEs model with variance ≈ 0.13: λ, θ₀, ε and lr then mean different things on
        different sites. Centred scaling puts every site's informative variance at 1 and ``b_dec``
        (initialised to μ/C) absorbs the mean; folding is the same scalar algebra either way.
        """
        v = self.mean_sq_norm if normalise == "second_moment" else self.var
        return math.sqrt(max(v, 1e-12))


SAMPLE_ROWS = 2048  # rows kept per site for data-based θ₀: 54 sites × 2,048 × 640 × 4 B ≈ 280 MB


def calibrate(data: DataFactory, sites: Sequence[str], n_batches: int) -> dict[str, SiteStats]:
    """Mean and second moments per site from the first ``n_batches`` batches (float64), and the
    first ``SAMPLE_ROWS`` rows of each site."""
    it = data(0)
    sums: dict[str, Tensor] = {}
    samples: dict[str, list[Tensor]] = {s: [] for s in sites}
    sq: dict[str, float] = dict.fromkeys(sites, 0.0)
    sq_dim: dict[str, Tensor] = {}
    rows = 0
    for _, batch in zip(range(n_batches), it):
        for s in sites:
            if s not in batch:
                raise ConfigError(f"batches lack site {s!r}; they have {', '.join(sorted(batch))}")
            x = batch[s].detach().to(torch.float64)
            sums[s] = sums.get(s, 0) + x.sum(0)
            sq[s] += float(x.pow(2).sum())
            sq_dim[s] = sq_dim.get(s, 0) + x.pow(2).sum(0)
            kept = sum(t.shape[0] for t in samples[s])
            if kept < SAMPLE_ROWS:
                samples[s].append(batch[s][: SAMPLE_ROWS - kept].detach().float().cpu().clone())
        rows += next(iter(batch.values())).shape[0]
    if hasattr(it, "close"):
        it.close()
    if rows == 0:
        raise ConfigError("the data factory yielded no batches")
    out = {}
    for s in sites:
        mean = sums[s].cpu() / rows
        msq = sq[s] / rows
        var_dim = (sq_dim[s].cpu() / rows - mean.pow(2)).clamp_min(0)
        out[s] = SiteStats(mean, msq, msq - float(mean.pow(2).sum()), var_dim,
                           torch.cat(samples[s]))  # fmt: skip
    return out


# --- one SAE in training ---------------------------------------------------------------------


def _sae_seed(seed: int, folder: str) -> int:
    # stable per SAE: adding an SAE to a suite does not change the others' init
    return (seed * 1_000_003 + zlib.crc32(folder.encode())) % 2**63


class _Run:
    """One SAE, its optimiser, λ (fixed+warm-up or controlled), running metrics."""

    # Devices with a fused Adam kernel (torch >= 2.4 has one for CPU); elsewhere plain Adam.
    FUSED_ADAM_DEVICES = frozenset(("cpu", "cuda", "mps", "xpu"))

    def __init__(self, spec: SAESpec, cfg: TrainConfig, dims: dict[str, int], scales: list[float]):
        self.spec, self.cfg = spec, cfg
        self.c_in, self.c_out = scales
        self.r_in: Tensor | None = None  # normalise = "per_dim": x / (C·r), per dimension
        self.r_out: Tensor | None = None
        tc = spec.out_site is not None
        sae_cfg = SAEConfig(
            spec.architecture,
            d_in=dims[spec.site],
            d_sae=spec.width,
            d_out=dims[spec.out_site] if spec.out_site else None,
            site=spec.site,
            out_site=spec.out_site,
            model=spec.model,
            k=spec.k,
            input_scale=self.c_in,
            output_scale=self.c_out if tc else None,
            skip=spec.skip,
            dtype=cfg.dtype,
        )
        gen = torch.Generator().manual_seed(_sae_seed(cfg.seed, spec.folder))
        self.sae: SAE = build_sae(sae_cfg, generator=gen).to(cfg.device)
        self.names = [n for n, _ in self.sae.named_parameters()]
        self.lr = spec.lr if spec.lr is not None else cfg.lr
        params = list(self.sae.parameters())
        # Fused Adam makes one pass over param, grad and moments (~14 ms vs ~80 ms foreach at
        # d=640, W=16k). Every SAE gets it, so the fast and autograd paths step alike (fused and
        # unfused Adam differ in the last bit); it assumes each grad is laid out like its param.
        fused = all(
            p.is_floating_point() and p.device.type in self.FUSED_ADAM_DEVICES for p in params
        )
        self.opt = torch.optim.Adam(params, lr=self.lr, betas=cfg.adam_betas, fused=fused or None)
        self.topk = spec.architecture in TOPK_ARCHITECTURES
        self.fast = cfg.fast and _kernels is not None and spec.architecture == "jumprelu"
        # The sparse kernel pays only when few latents fire: with half of them active (θ₀ far
        # below the data's scale, early steps) it was 20× slower than autograd at W = 1024. So it
        # runs once the previous step's L0 is at most cfg.fast_max_density·W; that L0 is
        # checkpointed, so a resumed run takes the same path at every step.
        self.prev_l0 = math.inf
        self.grads: _kernels.StepOut | None = None  # the kernel's last output: buffers to reuse
        self.sync: StepSync | None = None  # other ranks training this SAE on other rows, if any
        self.ctl: L0Controller | None = None
        if spec.target_l0 is not None and not self.topk:
            # θ moves ≈ lr per Adam step and normalised pre-activations have scale ≈ 1/√d_in, so
            # L0 answers λ in ~1/(lr·√d_in) steps: the gain is matched to that lag.
            gain = cfg.l0_gain * self.lr * math.sqrt(sae_cfg.d_in)
            self.ctl = L0Controller.start(spec.target_l0, cfg.lambda_init, gain, cfg.l0_ema)
        total = cfg.total_steps
        self.lr_warmup = capped_warmup(cfg.lr_warmup_steps, total, cfg.warmup_max_frac)
        self.lam_warmup = capped_warmup(cfg.lambda_warmup_steps, total, cfg.warmup_max_frac)
        dt, dev = self.sae.cfg.torch_dtype, cfg.device
        self.since_fire = torch.zeros(spec.width, dtype=torch.int64, device=dev)
        self.target_mean = torch.zeros(self.sae.cfg.out_dim, dtype=dt, device=dev)  # for FVU
        self.window = [0.0] * 5  # sums since the last log line: loss, mse, l0, var, steps
        self.last: dict[str, Any] = {}

    def init_from_data(self, stats: dict[str, SiteStats]) -> None:
        """Start b_dec at the data mean so it absorbs the (large, near-constant) mean from step 0."""
        sae, s = self.sae, self.spec
        dt = sae.cfg.torch_dtype
        if self.cfg.normalise == "per_dim":
            dev = sae.W_enc.device
            self.r_in = stats[s.site].dim_scale().to(dev, dt)
            self.r_out = stats[s.out_site or s.site].dim_scale().to(dev, dt)
        mu_out = self._scaled_out(stats[s.out_site or s.site].mean.to(sae.W_dec.device, dt))
        with torch.no_grad():
            sae.b_dec.copy_(mu_out)
            if s.out_site is not None:  # a transcoder's input has no b_dec shift: centre via b_enc
                mu_in = self._scaled_in(stats[s.site].mean.to(sae.W_enc.device, dt))
                sae.b_enc.copy_(-(mu_in @ sae.W_enc))
            if isinstance(getattr(sae, "threshold", None), nn.Parameter):
                theta = sae.get_parameter("threshold")
                theta.fill_(self.cfg.threshold_init)
                sample = stats[s.site].sample
                if (
                    self.cfg.threshold_init_from_data
                    and s.target_l0 is not None
                    and sample is not None
                ):
                    theta.copy_(self._theta_from_data(sample, float(s.target_l0)))
        self.target_mean.copy_(mu_out)

    def _theta_from_data(self, sample: Tensor, target_l0: float) -> Tensor:
        """θ_j = the (1 − L0*/W) quantile of latent j's pre-activation on the sample, floored at
        threshold_init: each latent fires on ≈ L0*/W of rows, so L0 starts at the target."""
        sae = self.sae
        x = self._scaled_in(sample.to(sae.W_enc.device, sae.W_enc.dtype))
        pre = sae.pre_acts(x)
        q = 1.0 - min(max(target_l0 / sae.cfg.d_sae, 0.0), 1.0)
        theta = torch.quantile(pre.float(), q, dim=0).to(pre.dtype)
        return theta.clamp_min(self.cfg.threshold_init)

    def _scaled_in(self, x: Tensor) -> Tensor:
        x = x / self.c_in
        return x if self.r_in is None else x / self.r_in

    def _scaled_out(self, x: Tensor) -> Tensor:
        x = x / self.c_out
        return x if self.r_out is None else x / self.r_out

    def lam(self, step: int) -> float:
        if self.topk:
            return 0.0
        if self.ctl is not None:  # the controller ramps λ itself (no fixed warm-up)
            return self.ctl.lam
        return float(self.spec.sparsity_coeff or 0.0) * lambda_scale(step, self.lam_warmup)

    def lr_at(self, step: int) -> float:
        return self.lr * lr_scale(
            step, self.cfg.total_steps, self.lr_warmup, self.cfg.lr_decay_frac
        )

    def train_step(self, batch: dict[str, Tensor], step: int) -> None:
        sae, s, cfg = self.sae, self.spec, self.cfg
        x = self._scaled_in(batch[s.site])
        t = self._scaled_out(batch[s.out_site]) if s.out_site else x
        lam = self.lam(step)
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(step)
        self.opt.zero_grad(set_to_none=True)
        if self.fast and self.prev_l0 <= cfg.fast_max_density * sae.cfg.d_sae:
            loss, mse, l0, fires = self._fast_grads(x, lam)
            assert self.grads is not None and self.grads.x_hat is not None
            self._dead_grads(x, t, self.grads.x_hat)
            if self.sync is not None:
                self.sync.grads(list(sae.parameters()))
            self.opt.step()
            # = sae.after_step(): unit-norm decoder rows (in place, no temporaries), θ floor
            _kernels.renormalise_rows_(sae.W_dec)
            cast(JumpReLUSAE, sae).clamp_threshold()
        else:
            kw: dict[str, Any] = {}
            if self.topk:  # AuxK on latents that have not fired for dead_after_tokens rows
                kw["dead_mask"] = self.since_fire >= cfg.dead_after_tokens
            out = sae.training_loss(
                x,
                sparsity_coeff=lam,
                bandwidth=cfg.bandwidth,
                target=t if s.out_site else None,
                **kw,
            )
            out.loss.backward()
            self._dead_grads(x, t, out.x_hat)
            if self.sync is not None:
                self.sync.grads(list(sae.parameters()))
            loss, mse, l0, fires = out.loss, out.mse, out.l0, (out.f != 0).sum(0)
            sae.remove_parallel_grads()
            self.opt.step()
            sae.after_step()  # unit-norm decoder rows, θ floor
        with torch.no_grad():
            var = (t - self.target_mean).pow(2).sum(1).mean()
            stats, rows = torch.stack([loss.detach(), mse.detach(), l0.detach(), var]), x.shape[0]
            if self.sync is not None:  # global-batch values, so every rank steers λ and θ alike
                stats, fires, rows = self.sync.stats(stats, fires, rows)
            self.since_fire = torch.where(fires > 0, 0, self.since_fire + rows)
            vals = stats.tolist()
        for i, v in enumerate(vals):  # one device sync per SAE per step (the controller needs L0)
            self.window[i] += v
        self.window[4] += 1
        self.prev_l0 = vals[2]
        if self.ctl is not None:
            self.ctl.update(vals[2])
            self._steer_thresholds(vals[2], fires)

    def _dead_grads(self, x: Tensor, t: Tensor, x_hat: Tensor) -> None:
        """JumpReLU family: the dead-latent loss (``cfg.dead_loss``, lmscope.train.dead)."""
        cfg = self.cfg
        if self.topk or cfg.dead_loss == "none" or not hasattr(self.sae, "threshold"):
            return
        dead = self.since_fire >= cfg.dead_after_tokens
        k_aux = cfg.dead_k_aux or max(1, self.sae.cfg.out_dim // 2)
        add_dead_latent_grads(self.sae, x, (t - x_hat).detach(), dead, kind=cfg.dead_loss,
                              coeff=cfg.dead_coeff, k_aux=k_aux)  # fmt: skip

    def _steer_thresholds(self, l0: float, fires: Tensor) -> None:
        """Target-L0 mode, JumpReLU family: move θ towards L0* (see config).

        Too dense: each θ rises in proportion to how often its latent fired in this batch
        (``fires / mean fires``, capped at 4), so frequent latents give way and rare ones are left
        alone: raising every θ alike killed rare latents in short runs (70% of a 1,024-latent SAE
        never fired after 117 steps). Too sparse: every θ falls alike, which also revives latents.
        """
        theta = getattr(self.sae, "threshold", None)
        gain = self.cfg.l0_theta_gain
        if not isinstance(theta, nn.Parameter) or gain <= 0 or self.ctl is None:
            return
        err = max(-1.0, min(1.0, math.log(max(l0, 1e-3) / self.ctl.target)))  # > 0: too dense
        with torch.no_grad():
            if err <= 0:
                theta.mul_(math.exp(gain * err))
                return
            f = fires.to(theta.dtype)
            weight = (f / f.mean().clamp_min(1e-12)).clamp_(max=4.0)
            theta.mul_(torch.exp(gain * err * weight))

    def _fast_grads(self, x: Tensor, lam: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The sparse-aware kernel: autograd's gradients, written into ``.grad``, with W_dec's
        row-parallel part removed (= ``sae.remove_parallel_grads()``)."""
        p = dict(self.sae.named_parameters())
        o = self.grads = _kernels.jumprelu_step_grads(
            p["W_enc"].detach(), p["b_enc"].detach(), p["W_dec"].detach(), p["b_dec"].detach(),
            p["threshold"].detach(), x, lam, self.cfg.bandwidth, into=self.grads,
        )  # fmt: skip
        _kernels.remove_parallel_grads_(p["W_dec"].detach(), o.grad_W_dec)
        for name, g in o.grads().items():
            # Fused Adam walks param, grad and moments as flat memory: a grad laid out unlike its
            # param (a transposed view) would be a wrong update, not an error.
            if g.stride() != p[name].stride():
                g = torch.empty_like(p[name]).copy_(g)
            p[name].grad = g
        return o.loss, o.mse, o.l0, o.fire_counts

    def log_record(self, step: int, tokens: int) -> dict[str, Any]:
        """Means since the last record; loss and mse are in normalised units (x / C)."""
        loss, mse, l0, var, n = self.window
        n = max(n, 1.0)
        rec = {
            "step": step,
            "tokens": tokens,
            "loss": loss / n,
            "mse": mse / n,
            "l0": l0 / n,
            "fvu": mse / max(var, 1e-30),  # mean-centred: MSE / variance around the mean
            "dead": int((self.since_fire >= self.cfg.dead_after_tokens).sum()),
            "lambda": self.lam(step),
            "lr": self.lr_at(max(step - 1, 0)),
        }
        self.window = [0.0] * 5
        self.last = rec
        return rec

    # --- checkpoint state ---

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {f"sae.{k}": v for k, v in self.sae.state_dict().items()}
        tensors.update(ck.optimizer_tensors(self.opt, self.names))
        tensors["since_fire"] = self.since_fire
        tensors["target_mean"] = self.target_mean
        if self.r_in is not None and self.r_out is not None:
            tensors["r_in"], tensors["r_out"] = self.r_in, self.r_out
        scalars = {
            "spec": asdict(self.spec),
            "dims": dict(zip(self.spec.sites, (self.sae.cfg.d_in, self.sae.cfg.out_dim))),
            "scales": [self.c_in, self.c_out],
            "controller": self.ctl.state() if self.ctl else None,
            "window": self.window,
            "last": self.last,
            "prev_l0": self.prev_l0,
        }
        return tensors, scalars

    def load(self, tensors: dict[str, Tensor], scalars: dict[str, Any]) -> None:
        if scalars["spec"] != asdict(self.spec):
            raise ConfigError(f"the checkpoint of {self.spec.name} was made for a different spec")
        sd = {k[4:]: v for k, v in tensors.items() if k.startswith("sae.")}
        self.sae.load_state_dict(sd)
        ck.load_optimizer_tensors(self.opt, self.names, tensors)
        self.since_fire = tensors["since_fire"].to(self.cfg.device)
        self.target_mean = tensors["target_mean"].to(self.cfg.device)
        if "r_in" in tensors:
            self.r_in = tensors["r_in"].to(self.cfg.device)
            self.r_out = tensors["r_out"].to(self.cfg.device)
        if scalars["controller"] is not None:
            self.ctl = L0Controller.from_state(scalars["controller"])
        self.window, self.last = list(scalars["window"]), dict(scalars["last"])
        self.prev_l0 = float(scalars.get("prev_l0", math.inf))

    def final(self, steps: int, tokens: int) -> SAE:
        """The inference SAE: C folded in, training summary in its config."""
        sae = self.sae
        if self.r_in is not None and self.r_out is not None:
            sae = fold_dim_scales(sae, self.r_in, self.r_out)
        out = sae.folded()
        if isinstance(out, BatchTopKSAE):
            out = out.to_jumprelu()  # its inference form (DESIGN: saved as JumpReLU)
        keep = ("l0", "fvu", "dead", "lambda")
        out.cfg.training = {
            **out.cfg.training,
            "tokens": tokens,
            "steps": steps,
            **{k: self.last.get(k) for k in keep},
            "target_l0": self.spec.target_l0,
            "sparsity_coeff": self.spec.sparsity_coeff,
            "lr": self.lr,
            "seed": self.cfg.seed,
            "normalise": self.cfg.normalise,
            "input_scale": self.c_in,
            "output_scale": self.c_out,
        }
        return out


# --- the loop --------------------------------------------------------------------------------


def _summary(runs: list[_Run]) -> str:
    recs = [(r.spec, r.last) for r in runs if r.last]
    if len(recs) <= 2:
        return " | ".join(
            f"{s.folder}: loss {d['loss']:.3g} L0 {d['l0']:.1f} FVU {d['fvu']:.3f}" for s, d in recs
        )
    fvu = [d["fvu"] for _, d in recs]
    err = [abs(d["l0"] / (s.target_l0 or s.k) - 1) for s, d in recs if s.target_l0 or s.k]
    worst = f"L0 off by ≤{max(err):.0%}, " if err else ""
    dead = max(d["dead"] for _, d in recs)
    loss = max(d["loss"] for _, d in recs)
    fvus = f"FVU mean {sum(fvu) / len(fvu):.3f} max {max(fvu):.3f}"
    return f"{worst}{fvus}, loss ≤{loss:.3g}, dead ≤{dead}"


def train_suite(
    specs: Sequence[SAESpec],
    data: DataFactory,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    sync: StepSync | None = None,
) -> list[Path]:
    """Train every SAE of ``specs`` in one pass over ``data``; return their saved folders.

    Writes ``<out>/<sae>/`` (``save_sae``: folded weights + config with training summary) and
    ``<out>/<sae>/train_log.jsonl``. Raises ``TrainingInterrupted`` after checkpointing when a
    SIGINT/SIGTERM arrives or ``cfg.max_steps`` is reached; ``resume=True`` continues from there and
    ends with exactly the weights of an uninterrupted run. ``sync`` joins ranks that train the
    same SAEs on their own rows of each batch (``lmscope.distributed``); ``data`` still yields
    the global batch.
    """
    specs = list(specs)
    check_unique(specs)
    out = Path(out_dir)
    folders = [s.folder for s in specs]
    rec = ck.read_commit(out)
    if rec is not None and not resume:
        raise ConfigError(f"{out} holds a checkpoint (step {rec['step']}); resume it (`--resume`, resume=True) or use another --out")  # fmt: skip
    if rec is None and resume and all((out / f / "config.json").is_file() for f in folders):
        return [out / f for f in folders]  # finished earlier: nothing to resume
    sites = sorted({site for s in specs for site in s.sites})
    runs: list[_Run] = []
    if rec is not None:
        ck.check_resumable(rec, cfg.to_dict(), folders)
        step, tokens = int(rec["step"]), int(rec["tokens"])
        for s in specs:
            tensors, scalars = ck.load_sae_state(ck.sae_ckpt_dir(out, s.folder), step)
            dims = {k: int(v) for k, v in scalars["dims"].items()}
            runs.append(_Run(s, cfg, dims, scalars["scales"]))
            runs[-1].load(tensors, scalars)
        torch.set_rng_state(torch.tensor(rec["rng"], dtype=torch.uint8))
    else:
        step = tokens = 0
        stats = calibrate(data, sites, cfg.norm_batches)
        for s in specs:
            dims = {site: stats[site].mean.numel() for site in s.sites}
            scales = [stats[site].scale(cfg.normalise) for site in (s.site, s.out_site or s.site)]
            runs.append(_Run(s, cfg, dims, scales))
            runs[-1].init_from_data(stats)
    for r in runs:
        r.sync = sync
    logs = {r.spec.folder: out / r.spec.folder / "train_log.jsonl" for r in runs}
    for p in logs.values():
        p.parent.mkdir(parents=True, exist_ok=True)
        if rec is None:
            p.unlink(missing_ok=True)
        else:
            ck.trim_log(p, step)

    def save_checkpoint() -> None:
        for r in runs:
            tensors, scalars = r.state()
            ck.save_sae_state(ck.sae_ckpt_dir(out, r.spec.folder), step, tensors, scalars)
        rng = torch.get_rng_state().tolist()
        ck.commit(out, step, folders, {"tokens": tokens, "config": cfg.to_dict(), "rng": rng})

    def log_all() -> None:
        for r in runs:
            line = r.log_record(step, tokens)
            files[r.spec.folder].write(json.dumps(line) + "\n")
            files[r.spec.folder].flush()  # so a user can watch the log while the run goes on
            if tb is not None:
                for k, v in line.items():
                    tb[r.spec.folder].add_scalar(k, v, step)
        bar.set_postfix_str(_summary(runs), refresh=False)

    total, dtype = cfg.total_steps, getattr(torch, cfg.dtype)
    tb = _tensorboard(cfg, out, runs)
    bar = tqdm(total=total * cfg.batch_size, initial=tokens, unit="tok", unit_scale=True,
               disable=not cfg.progress, dynamic_ncols=True)  # fmt: skip
    files = {k: open(p, "a") for k, p in logs.items()}
    try:
        with ck.StopOnSignal() as stop:
            it = data(step)
            while step < total:
                # max_steps is an absolute position, so a resume with the same value stops at once
                if stop.signum is not None or (cfg.max_steps is not None and step >= cfg.max_steps):
                    for f in files.values():
                        f.flush()
                    save_checkpoint()
                    why = "a signal" if stop.signum is not None else f"max_steps={cfg.max_steps}"
                    raise TrainingInterrupted(f"stopped by {why} at step {step}/{total}; checkpoint in {out}; rerun with `--resume` (resume=True) to continue")  # fmt: skip
                raw = next(it, None)
                if raw is None:  # the data ran out before total_tokens: finish with what we have
                    break
                if missing := [s for s in sites if s not in raw]:
                    raise ConfigError(f"batch {step} lacks sites {missing}; it has {sorted(raw)}")
                batch = {s: raw[s].to(cfg.device, dtype) for s in sites}  # once, not per SAE
                local = batch if sync is None else sync.batch(batch)  # data-parallel: our rows
                for r in runs:
                    r.train_step(local, step)
                rows = batch[sites[0]].shape[0]
                step, tokens = step + 1, tokens + rows
                bar.update(rows)
                if step % cfg.log_every == 0 or step == total:
                    log_all()
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
                    save_checkpoint()
            if any(r.window[4] for r in runs):  # the data ran out mid-window
                log_all()
    finally:
        bar.close()
        for f in files.values():
            f.close()
        for w in (tb or {}).values():
            w.close()
    paths = [_save_final(r, out, step, tokens) for r in runs]
    ck.clear(out, folders)
    return paths


def _save_final(r: _Run, out: Path, steps: int, tokens: int) -> Path:
    # save_sae replaces the folder whole: park the log beside the checkpoint meanwhile
    d, park = out / r.spec.folder, ck.sae_ckpt_dir(out, r.spec.folder)
    park.mkdir(parents=True, exist_ok=True)
    log = d / "train_log.jsonl"
    if log.is_file():
        os.replace(log, park / log.name)
    save_sae(r.final(steps, tokens), d)
    if (park / log.name).is_file():
        os.replace(park / log.name, log)
    return d


def _tensorboard(cfg: TrainConfig, out: Path, runs: list[_Run]) -> dict[str, Any] | None:
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # optional: the JSONL logs have everything
        return None
    return {r.spec.folder: SummaryWriter(str(out / "tensorboard" / r.spec.folder)) for r in runs}
