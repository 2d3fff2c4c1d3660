"""Command-line entry points of this stage (registered by ``lmscope.cli``)."""

from __future__ import annotations

import argparse
from typing import Any

COMMANDS: tuple[str, ...] = ()  # the subcommands register() adds


def register(sub: Any) -> None:
    """Add this stage's subcommands to the `lmscope` parser (none yet)."""
    del sub


__all__ = ["argparse", "register"]
