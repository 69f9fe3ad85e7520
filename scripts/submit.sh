#!/usr/bin/env bash
# Submit an evolution to a running Ray cluster with `ray job submit`.
#   bash scripts/submit.sh JOB.yaml [ADDRESS] [RUNTIME_ENV]
# ADDRESS      the head's dashboard (default $RAY_API_SERVER_ADDRESS, else http://127.0.0.1:8265)
# RUNTIME_ENV  default jobs/runtime_env.yaml (absolute run root and MLflow URI for the job)
# Ray 2.60 heads use token authentication: the client needs RAY_AUTH_MODE=token (set here) and
# the head's token ($RAY_AUTH_TOKEN, or ~/.ray/auth_token on the head's machine).
# The job's interpreter must have the project installed: $NAMM_JOB_PYTHON, else this checkout's
# .venv when the head runs on this machine, else `python` (a cluster set up by ray_cluster.yaml).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="${1:?usage: bash scripts/submit.sh JOB.yaml [ADDRESS] [RUNTIME_ENV]}"
ADDRESS="${2:-${RAY_API_SERVER_ADDRESS:-http://127.0.0.1:8265}}"
RUNTIME_ENV="${3:-$ROOT/jobs/runtime_env.yaml}"
case "$ADDRESS" in
    *127.0.0.1*|*localhost*) DEFAULT_PYTHON="$ROOT/.venv/bin/python" ;;
    *) DEFAULT_PYTHON=python ;;
esac
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
RAY="$ROOT/.venv/bin/ray"
[ -x "$RAY" ] || RAY=ray
exec "$RAY" job submit --address "$ADDRESS" --working-dir "$ROOT" --runtime-env "$RUNTIME_ENV" -- \
    "${NAMM_JOB_PYTHON:-$DEFAULT_PYTHON}" -m namm_cli evolve "$CONFIG"
