#!/usr/bin/env bash
# The project's main job on one machine (CPU is fine): create/refresh .venv, then run it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/venv.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1
PROMPT="$(mktemp)"
trap 'rm -f "$PROMPT"' EXIT
"$ROOT/.venv/bin/python" - "$PROMPT" <<'PY'
import random, sys
random.seed(0)
words = "river stone lamp garden window market letter silver morning harbor".split()
lines = [" ".join(random.choice(words) for _ in range(12)).capitalize() + "." for _ in range(260)]
lines.insert(130, "Remember this: the pass key is 58213.")
open(sys.argv[1], "w").write("\n".join(lines) + "\nWhat is the pass key? Answer with the number only.")
PY
exec "$ROOT/.venv/bin/namm" generate --model smollm2 --prompt-file "$PROMPT" --max-new-tokens 12 \
    --policy full --policy streamingllm:0.25 --policy h2o:0.25 --policy l2:0.25 --policy snapkv:0.25 \
    --policy tova:0.25 "$@"
