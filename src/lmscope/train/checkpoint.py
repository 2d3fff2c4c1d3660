"""Crash-safe training checkpoints for a suite trained in one data pass.

Layout under the run's ``out_dir``::

    checkpoint.json                        # the commit record: {"step": k, "saes": [...], ...}
    .checkpoints/<sae>/step-000001000.safetensors   # params, Adam moments, counters
    .checkpoints/<sae>/step-000001000.json          # scalars: step, λ controller, C, metrics…

Every file is written once under a temp name and renamed into place. The per-SAE files of step k
are written first; only then does ``checkpoint.json`` (one atomic rename) say "step k"; only after
that are older step files deleted. A crash at any moment therefore leaves a commit record that
points at complete files, and all SAEs of the suite resume from the same data position.
Resuming refuses settings that would change the weights (``RESULT_KEYS``); ``StopOnSignal``
turns SIGINT/SIGTERM into a flag the loop polls, so a stop is a checkpoint, not a torn write.
(Checkpoints live outside ``<out>/<sae>/`` because ``save_sae`` replaces that folder whole.)
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from lmscope.atomic import temp_path, write_text_atomic
from lmscope.errors import ConfigError

COMMIT = "checkpoint.json"
CKPT_DIR = ".checkpoints"


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_save_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    tmp = temp_path(path)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
    _fsync(tmp)
    os.replace(tmp, path)


def sae_ckpt_dir(out_dir: Path, folder: str) -> Path:
    return out_dir / CKPT_DIR / folder


def _stem(step: int) -> str:
    return f"step-{step:09d}"


def save_sae_state(d: Path, step: int, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
    """One SAE's state at ``step`` (not yet committed: see ``commit``)."""
    d.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(d / f"{_stem(step)}.safetensors", tensors)
    write_text_atomic(d / f"{_stem(step)}.json", json.dumps({"step": step, **state}, indent=1))


def load_sae_state(d: Path, step: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
    t, j = d / f"{_stem(step)}.safetensors", d / f"{_stem(step)}.json"
    if not t.is_file() or not j.is_file():
        raise ConfigError(f"checkpoint of step {step} is missing under {d}; cannot resume this SAE")
    return load_file(str(t)), json.loads(j.read_text())


def commit(out_dir: Path, step: int, folders: list[str], extra: dict[str, Any]) -> None:
    """Declare step ``step`` the one to resume from, then drop older per-SAE files."""
    write_text_atomic(
        out_dir / COMMIT, json.dumps({"step": step, "saes": folders, **extra}, indent=1)
    )
    keep = {f"{_stem(step)}.safetensors", f"{_stem(step)}.json"}
    for folder in folders:
        for p in sae_ckpt_dir(out_dir, folder).glob("step-*"):
            if p.name not in keep:
                p.unlink(missing_ok=True)


def read_commit(out_dir: Path) -> dict[str, Any] | None:
    p = out_dir / COMMIT
    return json.loads(p.read_text()) if p.is_file() else None


def clear(out_dir: Path, folders: list[str]) -> None:
    """Remove the commit record, then the per-SAE files (after a finished run)."""
    (out_dir / COMMIT).unlink(missing_ok=True)
    for folder in folders:
        d = sae_ckpt_dir(out_dir, folder)
        for p in d.glob("*"):
            p.unlink(missing_ok=True)
        if d.is_dir():
            d.rmdir()
    root = out_dir / CKPT_DIR
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()


# --- resuming and stopping ---

# Settings that change the trained weights: a resume must match them (logging/stop ones may differ).
RESULT_KEYS = (
    *("total_tokens", "batch_size", "lr", "adam_betas", "lr_warmup_steps", "lr_decay_frac"),
    *("lambda_warmup_steps", "warmup_max_frac", "bandwidth", "threshold_init", "dtype", "seed"),
    *("fast", "normalise", "norm_batches", "lambda_init", "l0_gain", "l0_ema", "dead_after_tokens"),
    *("dead_loss", "dead_coeff", "dead_k_aux", "threshold_init_from_data"),
)


def check_resumable(rec: dict[str, Any], cfg: dict[str, Any], folders: list[str]) -> None:
    """Refuse a resume whose settings or SAEs differ from the checkpoint's."""
    diff = [k for k in RESULT_KEYS if json.dumps(rec["config"].get(k)) != json.dumps(cfg[k])]
    if diff:
        raise ConfigError(f"cannot resume: TrainConfig differs from the checkpoint in {diff}")
    if sorted(rec["saes"]) != sorted(folders):
        raise ConfigError("cannot resume: the suite's SAEs differ from the checkpoint's")


def trim_log(path: Path, upto: int) -> None:
    """On resume, drop log lines written after the checkpoint (they will be written again)."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= upto]
    write_text_atomic(path, "".join(ln + "\n" for ln in lines))


class StopOnSignal:
    """SIGINT/SIGTERM set a flag; the loop checkpoints and stops. A second signal aborts at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # signal() only works there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# --- optimiser state as flat tensors (safetensors holds no nested dicts) ---


def optimizer_tensors(opt: torch.optim.Optimizer, names: list[str]) -> dict[str, Tensor]:
    """``{"adam.<param>.<key>": tensor}`` for every per-parameter state entry (step included)."""
    params = opt.param_groups[0]["params"]
    out = {}
    for name, p in zip(names, params, strict=True):
        for key, v in opt.state.get(p, {}).items():
            out[f"adam.{name}.{key}"] = v if isinstance(v, Tensor) else torch.tensor(v)
    return out


def load_optimizer_tensors(
    opt: torch.optim.Optimizer, names: list[str], tensors: dict[str, Tensor]
) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, Tensor]] = {}
    for i, name in enumerate(names):
        prefix = f"adam.{name}."
        entry = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if entry:
            state[i] = entry
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
