#!/usr/bin/env bash
# The issue-7 dLLM conversions on this CPU, for when no GPU is lent: SmolLM2 converted for blocks
# of 4 and its 4-layer dLLM drafter (starting from the converted target's first layers), then
# for blocks of 8 starting from the b = 4 adapters, and its drafter. Runs go to runs/cpu/NAME (log: runs/cpu/NAME.log,
# figures: runs/cpu/NAME/log.jsonl). A finished run is skipped, an interrupted one resumes from its
# last checkpoint (every 25 steps). On 2 cores: 22-25 s per conversion step, 4-5 s per drafter
# step, 71 min in all (results/training/README.md).
#   bash scripts/cpu_dllm.sh [DATA]            DATA: a `diffdraft data` folder (default data/data)
#   bash scripts/gpu_lanes.sh install runs/cpu  the results -> src/diffdraft/weights/smollm2-dllm-b*
# A GPU does the same at a larger budget: scripts/gpu_lanes.sh, lanes 4 and 5.
set -euo pipefail
DATA="${1:-data/data}"
R=runs/cpu
COMMON=(--data "$DATA" --batch-size 8 --max-len 256 --eval-every 25 --eval-sequences 16 --save-every 25 --seed 0)
mkdir -p "$R"

run() {  # run NAME ARGS...: one `diffdraft dllm-train` run, skipped once its adapter folder exists
  local name="$1"; shift
  [ -f "$R/$name/adapter/drafter.json" ] && return 0
  echo "$(date -u +%T) $name" >&2
  diffdraft dllm-train --out "$R/$name" "${COMMON[@]}" "$@" > "$R/$name.log" 2>&1
}

run adapter-b4 --block-size 4 --steps 100 --lr 1e-3 --warmup 10
# the drafter: the target's first 4 layers then its final norm and head predict at held-out loss ~19
# untrained (SmolLM2's middle layers do not read out through its head), so it gets rank-32
# adapters of its own and a higher learning rate; only the mask embedding comes from the target
DRAFTER=(--layers 4 --rank 32 --alpha 64 --lr 2e-3 --warmup 10)
run drafter-b4 --block-size 4 "${DRAFTER[@]}" --steps 200 --init-from "$R/adapter-b4/adapter"
run adapter-b8 --block-size 8 --steps 40 --lr 5e-4 --warmup 5 --init-from "$R/adapter-b4/adapter"
run drafter-b8 --block-size 8 "${DRAFTER[@]}" --steps 40 --init-from "$R/drafter-b4/adapter"
echo "$(date -u +%T) done" >&2
