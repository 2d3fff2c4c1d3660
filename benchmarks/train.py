"""JumpReLU SAE training-step speed: dense autograd vs the sparse-aware kernel (CPU).

    .venv/bin/python benchmarks/train.py [--repeats 5] [--out results.json] [--small] [--threads N]
    .venv/bin/python benchmarks/train.py --suite [--steps 5] [--warmup 2] [--suite-threads 1,2] ...

Every step is a full training step: loss, gradients, parallel-gradient removal, Adam
(betas (0, 0.999)), decoder renormalisation and the θ floor. Steps, their parts and the reference
matmul run round-robin so a busy spell on a shared machine hits them alike. Dense-equivalent
efficiency is 12·d·W·(tokens/s) ÷ (measured matmul FLOP/s): the six [B, d]×[d, W] matmuls of a
dense step at the speed this machine does one, so a dense implementation cannot exceed 1. It is
given from medians (the headline) and from best times (what a quiet machine does).

`--suite` times the real `train_suite` instead: 18 JumpReLU SAEs (sites L0..L17.resid_post, d=640,
width 4096, target L0 64) fed by one pass over in-memory batches, then one 16k SAE beside the raw
kernel step, so what the trainer adds around the kernel shows. Step times are the gaps between the
trainer's requests for successive batches (calibration, set-up and the final save fall outside).
Each token feeds every SAE, so suite efficiency is n_sae·12·d·W·(tokens/s) ÷ matmul FLOP/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, matmul_call, summarise, time_interleaved  # noqa: E402

from lmscope.sae.base import SAEConfig  # noqa: E402
from lmscope.sae.jumprelu import JumpReLUSAE  # noqa: E402
from lmscope.train import SAESpec, TrainConfig, train_suite  # noqa: E402
from lmscope.train.kernels import (  # noqa: E402
    jumprelu_step_grads,
    remove_parallel_grads_,
    renormalise_rows_,
)

LAM, EPS, LR = 1e-3, 1e-3, 7e-5
Params = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def kernel_params(sae: JumpReLUSAE) -> Params:
    """The kernel's parameter arguments, in its order."""
    return sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.threshold


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
    params = kernel_params(sae)
    last = None

    def step() -> object:
        nonlocal last
        out = jumprelu_step_grads(*params, x, LAM, EPS, encoder_dtype=encoder_dtype, into=last)
        for p, g in zip(params, out.grads().values()):
            p.grad = g
        last = out
        remove_parallel_grads_(sae.W_dec, out.grad_W_dec)
        opt.step()
        renormalise_rows_(sae.W_dec.data)
        sae.clamp_threshold()
        return out.loss

    return step


def sparse_grads_only(sae: JumpReLUSAE, x: torch.Tensor) -> Callable[[], object]:
    params = kernel_params(sae)
    last = jumprelu_step_grads(*params, x, LAM, EPS)
    return lambda: jumprelu_step_grads(*params, x, LAM, EPS, into=last)


def optimiser_only(sae: JumpReLUSAE, adam_kind: str, hooks: str) -> Callable[[], object]:
    """Parallel-gradient removal + Adam + renormalisation, on fixed random gradients."""
    opt = torch.optim.Adam(sae.parameters(), lr=LR, betas=(0.0, 0.999), **{adam_kind: True})
    for p in sae.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    g_dec = sae.W_dec.grad
    assert g_dec is not None

    def step() -> None:
        if hooks == "kernels":
            remove_parallel_grads_(sae.W_dec, g_dec)
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
    ap.add_argument("--suite", action="store_true", help="time the real train_suite (see above)")
    ap.add_argument("--steps", type=int, default=5, help="--suite: timed steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="--suite: untimed steps first")
    ap.add_argument("--distinct", type=int, default=2, help="--suite: batches made per site")
    ap.add_argument(
        "--suite-threads",
        type=lambda v: [int(n) for n in v.split(",")],
        help="--suite: thread counts to compare in the same run, e.g. 1,2",
    )
    args = ap.parse_args(argv)
    if args.threads:
        # On a shared CPU every parallel op can wait a scheduler slice for its second thread;
        # --threads 1 shows what the step costs without that.
        torch.set_num_threads(args.threads)
    if args.suite:
        return suite_main(args)
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


# --- the real trainer: a suite of SAEs, one pass --------------------------------------------


class CycledData:
    """A DataFactory over a few pre-made batches per site, cycled, that notes when each batch
    is asked for: the gap between two requests is one trainer step (every SAE, plus logging)."""

    def __init__(self, sites: list[str], d: int, B: int, distinct: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.B = B
        self.pool: dict[str, list[torch.Tensor]] = {}
        for s in sites:  # a large per-site mean, as real residual streams have
            mean = 3 * torch.randn(d, generator=g)
            self.pool[s] = [mean + torch.randn(B, d, generator=g) for _ in range(distinct)]
        self.stamps: list[float] = []

    def __call__(self, start: int) -> Iterator[dict[str, torch.Tensor]]:
        self.stamps = stamps = []  # the last iterator made is the training one
        i = start
        while True:
            stamps.append(time.perf_counter())
            yield {s: xs[i % len(xs)] for s, xs in self.pool.items()}
            i += 1


def threshold_for(active: float, d: int, W: int) -> float:
    """θ₀ at which ~`active` of W latents fire per row at Gemma Scope init on CycledData.

    Centred, normalised rows are ≈ N(0, I/d) and W_enc's columns unit-norm, so z_j ≈ N(0, 1/d):
    starting at the target's sparsity keeps the timed steps at the sparsity of a trained SAE,
    not at the ~W/2 latents per row that a 0.001 start fires before the controller catches up.
    """
    return float(torch.special.ndtri(torch.tensor(1 - active / W, dtype=torch.float64))) / d**0.5


def time_suite(
    data: CycledData, W: int, target_l0: int, steps: int, warmup: int
) -> dict[str, float]:
    """One real train_suite run, an SAE per site of `data`: the median step and the L0 seen."""
    sites = list(data.pool)
    d, B, distinct = data.pool[sites[0]][0].shape[1], data.B, len(data.pool[sites[0]])
    specs = [SAESpec(s, W, target_l0=target_l0) for s in sites]
    cfg = TrainConfig(
        total_tokens=(warmup + steps + 1) * B, batch_size=B, norm_batches=distinct,
        threshold_init=threshold_for(target_l0, d, W), checkpoint_every=0, progress=False,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="lmscope-bench-") as out:
        paths = train_suite(specs, data, cfg, out)
        logs = [json.loads((p / "train_log.jsonl").read_text().splitlines()[-1]) for p in paths]
    t = data.stamps[warmup : warmup + steps + 1]
    return {
        "step_s": statistics.median(b - a for a, b in zip(t, t[1:])),
        "l0": statistics.mean(r["l0"] for r in logs),
    }


def time_calls(fn: Callable[[], object], n: int) -> float:
    """Median seconds of n calls (after one untimed call)."""
    fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def suite_main(args: argparse.Namespace) -> dict[str, object]:
    n_sae, l0 = 18, (8 if args.small else 64)
    d, W, W1, B = (64, 512, 1024, 256) if args.small else (640, 4096, 16384, 4096)
    steps, warmup = args.steps, args.warmup
    threads = args.suite_threads or [torch.get_num_threads()]
    load_before = machine_info()["load_avg_1m"]
    suite_data = CycledData([f"L{i}.resid_post" for i in range(n_sae)], d, B, args.distinct)
    single_data = CycledData(["L0.resid_post"], d, B, args.distinct, seed=1)
    mm = {w: matmul_call(B, d, w) for w in (W, W1)}
    raw = {w: sparse_step(*make_sae(d, w, B, float(l0))) for w in (W, W1)}
    samples: dict[str, list[float]] = {}
    l0_seen: dict[str, list[float]] = {}

    def note(key: str, value: float, into: dict[str, list[float]] = samples) -> None:
        into.setdefault(key, []).append(value)

    for rep in range(args.repeats):  # round-robin, so a busy spell hits every contender alike
        for nt in threads:
            torch.set_num_threads(nt)
            note(f"matmul W={W} {nt}t", time_calls(mm[W], 3))
            r = time_suite(suite_data, W, l0, steps, warmup)
            note(f"suite {nt}t", r["step_s"])
            note(f"suite {nt}t", r["l0"], l0_seen)
            note(f"raw W={W} {nt}t", time_calls(raw[W], 3))
            note(f"matmul W={W} {nt}t", time_calls(mm[W], 3))
            note(f"matmul W={W1} {nt}t", time_calls(mm[W1], 3))
            r = time_suite(single_data, W1, l0, steps, warmup)
            note(f"single {nt}t", r["step_s"])
            note(f"single {nt}t", r["l0"], l0_seen)
            note(f"raw W={W1} {nt}t", time_calls(raw[W1], 3))
            note(f"matmul W={W1} {nt}t", time_calls(mm[W1], 3))
        last = ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in samples.items())
        print(f"repeat {rep + 1}/{args.repeats}: {last}", flush=True)

    med = {k: statistics.median(v) for k, v in samples.items()}
    rows: list[dict[str, object]] = []
    table = [
        "| | threads | SAEs | W | step ms | tokens/s | SAE-steps/s | matmul GFLOP/s | efficiency | L0 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for nt in threads:
        flops = {w: 2 * B * d * w / med[f"matmul W={w} {nt}t"] for w in (W, W1)}
        for name, key, n, w in [
            (f"train_suite, {n_sae} SAEs", f"suite {nt}t", n_sae, W),
            ("raw kernel step, 1 SAE", f"raw W={W} {nt}t", 1, W),
            ("train_suite, 1 SAE", f"single {nt}t", 1, W1),
            ("raw kernel step, 1 SAE", f"raw W={W1} {nt}t", 1, W1),
        ]:
            tok_s = B / med[key]
            eff = n * 12 * d * w * tok_s / flops[w]
            seen = statistics.mean(l0_seen[key]) if key in l0_seen else None
            rows.append({
                "name": name, "threads": nt, "n_sae": n, "W": w, "step_s": med[key],
                "samples_s": samples[key], "tokens_per_s": tok_s, "sae_steps_per_s": n * tok_s / B,
                "efficiency": eff, "matmul_flops_per_s": flops[w], "l0": seen,
            })  # fmt: skip
            table.append(
                f"| {name} | {nt} | {n} | {w} | {med[key] * 1e3:,.0f} | {tok_s:,.0f} | "
                f"{n * tok_s / B:.2f} | {flops[w] / 1e9:.0f} | {eff:.2f} | "
                + ("" if seen is None else f"{seen:.0f}")
                + " |"
            )

    info = machine_info() | {"load_avg_1m_before": load_before}
    print(f"\nd={d} B={B}: {steps} timed steps after {warmup} per train_suite run, "
          f"{args.repeats} repeats, medians\nmachine: {info}\n")  # fmt: skip
    print("\n".join(table))
    overhead = {
        nt: {
            "suite_per_sae": med[f"suite {nt}t"] / n_sae / med[f"raw W={W} {nt}t"],
            "single": med[f"single {nt}t"] / med[f"raw W={W1} {nt}t"],
        }
        for nt in threads
    }
    for nt, o in overhead.items():
        print(f"\n{nt} thread(s): trainer step ÷ raw kernel step = {o['suite_per_sae']:.2f} per "
              f"SAE in the suite (W={W}), {o['single']:.2f} for the single W={W1} SAE", end="")  # fmt: skip
    print()

    result: dict[str, object] = {
        "mode": "suite",
        "config": {"n_sae": n_sae, "d": d, "W": W, "W_single": W1, "B": B, "target_l0": l0,
                   "steps": steps, "warmup": warmup, "repeats": args.repeats,
                   "distinct_batches": args.distinct, "threads": threads},
        "trainer_over_kernel": overhead,
        "machine": info,
        "rows": rows,
    }  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
