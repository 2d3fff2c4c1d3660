#!/usr/bin/env bash
# The main job on the embedded default: installs what it needs, builds the `quick` scope of
# Gemma 3 270M (54 SAEs: resid_post, mlp_out and attn_z at every layer; harvest → train → eval →
# interpret → report) into runs/quick, then serves it at http://127.0.0.1:8000 (Ctrl-C stops).
# A killed build resumes where it stopped when this is run again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/lmscope build quick --out runs/quick --serve "$@"
