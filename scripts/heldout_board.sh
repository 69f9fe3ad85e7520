#!/usr/bin/env bash
# The held-out board: the shipped NAMM (and its distilled warm start) against the full cache, the
# 2020-2024 baselines, kvpress's current peers (Expected Attention, alone and with AdaKV as on its
# leaderboard; KVzip) and three hand-designed scorers run in the NAMM's own structure, on prompts of
# seed 20261205. That seed was fixed in this file before any of its rows was computed and is used
# for no decision (evolution draws seed 0 and its validation seed; the earlier board seed 7).
# Tasks: four the NAMM trained on, three it never saw (niah_multiquery, vt, cwe). Cells, in order of
# what they decide: the chunked protocol at 1k and half the cache; kvpress's query-agnostic protocol
# at 1k and half the cache; the chunked protocol at a quarter; Gemma-3-270M zero-shot; 2k at half
# the cache; the query-agnostic protocol at a quarter; the query-aware one at half. 24 prompts per
# task (168 per policy) in the chunked cells at 1k tokens on SmolLM2, 12 (84) in the others; sample
# i of a task depends only on (task, length, seed, i), so the first 12 are those of a 12-prompt
# cell. About an hour per 12 prompts per task and cell on 2 CPU cores; run it again to resume.
# Results: bench/results/heldout_board.{md,parquet,*.png}.
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/board.sh" --name heldout_board --seed 20261205 \
    --tasks passkey,niah_single,niah_multikey,qa,niah_multiquery,vt,cwe \
    --also namms/smollm2-warm-start --controls h2o,tova,snapkv \
    --cell smollm2:1024:0.5:24 \
    --cell smollm2:1024:0.5:12:agnostic \
    --cell smollm2:1024:0.25:24 \
    --cell gemma3-270m:1024:0.5:12 \
    --cell smollm2:2048:0.5:12 \
    --cell smollm2:1024:0.25:12:agnostic \
    --cell smollm2:1024:0.5:12:aware "$@"
