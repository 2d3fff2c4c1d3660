"""Evaluate a suite (or one SAE folder) and write the results: the manifest and `<sae>/eval.json`.

`<sae>/eval.json` = ``{"format": "lmscope.eval", "version": 1, "name", "site", "model", "config":
{corpus, seq_len, tokens, ...}, "metrics": {scalars}, "l0_hist", "freq_hist", "latent_frequency",
"by_position": {...}, "created"}`` (layout in docs/formats.md, "Eval results"); the scalars also go
into the suite manifest's entry, where they pick each (site, width)'s canonical SAE.

>>> evaluate_path("runs/quick/suite", EvalConfig(tokens=4096))
"""

from __future__ import annotations

import dataclasses
import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lmscope.atomic import write_json_atomic
from lmscope.errors import ConfigError
from lmscope.evals.evaluate import EvalConfig, EvalResult, eval_blocks, evaluate_saes
from lmscope.model import LoadedModel, load_model
from lmscope.suite import MANIFEST, Suite

EVAL_FILE = "eval.json"
EVAL_FORMAT = "lmscope.eval"


def json_safe(value: Any) -> Any:
    """NaN and infinities (a metric with no tokens to average) become null: JSON has neither."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def eval_record(result: EvalResult, model: str, cfg: EvalConfig) -> dict[str, Any]:
    """The eval.json content of one SAE's result."""
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "fast"}
    return json_safe(
        {
            "format": EVAL_FORMAT,
            "version": 1,
            "name": result.name,
            "site": result.site,
            "model": model,
            "config": config,
            "metrics": result.scalars,
            **result.arrays,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )


def read_eval(folder: str | Path) -> dict[str, Any] | None:
    """An SAE folder's eval.json, or None when it has not been evaluated."""
    f = Path(folder) / EVAL_FILE
    return json.loads(f.read_text()) if f.is_file() else None


def evaluate_suite(
    suite: Suite,
    cfg: EvalConfig | None = None,
    *,
    names: list[str] | None = None,
    loaded: LoadedModel | None = None,
    device: str | None = None,
) -> dict[str, EvalResult]:
    """Evaluate the suite's SAEs (all, or `names`: SAE names or sites) on the suite's corpus.

    Every SAE sees the same tokens in one pass; each gets `<sae>/eval.json` and its manifest metrics.
    `cfg.corpus` and `cfg.seq_len` default to the suite's.
    """
    suite.require_saes()
    cfg = (cfg or EvalConfig()).with_defaults(suite.corpus, suite.seq_len)
    every = [*suite.names, *suite.multilayer_names]
    chosen = list(dict.fromkeys(suite.resolve(n) for n in names)) if names else every
    multi = [n for n in chosen if n in suite.multilayer_names]
    loaded = loaded or suite.load_model(device=device)
    if loaded.name != suite.model:
        raise ConfigError(f"suite {suite.path} is of model {suite.model!r}, not {loaded.name!r}")
    blocks = eval_blocks(loaded, cfg)
    results: dict[str, EvalResult] = {}
    saes = {n: suite.load_sae(n, device=loaded.device) for n in chosen if n not in multi}
    if saes:
        results |= evaluate_saes(loaded, saes, blocks, cfg)
    if multi:  # cross-layer transcoders and crosscoders (lmscope.evals.multilayer)
        from lmscope.evals.multilayer import evaluate_multilayer

        ml = {n: suite.load_multilayer(n, device=loaded.device) for n in multi}
        results |= evaluate_multilayer(loaded, ml, blocks, cfg)
    for name, result in results.items():
        write_json_atomic(suite.sae_path(name) / EVAL_FILE, eval_record(result, suite.model, cfg))
        suite.set_metrics(name, json_safe(result.scalars))
    return results


def evaluate_path(
    path: str | Path,
    cfg: EvalConfig | None = None,
    *,
    names: list[str] | None = None,
    model: str | None = None,
    device: str | None = None,
    model_dtype: str | None = None,
) -> dict[str, EvalResult]:
    """`lmscope eval PATH`: a suite folder, an SAE folder inside a suite, or a lone SAE folder.

    A lone SAE is evaluated on `model` (default: the model its config names) and only gets its
    eval.json, on the default corpus at seq_len 128 unless `cfg` says otherwise.
    """
    p = Path(path)
    if (p / MANIFEST).is_file():
        suite = Suite.open(p)
        loaded = suite.load_model(device=device, dtype=model_dtype)
        return evaluate_suite(suite, cfg, names=names, loaded=loaded)
    if not (p / "config.json").is_file():
        what = (
            "does not exist"
            if not p.exists()
            else "is neither a suite (manifest.json) nor an SAE folder (config.json)"
        )
        raise ConfigError(
            f"{p} {what}; give a suite folder made by `lmscope train` or one of its SAE folders"
        )
    parent = p.resolve().parent
    if (parent / MANIFEST).is_file():
        suite = Suite.open(parent)
        if p.name in suite.names or p.name in suite.multilayer_names:
            loaded = suite.load_model(device=device, dtype=model_dtype)
            return evaluate_suite(suite, cfg, names=[p.name], loaded=loaded)
    from lmscope.sae import load_sae
    from lmscope.sae.multilayer import is_multilayer

    if is_multilayer(p):
        return _evaluate_lone_multilayer(p, cfg, model, device, model_dtype)

    sae = load_sae(p)
    model_name = model or sae.cfg.model
    if not model_name:
        raise ConfigError(f"SAE {p} names no model in its config; give one with --model")
    cfg = (cfg or EvalConfig()).with_defaults("default", 128)
    loaded = load_model(model_name, device=device, dtype=model_dtype or "float32")
    sae = sae.to(loaded.device)
    results = evaluate_saes(loaded, {p.name: sae}, eval_blocks(loaded, cfg), cfg)
    write_json_atomic(p / EVAL_FILE, eval_record(results[p.name], model_name, cfg))
    return results


def _evaluate_lone_multilayer(
    p: Path, cfg: EvalConfig | None, model: str | None, device: str | None, dtype: str | None
) -> dict[str, EvalResult]:
    """A native CLT / crosscoder folder outside a suite: its eval.json only."""
    from lmscope.evals.multilayer import evaluate_multilayer
    from lmscope.sae.multilayer import load_native

    sae = load_native(p)
    model_name = model or sae.model
    if not model_name:
        raise ConfigError(f"{p} names no model in its config; give one with --model")
    cfg = (cfg or EvalConfig()).with_defaults("default", 128)
    loaded = load_model(model_name, device=device, dtype=dtype or "float32")
    results = evaluate_multilayer(loaded, {p.name: sae}, eval_blocks(loaded, cfg), cfg)
    write_json_atomic(p / EVAL_FILE, eval_record(results[p.name], model_name, cfg))
    return results
