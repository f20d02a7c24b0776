#!/usr/bin/env bash
# Issue 15's pipeline end to end on this CPU, at a size that proves it runs, not one that trains a
# useful drafter (that needs the GPU lanes 6-8 of scripts/gpu_lanes.sh):
#   ShareGPT's own answers of every turn (tokenised only) -> `diffdraft train --kind dflash` with
#   the chain loss and distillation -> `diffdraft export --format dflash` (checked by the vLLM /
#   SGLang rules) -> the exported folder drafting in `diffdraft bench` beside the shipped drafter.
# Resumable: the data and the run folder are reused when present. Logs and figures land in OUT.
# Usage: bash scripts/cpu_dflash_smoke.sh [WORK] [OUT]   (after `make install`)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/dfsmoke}
OUT=${2:-results/dflash-cpu-smoke}
dd=.venv/bin/diffdraft
mkdir -p "$WORK" "$OUT"
[ -f "$WORK/data/manifest.json" ] || $dd data --out "$WORK/data" --responses sharegpt --turns all \
  --num-prompts 2000 --max-prompt-tokens 256 --max-new-tokens 192 --eval-fraction 0.02
start=$(date +%s)
$dd train --data "$WORK/data" --out "$WORK/run" --kind dflash --layers 2 --block-size 16 --steps 80 \
  --batch-size 4 --blocks 8 --max-len 384 --lr 1e-3 --warmup 10 --chain-weight 1 --distill-weight 1 \
  --eval-every 40 --save-every 40 --eval-sequences 16 --save-dtype bfloat16
echo "train wall time: $(( $(date +%s) - start )) s" | tee "$OUT/train-wall.txt"
cp "$WORK/run/log.jsonl" "$OUT/log.jsonl"
cp "$WORK/data/manifest.json" "$OUT/data-manifest.json"
$dd export "$WORK/run/drafter" --format dflash --out "$WORK/export" | tee "$OUT/export.txt"
cp "$WORK/export/config.json" "$OUT/exported-config.json"
$dd bench --suite mt-bench --limit 8 --drafters "$WORK/export@15" block-diffusion@15 --max-new-tokens 64 \
  --temperatures 0 --threads 2 --peers none --no-progress --out "$OUT/bench"
