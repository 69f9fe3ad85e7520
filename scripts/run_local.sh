#!/usr/bin/env bash
# The project's main job on one machine: create/refresh .venv, then evolve a NAMM for the
# embedded SmolLM2 on CPU (local Ray, local MLflow). Extra arguments go to `namm evolve`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/venv.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1
exec "$ROOT/.venv/bin/namm" evolve jobs/local.yaml "$@"
