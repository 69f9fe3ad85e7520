#!/usr/bin/env bash
# Which layers the shipped model-wide NAMM should score from, decided on the board's design seed 7
# (never on the held-out seed): the NAMM scoring from every layer against six layers evenly spaced
# (layers=6) and the six and three layers chosen by bench/score_layers.py (greedy agreement with
# the every-layer decision on evolution's seed-0 prompts), StreamingLLM as the floor. 12 prompts
# per task and budget on seven tasks (84 per policy); about an hour on 2 CPU cores; run it again
# to resume. Results: bench/results/score_layers_board.{md,parquet,*.png}.
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/board.sh" --name score_layers_board --seed 7 \
    --tasks passkey,niah_single,niah_multikey,qa,niah_multiquery,vt,cwe \
    --baselines streamingllm --controls '' --no-fastgen \
    --namm-variants layers=6,layers=5,9,12,15,19,28,layers=5,9,15 \
    --cell smollm2:1024:0.5,0.25:12 "$@"
