"""Train a cross-layer transcoder (CLT): layer s encodes ``mlp_in[s]``, decodes into ``mlp_out[l]``
of every layer l ≥ s (a first version, apart from the suite trainer; issue 19 item 1).

    y[l] = Σ_{s ≤ l} JumpReLU_θ[s](x[s] @ W_enc[s] + b_enc[s]) @ W_dec[s→l] + b_dec[l]

Loss per row: squared error summed over dimensions and layers + λ·Σ_s ‖f[s]‖₀, the L0 through the
JumpReLU step's straight-through estimator (``lmscope.sae.jumprelu``), λ steered by the suite
trainer's integral controller towards ``target_l0`` active latents per layer and token. Adam
(β₁ = 0), the Gemma Scope learning-rate warm-up, thresholds kept ≥ THRESHOLD_MIN. One data stream
holds every layer's in and out sites (``{"L<l>.mlp_in": [B, d], "L<l>.mlp_out": [B, d], …}``, a
``DataFactory`` as the suite trainer takes: ``data(start_batch)``).

Checkpoints (``lmscope.train.checkpoint``: per-state files, then one atomic commit record) go to
``<out>/.<name>.train/`` every ``checkpoint_every`` steps; a rerun resumes from the last one and
finishes bit-identically to an uninterrupted run (same data position, Adam moments, λ, RNG-free
steps). Activations are taken as they come (no input scaling is learnt or folded), so give it
roughly unit-scale data or scale it first. The result is a native multi-layer folder
(``lmscope.sae.multilayer.save_native``) with the decoders into earlier layers zero.

>>> clt = train_clt(CLTTrainConfig(n_layers=18, d_model=640, width=1024), data, "runs/s/clt")
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from lmscope.atomic import write_text_atomic
from lmscope.errors import ConfigError
from lmscope.sae.base import THRESHOLD_MIN
from lmscope.sae.jumprelu import jumprelu, step
from lmscope.sae.multilayer import MultiLayerSAE, save_native
from lmscope.train import checkpoint as ck
from lmscope.train.schedules import L0Controller, capped_warmup, lr_scale

DataFactory = Callable[[int], Iterator[dict[str, Tensor]]]
LOG = "train_log.jsonl"


@dataclass(frozen=True)
class CLTTrainConfig:
    """A CLT over layers 0 … n_layers−1 of a model of width ``d_model``, ``width`` latents each."""

    n_layers: int
    d_model: int
    width: int
    target_l0: float = 32.0  # active latents per layer and token
    steps: int = 1000
    lr: float = 7e-5
    adam_beta2: float = 0.999
    lr_warmup_steps: int = 1000
    warmup_max_frac: float = 0.1
    bandwidth: float = 0.001
    threshold_init: float = 0.001
    lambda_init: float = 1e-3
    l0_gain: float = 0.02
    l0_ema: float = 0.95
    seed: int = 0
    checkpoint_every: int = 100
    model: str = ""

    def __post_init__(self) -> None:
        for k in ("n_layers", "d_model", "width", "steps", "checkpoint_every"):
            if getattr(self, k) < 1:
                raise ConfigError(f"CLT training needs {k} >= 1, got {getattr(self, k)}")


class CLTModule(nn.Module):
    """The trainable CLT: parameters stacked over layers, the causal mask a buffer."""

    def __init__(self, cfg: CLTTrainConfig) -> None:
        super().__init__()
        n, d, w = cfg.n_layers, cfg.d_model, cfg.width
        g = torch.Generator().manual_seed(cfg.seed)
        bound = math.sqrt(6.0 / d)  # He-uniform, then unit-norm decoder rows per output layer
        w_dec = (torch.rand(n, w, n, d, generator=g) * 2 - 1) * bound
        w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True)
        self.mask = nn.Buffer(torch.ones(n, n).triu()[:, None, :, None])  # [s, 1, l, 1]: s ≤ l
        self.w_dec = nn.Parameter(w_dec * self.mask)
        own = torch.stack([w_dec[s, :, s] for s in range(n)])  # [n, w, d]
        self.w_enc = nn.Parameter(own.transpose(1, 2).contiguous())  # W_enc = own decoderᵀ
        self.b_enc = nn.Parameter(torch.zeros(n, w))
        self.threshold = nn.Parameter(torch.full((n, w), cfg.threshold_init))
        self.b_dec = nn.Parameter(torch.zeros(n, d))
        self.bandwidth = cfg.bandwidth

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, n, d] → (latents [B, n, W], outputs [B, n, d], the L0 step's sum [B])."""
        z = torch.einsum("bsd,sdw->bsw", x, self.w_enc) + self.b_enc
        # the straight-through functions take one layer's θ [W] at a time
        layers = range(z.shape[1])
        f = torch.stack([jumprelu(z[:, s], self.threshold[s], self.bandwidth) for s in layers], 1)
        l0 = sum(step(z[:, s], self.threshold[s], self.bandwidth).sum(-1) for s in layers)
        y = torch.einsum("bsw,swld->bld", f, self.w_dec * self.mask) + self.b_dec
        assert isinstance(l0, Tensor)
        return f, y, l0

    def to_sae(self, model: str, training: dict) -> MultiLayerSAE:
        t = {k: getattr(self, k).detach().clone() for k in ("w_enc", "b_enc", "threshold", "b_dec")}
        w_dec = (self.w_dec * self.mask).detach().clone()
        return MultiLayerSAE(**t, w_dec=w_dec, kind="clt", model=model, training=training)


def _stack(batch: dict[str, Tensor], n: int) -> tuple[Tensor, Tensor]:
    try:
        x = torch.stack([batch[f"L{la}.mlp_in"] for la in range(n)], 1)
        y = torch.stack([batch[f"L{la}.mlp_out"] for la in range(n)], 1)
    except KeyError as e:
        raise ConfigError(
            f"CLT training needs every layer's mlp_in and mlp_out; missing {e}"
        ) from None
    return x.float(), y.float()


def _save(
    work: Path,
    k: int,
    module: CLTModule,
    opt: torch.optim.Optimizer,
    ctl: L0Controller,
    cfg: CLTTrainConfig,
    names: list[str],
) -> None:
    tensors: dict[str, Tensor] = {f"param.{n}": p.detach() for n, p in module.named_parameters()}
    tensors.update(ck.optimizer_tensors(opt, names))
    ck.save_sae_state(ck.sae_ckpt_dir(work, "clt"), k, tensors, {"controller": ctl.state()})
    ck.commit(work, k, ["clt"], {"config": asdict(cfg)})


def train_clt(
    cfg: CLTTrainConfig, data: DataFactory, folder: str | Path, *, max_steps: int | None = None
) -> MultiLayerSAE:
    """Train (or resume) a CLT and write it to ``folder`` (a native multi-layer folder).

    ``max_steps`` stops after that many steps of this call with a checkpoint written, raising
    ``TrainingInterrupted`` (as a signal would); the next call resumes.
    """
    from lmscope.train.trainer import TrainingInterrupted

    folder = Path(folder)
    work = folder.parent / f".{folder.name}.train"
    work.mkdir(parents=True, exist_ok=True)
    module = CLTModule(cfg)
    names = [n for n, _ in module.named_parameters()]
    opt = torch.optim.Adam(module.parameters(), lr=cfg.lr, betas=(0.0, cfg.adam_beta2))
    ctl = L0Controller.start(cfg.target_l0, cfg.lambda_init, cfg.l0_gain, cfg.l0_ema)
    start = 0
    rec = ck.read_commit(work)
    if rec is not None:
        if rec["config"] != json.loads(json.dumps(asdict(cfg))):
            raise ConfigError(
                f"cannot resume {folder}: its checkpoint was made with another config"
            )
        start = int(rec["step"])
        tensors, state = ck.load_sae_state(ck.sae_ckpt_dir(work, "clt"), start)
        with torch.no_grad():
            for n, p in module.named_parameters():
                p.copy_(tensors[f"param.{n}"])
        ck.load_optimizer_tensors(opt, names, tensors)
        ctl = L0Controller.from_state(state["controller"])
        ck.trim_log(work / LOG, start)
    warmup = capped_warmup(cfg.lr_warmup_steps, cfg.steps, cfg.warmup_max_frac)
    batches = data(start)
    l0 = float("nan")
    with (work / LOG).open("a") as log:
        for k in range(start, cfg.steps):
            if max_steps is not None and k - start >= max_steps:
                _save(work, k, module, opt, ctl, cfg, names)
                raise TrainingInterrupted(f"CLT training stopped at step {k}; rerun to resume")
            x, target = _stack(next(batches), cfg.n_layers)
            for group in opt.param_groups:
                group["lr"] = cfg.lr * lr_scale(k, cfg.steps, warmup)
            f, y, l0_step = module(x)
            mse = (y - target).pow(2).sum((-1, -2)).mean()
            loss = mse + ctl.lam * l0_step.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                module.threshold.clamp_(min=THRESHOLD_MIN)
            l0 = float((f > 0).sum(-1).float().mean())
            ctl.update(l0)
            log.write(
                json.dumps({"step": k + 1, "mse": float(mse.detach()), "l0": l0, "lambda": ctl.lam})
                + "\n"
            )
            if (k + 1) % cfg.checkpoint_every == 0 and k + 1 < cfg.steps:
                log.flush()
                _save(work, k + 1, module, opt, ctl, cfg, names)
    sae = module.to_sae(cfg.model, {"steps": cfg.steps, "target_l0": cfg.target_l0, "l0": l0})
    save_native(sae, folder)
    write_text_atomic(folder / LOG, (work / LOG).read_text())
    ck.clear(work, ["clt"])
    (work / LOG).unlink(missing_ok=True)
    work.rmdir()
    return sae


__all__ = ["CLTModule", "CLTTrainConfig", "train_clt"]
