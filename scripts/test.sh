#!/usr/bin/env bash
# The test command: installs what it needs, then lints, type-checks and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/mypy src/lmscope
.venv/bin/python -m pytest -q "$@"
