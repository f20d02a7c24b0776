#!/usr/bin/env bash
# Stages of a drafter training run on a lent GPU machine (see README "Training on a GPU").
# The machine has torch and transformers but no gguf and no model: the SmolLM2 GGUF travels
# in two halves (.gpu/a/part_aa, .gpu/b/part_ab) with the gguf wheel and a prompts file
# (.gpu/b/), carried by two calls in a row while the machine is warm.
#   bash scripts/gpu.sh part-a          # call 1, carry .gpu/a
#   bash scripts/gpu.sh data [N]        # call 2, carry .gpu/b: join, regenerate N prompts
#   bash scripts/gpu.sh train ARGS...   # call 3: train on the regenerated data
# With training data made earlier (.gpu/c/data.tgz: `bash scripts/gpu_dllm.sh pack`):
#   bash scripts/gpu.sh setup           # call 2 instead of `data`, carry .gpu/b .gpu/c: join, install, unpack
# The objective ablation of issue 6 is one `train` call per row, same data, budget and seed:
#   bash scripts/gpu.sh train $ABLATION --gamma 0                      # uniform
#   bash scripts/gpu.sh train $ABLATION                                # + positional (gamma 7)
#   bash scripts/gpu.sh train $ABLATION --gamma 0 --focal-lambda 1     # + first-error focal
#   bash scripts/gpu.sh train $ABLATION --gamma 0 --chain-weight 1     # + chain
#   bash scripts/gpu.sh train $ABLATION --focal-lambda 1 --chain-weight 1   # all three
#   bash scripts/gpu.sh train $ABLATION --gamma 0 --align-fraction 0.3      # two-stage
#   bash scripts/gpu.sh train $ABLATION --gamma 0 --kind masked-diffusion   # standalone (bench T = 1, 2, 4)
# with ABLATION="--steps 600 --batch-size 64 --blocks 32 --draft-vocab 8192 --save-dtype bfloat16 --seed 0 --focal-lambda 0 --chain-weight 0"
set -euo pipefail
W=/tmp/dd
mkdir -p "$W"
export PYTHONPATH="$PWD/src:$W/site" PYTHONUNBUFFERED=1 DIFFDRAFT_CACHE="$W/cache" TOKENIZERS_PARALLELISM=false
GGUF="$W/SmolLM2-135M-Instruct.Q4_1.gguf"
case "$1" in
  part-a)
    cp .gpu/a/part_aa "$W/"
    nvidia-smi --query-gpu=name,memory.total --format=csv
    python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.is_available())"
    ;;
  data)
    python3 -m pip install -q --no-index --no-deps --target "$W/site" .gpu/b/gguf-*.whl
    cp .gpu/b/prompts.json "$W/"
    cat "$W/part_aa" .gpu/b/part_ab > "$GGUF"
    sha256sum "$GGUF" | cut -c1-16
    python3 -m diffdraft.cli data --out "$W/data" --model "$GGUF" --dtype bfloat16 --device cuda \
      --prompts "$W/prompts.json" --num-prompts "${2:-13983}" --shard-size 512 --batch-size 512 \
      --max-new-tokens 256 --max-prompt-tokens 256 --temperatures 0,0.8 2>&1 | tr '\r' '\n' | grep -v "^regenerating" || true
    cat "$W/data/manifest.json"
    tar czf "$OUT/data.tgz" -C "$W" data
    ls -la "$OUT"
    ;;
  setup)
    python3 -m pip install -q --no-index --no-deps --target "$W/site" .gpu/b/gguf-*.whl
    cat "$W/part_aa" .gpu/b/part_ab > "$GGUF"
    sha256sum "$GGUF" | cut -c1-16
    tar xzf .gpu/c/data.tgz -C "$W"
    # ShareGPT's own answers (`diffdraft data --responses sharegpt`), for a first training stage
    if [ -f .gpu/c/sharegpt-answers.tgz ]; then tar xzf .gpu/c/sharegpt-answers.tgz -C "$W"; fi
    cat "$W/data/manifest.json"
    ;;
  train)
    shift
    python3 -m diffdraft.cli train --data "$W/data" --out "$W/run" --model "$GGUF" --device cuda "$@" 2>&1
    cp -r "$W/run/drafter" "$OUT/drafter"
    cp "$W/run/log.jsonl" "$OUT/"
    ls -laR "$OUT"
    ;;
esac
