"""Evaluation: SAE metrics on held-out tokens (`metrics`, `evaluate`), their files (`results`), plots
(`plots`) and the static HTML report (`report`).

Names load lazily, so that `lmscope --help` (which imports `lmscope.evals.cli`) stays fast.

>>> from lmscope.evals import EvalConfig, evaluate_path, write_report
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EvalConfig": "evaluate",
    "EvalResult": "evaluate",
    "eval_blocks": "evaluate",
    "evaluate_saes": "evaluate",
    "evaluate_multilayer": "multilayer",
    "evaluate_suite": "results",
    "evaluate_path": "results",
    "read_eval": "results",
    "write_report": "report",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lmscope.evals' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lmscope.evals.{_EXPORTS[name]}"), name)
