"""JumpReLU SAE training-step speed: dense autograd vs the sparse-aware kernel (CPU).

    .venv/bin/python benchmarks/train.py [--repeats 5] [--out results.json] [--small] [--threads N]

Every step is a full training step: loss, gradients, parallel-gradient removal, Adam
(betas (0, 0.999)), decoder renormalisation and the θ floor. Steps, their parts and the reference
matmul run round-robin so a busy spell on a shared machine hits them alike. Dense-equivalent
efficiency is 12·d·W·(tokens/s) ÷ (measured matmul FLOP/s): the six [B, d]×[d, W] matmuls of a
dense step at the speed this machine does one, so a dense implementation cannot exceed 1. It is
given from medians (the headline) and from best times (what a quiet machine does).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, matmul_call, summarise, time_interleaved  # noqa: E402

from lmscope.sae.base import SAEConfig  # noqa: E402
from lmscope.sae.jumprelu import JumpReLUSAE  # noqa: E402
from lmscope.train.kernels import (  # noqa: E402
    jumprelu_step_grads,
    remove_parallel_grads_,
    renormalise_rows_,
)

LAM, EPS, LR = 1e-3, 1e-3, 7e-5
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")


def make_sae(
    d: int, W: int, B: int, active: float, seed: int = 0
) -> tuple[JumpReLUSAE, torch.Tensor]:
    """A Gemma-Scope-initialised SAE whose thresholds let ~`active` latents fire per row.

    θ_j is the (1 − active/W) quantile of z_j on a held-out batch, so firing is spread over all
    latents the way a trained SAE's is, and the θ-window holds a realistic few entries per row.
    """
    g = torch.Generator().manual_seed(seed)
    sae = JumpReLUSAE.init(SAEConfig("jumprelu", d_in=d, d_sae=W), generator=g)

    def batch() -> torch.Tensor:
        x = torch.randn(B, d, generator=g)
        return x / x.square().sum(1).mean().sqrt()  # E‖x‖² = 1, as after normalisation

    with torch.no_grad():
        z = sae.pre_acts(batch())
        sae.threshold.copy_(torch.quantile(z, 1 - active / W, dim=0).clamp_min(1e-3))
    return sae, batch()


def clone_sae(sae: JumpReLUSAE) -> JumpReLUSAE:
    twin = JumpReLUSAE(sae.cfg)
    twin.load_state_dict(sae.state_dict())
    return twin


def adam(sae: JumpReLUSAE) -> torch.optim.Adam:
    # fused=True: one pass over param, grad and both moments (vs several for foreach/for-loop).
    return torch.optim.Adam(sae.parameters(), lr=LR, betas=(0.0, 0.999), fused=True)


def dense_step(sae: JumpReLUSAE, x: torch.Tensor) -> Callable[[], object]:
    """The plain path: autograd through SAE.training_loss, the module's own decoder hooks."""
    opt = adam(sae)

    def step() -> object:
        opt.zero_grad(set_to_none=True)
        out = sae.training_loss(x, sparsity_coeff=LAM, bandwidth=EPS)
        out.loss.backward()
        sae.remove_parallel_grads()
        opt.step()
        sae.after_step()
        return out.loss

    return step


def sparse_step(
    sae: JumpReLUSAE, x: torch.Tensor, encoder_dtype: torch.dtype | None = None
) -> Callable[[], object]:
    opt = adam(sae)
    params = [getattr(sae, name) for name in PARAMS]

    last = None

    def step() -> object:
        nonlocal last
        out = jumprelu_step_grads(*params, x, LAM, EPS, encoder_dtype=encoder_dtype, into=last)
        for p, g in zip(params, out.grads().values()):
            p.grad = g
        last = out
        remove_parallel_grads_(sae.W_dec, sae.W_dec.grad)
        opt.step()
        renormalise_rows_(sae.W_dec.data)
        sae.clamp_threshold()
        return out.loss

    return step


def sparse_grads_only(sae: JumpReLUSAE, x: torch.Tensor) -> Callable[[], object]:
    params = [getattr(sae, name) for name in PARAMS]
    last = jumprelu_step_grads(*params, x, LAM, EPS)
    return lambda: jumprelu_step_grads(*params, x, LAM, EPS, into=last)


def optimiser_only(sae: JumpReLUSAE, adam_kind: str, hooks: str) -> Callable[[], object]:
    """Parallel-gradient removal + Adam + renormalisation, on fixed random gradients."""
    opt = torch.optim.Adam(sae.parameters(), lr=LR, betas=(0.0, 0.999), **{adam_kind: True})
    for p in sae.parameters():
        p.grad = torch.randn_like(p) * 1e-3

    def step() -> None:
        if hooks == "kernels":
            remove_parallel_grads_(sae.W_dec, sae.W_dec.grad)
        else:
            sae.remove_parallel_grads()
        opt.step()
        if hooks == "kernels":
            renormalise_rows_(sae.W_dec.data)
        else:
            sae.renormalise_decoder()

    return step


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--small", action="store_true", help="quick smoke run at toy sizes")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        # On a shared CPU every parallel op can wait a scheduler slice for its second thread;
        # --threads 1 shows what the step costs without that.
        torch.set_num_threads(args.threads)
    d, W, B, active = (64, 1024, 256, 8.0) if args.small else (640, 16384, 4096, 65.0)
    load_before = machine_info()["load_avg_1m"]

    sae, x = make_sae(d, W, B, active)
    with torch.no_grad():
        u = sae.pre_acts(x) - sae.threshold
        fired = (u > 0).sum().item() / B
        window = (u.abs() < EPS / 2).sum().item() / B
    del u
    print(f"d={d} W={W} B={B}: {fired:.1f} active latents/row, {window:.2f}/row in the θ-window")

    steps: dict[str, Callable[[], object]] = {
        "dense autograd step (fused Adam)": dense_step(clone_sae(sae), x),
        "sparse step": sparse_step(clone_sae(sae), x),
        "sparse step, bf16 encoder option": sparse_step(clone_sae(sae), x, torch.bfloat16),
    }
    parts: dict[str, Callable[[], object]] = {
        "matmul fp32 [B,d]@[d,W]": matmul_call(B, d, W),
        "matmul bf16 [B,d]@[d,W]": matmul_call(B, d, W, torch.bfloat16),
        "sparse loss+grads only": sparse_grads_only(clone_sae(sae), x),
        "optimiser: fused Adam + kernels hooks": optimiser_only(clone_sae(sae), "fused", "kernels"),
        "optimiser: foreach Adam + kernels hooks": optimiser_only(
            clone_sae(sae), "foreach", "kernels"
        ),
        "optimiser: fused Adam + SAE module hooks": optimiser_only(
            clone_sae(sae), "fused", "module"
        ),
    }
    times = time_interleaved(steps | parts, repeats=args.repeats, warmup=1)

    mm = summarise(times["matmul fp32 [B,d]@[d,W]"])
    flops = {k: 2 * B * d * W / mm[f"{k}_s"] for k in ("median", "min")}
    rows = []
    for name, samples in times.items():
        row: dict[str, object] = {"name": name, **summarise(samples)}
        if name in steps:
            for k in ("median", "min"):
                tok_s = B / row[f"{k}_s"]  # type: ignore[operator]
                row[f"tokens_per_s_{k}"] = tok_s
                row[f"efficiency_{k}"] = 12 * d * W * tok_s / flops[k]
        rows.append(row)

    info = machine_info() | {"load_avg_1m_before": load_before}
    print(
        f"\nfp32 matmul: {flops['median'] / 1e9:.1f} GFLOP/s median, {flops['min'] / 1e9:.1f} best"
    )
    print(f"machine: {info}\n")
    print("| | median ms | min ms | tokens/s (median) | efficiency (median) | efficiency (min) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = [f"{r['median_s'] * 1e3:.1f}", f"{r['min_s'] * 1e3:.1f}"]  # type: ignore[operator]
        if "efficiency_median" in r:
            cells += [
                f"{r['tokens_per_s_median']:,.0f}",
                f"{r['efficiency_median']:.2f}",
                f"{r['efficiency_min']:.2f}",
            ]
        else:
            cells += ["", "", ""]
        print(f"| {r['name']} | " + " | ".join(cells) + " |")

    result = {
        "config": {"d": d, "W": W, "B": B, "lam": LAM, "eps": EPS, "repeats": args.repeats},
        "active_per_row": fired,
        "window_per_row": window,
        "matmul_flops_per_s": flops,
        "machine": info,
        "rows": rows,
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
