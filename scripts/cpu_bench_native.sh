#!/usr/bin/env bash
# Issue 20's measurements, one after another (each bench resumes where it stopped): the native 4-bit
# weights beside float32, the shipped drafter, HF generate and llama.cpp (the peers extra), then
# greedy equality and the drift at 256 tokens, then one thread. Progress in results/native-bench.log.
# LIMIT (default 80) and ONE_THREAD_LIMIT (default 16) set the questions of the two speed runs; SUFFIX
# (default none) is appended to every results folder, to keep another machine's run beside these.
set -euo pipefail
cd "$(dirname "$0")/.."
D=.venv/bin/diffdraft
log="results/native-bench${SUFFIX:-}.log"
{
  echo "== $(date -u +%FT%TZ) 2 threads, ${LIMIT:=80} MT-Bench questions, 128 tokens, T=0 and T=1"
  $D bench --suite mt-bench --limit "$LIMIT" --drafters block-diffusion@15 --weights native float32 --peers hf-generate llama.cpp \
    --max-new-tokens 128 --temperatures 0 1 --threads 2 --no-progress --out "results/native-mtbench-2t${SUFFIX:=}"
  echo "== $(date -u +%FT%TZ) greedy equality and drift at 256 tokens"
  $D bench --suite mt-bench --drafters block-diffusion@15 --weights native float32 --peers none \
    --max-new-tokens 256 --temperatures 0 --threads 2 --no-progress --out "results/native-equality-256$SUFFIX"
  [ -f "results/native-equality-256$SUFFIX/drift.json" ] ||
    .venv/bin/python scripts/weights_drift.py --bench "results/native-equality-256$SUFFIX" --threads 2
  echo "== $(date -u +%FT%TZ) 1 thread, ${ONE_THREAD_LIMIT:=16} questions"
  $D bench --suite mt-bench --limit "$ONE_THREAD_LIMIT" --drafters block-diffusion@15 --weights native float32 \
    --peers hf-generate llama.cpp --max-new-tokens 128 --temperatures 0 1 --threads 1 --no-progress \
    --out "results/native-mtbench-1t$SUFFIX"
  echo "== $(date -u +%FT%TZ) done"
} >> "$log" 2>&1
