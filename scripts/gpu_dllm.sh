#!/usr/bin/env bash
# Converting SmolLM2 into block-diffusion LMs (b = 4 and 8) and training their dLLM drafters
# on a lent GPU machine (DESIGN.md section 6, issue 7). Staged like scripts/gpu.sh: the
# machine has torch and transformers but no gguf, no model and no data, so they travel in
# carried folders (at most 64 MiB a call) while the machine stays warm between calls.
#
#   here:    bash scripts/gpu_dllm.sh pack [DATA]     # DATA (default /work/data/data) -> .gpu/c/data.tgz (~4 MB)
#   call 1:  bash scripts/gpu.sh part-a                               carry .gpu/a
#   call 2:  bash scripts/gpu_dllm.sh setup                           carry .gpu/b .gpu/c
#   call 3:  bash scripts/gpu_dllm.sh convert 4 [STEPS] [ARGS...]     -> $OUT/adapter-b4/, $OUT/log-b4.jsonl
#   call 4:  bash scripts/gpu_dllm.sh convert 8 [STEPS] [ARGS...]     -> $OUT/adapter-b8/, $OUT/log-b8.jsonl
#   call 5:  bash scripts/gpu_dllm.sh drafter 4 [LAYERS] [STEPS]      -> $OUT/drafter-b4/ (starts from adapter-b4)
#   call 6:  bash scripts/gpu_dllm.sh drafter 8 [LAYERS] [STEPS]      -> $OUT/drafter-b8/
#   here:    bash scripts/gpu_dllm.sh install FILES_AT                # each call's files -> src/diffdraft/weights/
#
# A run stopped by its time limit (LIMIT seconds, default 540) keeps its checkpoint in
# /tmp/dd on the machine: the same call again resumes it. Only a finished run is exported.
set -euo pipefail
W=/tmp/dd
export PYTHONPATH="$PWD/src:$W/site" PYTHONUNBUFFERED=1 DIFFDRAFT_CACHE="$W/cache" TOKENIZERS_PARALLELISM=false
GGUF="$W/SmolLM2-135M-Instruct.Q4_1.gguf"
LIMIT="${LIMIT:-540}"

train() {  # train NAME ARGS...: one dllm-train run in $W/NAME, exported to $OUT/NAME if it finished
  local name="$1"; shift
  set +e
  timeout "$LIMIT" python3 -m diffdraft.cli dllm-train --data "$W/data" --out "$W/$name" --model "$GGUF" \
    --device cuda --amp bfloat16 --save-dtype bfloat16 "$@" 2>&1
  local rc=$?
  set -e
  cp "$W/$name/log.jsonl" "$OUT/log-$name.jsonl" 2>/dev/null || true
  if [ "$rc" -ne 0 ] || [ ! -f "$W/$name/adapter/drafter.json" ]; then
    echo "run $name stopped (exit $rc): the same call again resumes it from $W/$name/checkpoint"
    return 0
  fi
  mkdir -p "$OUT/$name"
  cp "$W/$name/adapter/drafter.json" "$W/$name/adapter/drafter.safetensors" "$OUT/$name/"
  ls -la "$OUT/$name"
}

case "${1:-}" in
  pack)
    data="${2:-/work/data/data}"
    [ -f "$data/manifest.json" ] || { echo "no diffdraft data folder at $data"; exit 2; }
    mkdir -p .gpu/c
    tar czf .gpu/c/data.tgz -C "$(dirname "$data")" "$(basename "$data")"
    ls -la .gpu/c
    ;;
  setup)
    mkdir -p "$W"
    python3 -m pip install -q --no-index --no-deps --target "$W/site" .gpu/b/gguf-*.whl
    cat "$W/part_aa" .gpu/b/part_ab > "$GGUF"
    sha256sum "$GGUF" | cut -c1-16
    rm -rf "$W/data" && mkdir -p "$W/unpack" && tar xzf .gpu/c/data.tgz -C "$W/unpack"
    mv "$W/unpack/"* "$W/data" && rmdir "$W/unpack"
    cat "$W/data/manifest.json"
    # converts the GGUF to safetensors once (in $DIFFDRAFT_CACHE), so every later run loads in seconds
    python3 -c "from diffdraft.loading import load_model; m, _ = load_model('$GGUF'); print(m.config.num_hidden_layers, 'layers')"
    nvidia-smi --query-gpu=name,memory.total --format=csv
    ;;
  convert)
    b="$2"; steps="${3:-2000}"; shift $(( $# < 3 ? $# : 3 ))
    train "adapter-b$b" --block-size "$b" --steps "$steps" --batch-size 32 --max-len 512 --lr 3e-4 --rank 8 \
      --eval-every 200 --save-every 200 "$@"
    ;;
  drafter)
    b="$2"; layers="${3:-4}"; steps="${4:-1000}"
    [ -f "$W/adapter-b$b/adapter/drafter.json" ] || { echo "convert $b first"; exit 2; }
    train "drafter-b$b" --block-size "$b" --layers "$layers" --init-from "$W/adapter-b$b/adapter" \
      --steps "$steps" --batch-size 32 --max-len 512 --lr 3e-4 --rank 8 --eval-every 200 --save-every 200
    ;;
  install)
    from="${2:?the files_at folder of a call}"
    for kind in adapter drafter; do
      for b in 4 8; do
        src="$from/$kind-b$b"
        [ -f "$src/drafter.json" ] || continue
        dest="src/diffdraft/weights/smollm2-dllm-b$b$([ "$kind" = drafter ] && echo -drafter || true)"
        mkdir -p "$dest" && cp "$src/drafter.json" "$src/drafter.safetensors" "$dest/"
        echo "installed $dest ($(du -h "$dest/drafter.safetensors" | cut -f1))"
      done
    done
    ;;
  *)
    sed -n '2,20p' "$0"
    exit 2
    ;;
esac
