#!/usr/bin/env bash
# The project's test command: create/refresh .venv, lint (ruff, rules in pyproject.toml), then
# run the whole suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/venv.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1
"$ROOT/.venv/bin/ruff" check "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest -q "$@"
