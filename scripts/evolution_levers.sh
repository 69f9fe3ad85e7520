#!/usr/bin/env bash
# Evolution levers (bench/results/evolution_levers.md): each config under jobs/levers/ evolves from
# the shipped NAMM's distilled warm start (namms/smollm2-warm-start), or from a warm start of its
# own (a config with es.warm_start, exported to namms/levers/<run name>-start), on the same prompts
# per generation; its best validated CMA mean is exported to namms/levers/<run name>. Then the warm
# start, the shipped NAMM and every lever run on one board of prompts from seed 31415 (fixed here
# before any lever ran; used for the lever comparison only, never by evolution, distillation or the
# held-out board), at 1k tokens and half and a quarter of the cache, and the levers table is
# written. A lever evolved on several models (transfer_models) is also run, with the warm start and
# the shipped NAMM, on each other model's 1k cell at half the cache (levers_transfer_board), beside
# both with their normalisation statistics collected again on that model (`namm adapt`). ~30 min
# per lever and ~1 h for the board on 2 CPU cores; run it again to resume (a finished run is not
# rerun, the board keeps its rows).
#   bash scripts/evolution_levers.sh                                   # every lever
#   bash scripts/evolution_levers.sh jobs/levers/per_prompt_rank.yaml  # some of them
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/venv.sh
export HF_HUB_OFFLINE=1
configs=("$@")
[ ${#configs[@]} -gt 0 ] || configs=(jobs/levers/*.yaml)
also=(--also namms/smollm2-warm-start)
levers=()
transfer_also=(--also namms/smollm2-warm-start)   # levers evolved on several models (transfer_models)
transfer_cells=()
adapted_refs=()
for config in "${configs[@]}"; do
    name="$(.venv/bin/python -c "import sys; from orchestrator.config import load_config; print(load_config(sys.argv[1]).name)" "$config")"
    .venv/bin/namm evolve "$config"
    .venv/bin/namm export "runs/$name/checkpoints" "namms/levers/$name" --which best-validated
    also+=(--also "namms/levers/$name")
    levers+=(--lever "$config=namms/levers/$name")
    transfer="$(.venv/bin/python -c "import sys; from orchestrator.config import load_config; print(' '.join(m.name for m in load_config(sys.argv[1]).transfer_models))" "$config")"
    if [ -n "$transfer" ]; then
        transfer_also+=(--also "namms/levers/$name")
        for model in $transfer; do
            cell="$model:1024:0.5:12"
            if [[ " ${transfer_cells[*]} " != *" --cell $cell "* ]]; then
                transfer_cells+=(--cell "$cell")
                # the other lever for that model: no evolution, the statistics collected on it
                for source in smollm2-warm-start smollm2; do
                    adapted="namms/levers/$source-on-$model"
                    [ -d "$adapted" ] || .venv/bin/namm adapt "namms/$source" "$adapted" --model "$model" --dtype bfloat16
                    transfer_also+=(--also "$adapted")
                    adapted_refs+=(--reference "$adapted")
                done
            fi
        done
    fi
    own_start="$(.venv/bin/python -c "import sys; from orchestrator.config import load_config; print(load_config(sys.argv[1]).es.warm_start is not None)" "$config")"
    if [ "$own_start" = True ]; then      # a start of its own (a new teacher): on the board too
        .venv/bin/namm export "runs/$name/checkpoints" "namms/levers/$name-start" --which start
        also+=(--also "namms/levers/$name-start")
        levers+=(--lever "$config=namms/levers/$name-start")
    fi
done
.venv/bin/python bench/namm_board.py --name levers_board --seed 31415 \
    --tasks passkey,niah_single,niah_multikey,qa,niah_multiquery,vt,cwe \
    "${also[@]}" --baselines streamingllm --controls '' --cell smollm2:1024:0.5,0.25:12
boards=(--board bench/results/levers_board.parquet)
if [ ${#transfer_cells[@]} -gt 0 ]; then
    # the other models' cells, zero-shot for the warm start and the shipped NAMM, for those levers only
    .venv/bin/python bench/namm_board.py --name levers_transfer_board --seed 31415 \
        --tasks passkey,niah_single,niah_multikey,qa,niah_multiquery,vt,cwe \
        "${transfer_also[@]}" --baselines streamingllm --controls '' --no-fastgen "${transfer_cells[@]}"
    boards+=(--board bench/results/levers_transfer_board.parquet)
fi
.venv/bin/python bench/evolution_levers.py "${boards[@]}" \
    --warm-start namms/smollm2-warm-start --reference namms/smollm2 "${adapted_refs[@]}" "${levers[@]}"
