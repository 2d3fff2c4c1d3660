"""Held-out quality of trained SAEs: mean L0 and mean-centred FVU on an eval-split store.

FVU = Σ‖x − x̂‖² / Σ‖x − mean(x)‖² over the eval rows (the mean taken over those same rows), so a
reconstruction that only predicts the mean scores 1.0, not the near-zero a relative-to-zero FVU
would give on a site with massive near-constant dimensions.

    .venv/bin/python benchmarks/sae_quality.py runs/l6/suite/* --store runs/l6/eval --out q.json
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

from lmscope.activations.store import ActivationStore  # noqa: E402
from lmscope.sae import load_sae  # noqa: E402


@torch.no_grad()
def evaluate(sae_dir: Path, store: ActivationStore, chunk: int = 4096) -> dict[str, object]:
    sae = load_sae(sae_dir)
    x_all = store.read_rows(sae.cfg.site)
    mean = x_all.double().mean(0)
    sq_err = total_var = l0 = 0.0
    for x in x_all.split(chunk):
        f = sae.encode(x)
        x_hat = sae.decode(f)
        sq_err += float((x - x_hat).double().pow(2).sum())
        total_var += float((x.double() - mean).pow(2).sum())
        l0 += float((f != 0).sum())
    train = sae.cfg.training
    return {
        "sae": sae_dir.name,
        "architecture": sae.cfg.architecture,
        "width": sae.cfg.d_sae,
        "site": sae.cfg.site,
        "eval_rows": len(x_all),
        "l0": l0 / len(x_all),
        "fvu": sq_err / total_var,
        "train_tokens": train.get("tokens"),
        "train_steps": train.get("steps"),
        "train_l0": train.get("l0"),
        "train_fvu": train.get("fvu"),
        "dead": train.get("dead"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("saes", nargs="+", type=Path)
    ap.add_argument("--store", required=True, help="eval-split activation store")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    store = ActivationStore(args.store)
    rows = [evaluate(p, store) for p in args.saes if (p / "config.json").is_file()]
    print(
        "| SAE | arch | width | train tokens | eval L0 | eval FVU | train L0 | train FVU | dead |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['sae']} | {r['architecture']} | {r['width']} | {r['train_tokens']:,} | "
            f"{r['l0']:.1f} | {r['fvu']:.4f} | {r['train_l0']:.1f} | {r['train_fvu']:.4f} | "
            f"{r['dead']} |"
        )
    if args.out:
        result = {"benchmark": "sae_quality", "date": time.strftime("%Y-%m-%d"),
                  "machine": machine_info(), "command": " ".join(sys.argv), "results": rows}  # fmt: skip
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
