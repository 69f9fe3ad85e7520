#!/usr/bin/env bash
# Cheaper variants of the shipped model-wide NAMM, each decided on the board's design seed 7 (never
# on the held-out seed) against the NAMM as shipped, StreamingLLM as the floor:
# - which layers it scores from: six evenly spaced (layers=6), and the six and three layers chosen
#   by bench/score_layers.py (greedy agreement with the every-layer decision on seed-0 prompts);
# - a window on its BAM's backward attention (window=W: each token sees itself and the W newest
#   tokens; keys=band: the W - 1 right after it), chosen by bench/bam_window.py;
# - the attention rows an update reads (rows=R: those of the R queries before it; the others count
#   as zero and attend with the fused kernel), alone and with the BAM window;
# - the precision the rows are read in (obs=bf16: rounded to bfloat16, as the bf16 model multiplies
#   them with the values), alone and with the BAM window.
# 12 prompts per task and budget on seven tasks (84 per policy per budget); rows are kept, so a
# new variant costs only its own rows (about 10 minutes on 2 CPU cores); run it again to resume.
# Results: bench/results/namm_variants_board.{md,parquet,*.png}.
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/board.sh" --name namm_variants_board --seed 7 \
    --tasks passkey,niah_single,niah_multikey,qa,niah_multiquery,vt,cwe \
    --baselines streamingllm --controls '' --no-fastgen \
    --namm-variants layers=6,layers=5,9,12,15,19,28,layers=5,9,15,window=256,rows=64,rows=64/window=256,obs=bf16,window=256/obs=bf16 \
    --cell smollm2:1024:0.5,0.25:12 "$@"
