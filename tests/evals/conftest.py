"""Fixtures for eval tests (helpers that are plain functions live in eval_helpers.py)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture
def suite_copy(tiny_suite: Path, tmp_path: Path) -> Path:
    """A private copy of the shared trained tiny suite, free to evaluate and report on."""
    return Path(shutil.copytree(tiny_suite, tmp_path / "suite"))


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One torch thread: on a busy shared machine two threads wait on each other (40x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
