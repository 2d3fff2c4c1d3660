"""Faithfulness head-to-head (issue 15): lmscope's SAE recipes at one site, scored on held-out tokens.

One command harvests the site (train split), trains every arm in one pass over the same batches,
optionally runs the KL phase, evaluates all arms on the same held-out tokens (ΔLM loss, KL, CE
recovered on `--loss-tokens`; L0, FVU, dead = never fires, dense = fires on > 10%, on
`--eval-tokens`) and writes a JSON record and a markdown table (into BENCHMARKS.md between
markers with `--write`). The issue's full scale is `--train-tokens 500000 --eval-tokens 50000
--steps 928 --width 4096 --l0 90`; on a shared 2-core CPU pick a smaller scale and say so.

    .venv/bin/python benchmarks/faithfulness.py --site L6.resid_post --train-tokens 100000 \\
        --steps 200 --width 4096 --l0 90 --out benchmarks/results/faithfulness_l6.json --write

Arms: `jumprelu` (the l6_jumprelu.toml recipe: θ₀ 0.1, lr 3e-4), `+per_dim` (per-dimension
normalisation), `+per_dim+preact` (and the dead-latent loss), `matryoshka` (Matryoshka BatchTopK,
k = L0), each with `--kl-tokens` > 0 also KL-fine-tuned. SAELens's arm is not run here (see
BENCHMARKS.md for why).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info  # noqa: E402

from lmscope.activations.harvest import HarvestConfig, harvest  # noqa: E402
from lmscope.evals.evaluate import EvalConfig  # noqa: E402
from lmscope.evals.results import evaluate_suite  # noqa: E402
from lmscope.model import load_model  # noqa: E402
from lmscope.suite import Suite, record_training  # noqa: E402
from lmscope.train import SAESpec, TrainConfig, store_data, train_suite  # noqa: E402
from lmscope.train.finetune import finetune_suite  # noqa: E402

ARMS = {
    "jumprelu": {},
    "per_dim": {"normalise": "per_dim"},
    "per_dim_preact": {"normalise": "per_dim", "dead_loss": "preact"},
    "matryoshka": {},
}
BEGIN, END = "<!-- faithfulness:begin -->", "<!-- faithfulness:end -->"


def run_arm(name: str, a: argparse.Namespace, store: object, loaded: object, root: Path) -> Path:
    spec = (SAESpec(a.site, a.width, "matryoshka_batchtopk", k=int(a.l0), model=loaded.name)  # type: ignore[attr-defined]
            if name == "matryoshka" else SAESpec(a.site, a.width, target_l0=a.l0, model=loaded.name))  # type: ignore[attr-defined]  # fmt: skip
    cfg = TrainConfig(total_tokens=a.steps * a.batch, batch_size=a.batch, lr=3e-4,
                      threshold_init=0.1, dead_after_tokens=a.dead_after, checkpoint_every=0,
                      kl_tokens=a.kl_tokens, kl_lr=a.kl_lr, **ARMS[name])  # type: ignore[arg-type]  # fmt: skip
    out = root / name
    (path,) = train_suite([spec], store_data(store, [a.site], a.batch), cfg, out, resume=True)
    finetune_suite(loaded, [path], cfg, resume=True)  # type: ignore[arg-type]
    record_training(out, [path], model=loaded.name)  # type: ignore[attr-defined]
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--site", default="L6.resid_post")
    p.add_argument("--train-tokens", type=int, default=100_000)
    p.add_argument("--eval-tokens", type=int, default=50_000)
    p.add_argument("--loss-tokens", type=int, default=4_096)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--l0", type=float, default=90)
    p.add_argument("--dead-after", type=int, default=100_000)
    p.add_argument("--kl-tokens", type=int, default=0)
    p.add_argument("--kl-lr", type=float, default=1e-4)
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--work", default="runs/faithfulness")
    p.add_argument("--out", required=True)
    p.add_argument("--write", action="store_true", help="put the table into BENCHMARKS.md")
    a = p.parse_args()
    root = Path(a.work) / a.site
    loaded = load_model("gemma-3-270m", device="cpu")
    t0 = time.time()
    hc = HarvestConfig(model="gemma-3-270m", sites=a.site, tokens=a.train_tokens, batch_size=8)
    store = harvest(hc, str(root / "store"), resume=True, loaded=loaded)
    rows = []
    for name in a.arms.split(","):
        t = time.time()
        path = run_arm(name, a, store, loaded, root)
        ec = EvalConfig(tokens=a.loss_tokens, recon_tokens=a.eval_tokens, progress=False)
        res = evaluate_suite(Suite.open(path.parent), ec, loaded=loaded)
        m = next(iter(res.values())).scalars
        rows.append({"arm": name, "seconds": time.time() - t, **m})
    record = {"args": vars(a), "machine": machine_info(), "rows": rows,
              "seconds": time.time() - t0}  # fmt: skip
    Path(a.out).write_text(json.dumps(record, indent=1, default=str))
    table = render(a, rows)
    print(table)
    if a.write:
        bench = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
        text = bench.read_text()
        block = f"{BEGIN}\n{table}\n{END}"
        if BEGIN in text:
            text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
        else:
            text += f"\n## Faithfulness (`benchmarks/faithfulness.py`)\n\n{block}\n"
        bench.write_text(text)


def render(a: argparse.Namespace, rows: list[dict]) -> str:
    head = (f"{a.site}, W = {a.width:,}, target L0 {a.l0:g}, {a.steps} steps × {a.batch} rows "
            f"(store of {a.train_tokens:,} train tokens), KL phase {a.kl_tokens:,} tokens; "
            f"ΔLM/KL/CE recovered on {a.loss_tokens:,} held-out tokens, the rest on "
            f"{a.eval_tokens:,}.\n\n")  # fmt: skip
    lines = ["| arm | L0 | FVU | ΔLM (nats) | KL | CE recovered | dead | dense (>10%) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['arm']} | {r.get('l0', 0):.1f} | {r.get('fvu', 0):.3f} | "
                     f"{r.get('delta_lm_loss', 0):.3f} | {r.get('kl', 0):.3f} | "
                     f"{r.get('ce_recovered', 0):.2f} | {r.get('dead', 0)} | "
                     f"{r.get('dense', 0)} |")  # fmt: skip
    return head + "\n".join(lines)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
