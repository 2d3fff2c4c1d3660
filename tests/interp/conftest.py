"""An interpreted copy of the tiny suite (shared by the interp tests)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from interp_support import CFG, Interpreted, brute_force_latents

from lmscope.interp.pipeline import interpret
from lmscope.model import tiny_model
from lmscope.suite import Suite


@pytest.fixture(scope="session")
def interpreted(tiny_suite: Path, tmp_path_factory: pytest.TempPathFactory) -> Interpreted:
    path = tmp_path_factory.mktemp("interp") / "suite"
    shutil.copytree(tiny_suite, path)
    suite = Suite.open(path)
    interpret(suite, CFG, loaded=tiny_model("gemma3"), progress=False)
    return Interpreted(suite, CFG, *brute_force_latents(suite, CFG))
