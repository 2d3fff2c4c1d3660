#!/usr/bin/env bash
# The main job on the embedded default: installs what it needs, then harvests every layer's
# resid_post, mlp_out and attn_z of Gemma 3 270M over the offline corpus into runs/quick/store.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/lmscope harvest --out runs/quick/store "$@"
