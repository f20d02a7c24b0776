#!/usr/bin/env bash
# Issue 13's measurements on this CPU, each resumable (a bench folder that holds records resumes
# where it stopped): run it again after an interruption.
#   1. all 80 MT-Bench questions, 128 new tokens, T=0 and T=1, 2 threads: plain (lean runtime),
#      the shipped block-diffusion drafter with the cost-aware length, HF generate;
#   2. the same with one thread, and beside it, on the other core, greedy equality at 256 new
#      tokens on the same 80 questions (plain vs the drafter; its speed is not the point, so it
#      shares the machine to fit in one session: memory traffic of the two slows run 2's figures
#      for every decoder alike, within each prompt).
# Usage: bash scripts/cpu_bench_lean.sh   (from the repository root, after `make install`)
set -euo pipefail
cd "$(dirname "$0")/.."
bench=".venv/bin/diffdraft bench --suite mt-bench --drafters block-diffusion@15 --no-progress"
$bench --max-new-tokens 128 --temperatures 0 1 --threads 2 --peers hf-generate --out results/mtbench-lean-2t
$bench --max-new-tokens 256 --temperatures 0 --threads 1 --peers none --out results/mtbench-lean-equality-256 &
$bench --max-new-tokens 128 --temperatures 0 1 --threads 1 --peers hf-generate --out results/mtbench-lean-1t
wait
