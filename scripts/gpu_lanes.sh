#!/usr/bin/env bash
# Everything diffdraft trains on a lent GPU machine (see README "Training a drafter"): the
# training data, and the trainings themselves as independent lanes run side by side (a 135M
# target leaves an H100 mostly idle, so small jobs share it better than one after another):
#   lane 1, 2: the issue-6 objective ablation rows
#   lane 3: the two-stage bd16 run (ShareGPT answers, then regenerated data) from the shipped
#           drafter, with the default objective (positional + focal + chain); the shipped one
#           came from this lane started from the first drafter, when focal was not yet a default
#   lane 4, 5: the issue-7 dLLM conversions (b = 4, 8), each followed by its dLLM drafter
#   lane 6, 7, 8: issue 15's DFlash drafters of 2, 3 and 5 layers (the depth choice): stage 1 on
#           ShareGPT's own answers of every turn (lane 6 tokenises them, 7 and 8 wait), stage 2
#           on the regenerated data, both with the chain loss and distillation; resumable
#           across leases (finished runs are skipped, unfinished ones resume from checkpoint)
#
# The machine has torch and transformers but no gguf, no model and no data. The GGUF travels
# in three pieces because every call also carries the ~20 MB work tree and a call carries
# 64 MiB in all:
#   here:    bash scripts/gpu_lanes.sh pack [DATA]          # .gpu/p1, p2, p3 (GGUF pieces, wheel, prompts, data)
#   call 1:  bash scripts/gpu_lanes.sh part 1               carry .gpu/p1
#   call 2:  bash scripts/gpu_lanes.sh part 2               carry .gpu/p2
#   call 3:  bash scripts/gpu_lanes.sh launch 500           carry .gpu/p3: set up, start the lanes, watch
#            (lanes 6 7 8 by default; LANES="4 5" bash scripts/gpu_lanes.sh launch 500: only those)
#       or:  bash scripts/gpu_lanes.sh data [N]             carry .gpu/p3: regenerate N prompts' answers -> $OUT/data.tgz
#   call 4+: bash scripts/gpu_lanes.sh watch 540            watch; export the runs that finished
#   here:    bash scripts/gpu_lanes.sh unpack FILES_AT      # exported runs -> runs/gpu/
#   here:    bash scripts/gpu_lanes.sh install [RUNS]       # RUNS (runs/gpu) dLLM adapters -> src/diffdraft/weights/
# Each call must come within 30 s of the last (the machine goes back when idle). The lanes run
# in their own process session (setsid), so they outlive the call that started them.
# Finished runs come back as a tar split into 15 MiB pieces (a call returns 8 files of 16 MiB).
set -euo pipefail
W=/tmp/dd
export PYTHONPATH="$PWD/src:$W/site" PYTHONUNBUFFERED=1 DIFFDRAFT_CACHE="$W/cache" TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=3 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
GGUF="$W/SmolLM2-135M-Instruct.Q4_1.gguf"
ABLATION="--steps 600 --batch-size 64 --blocks 32 --draft-vocab 8192 --save-dtype bfloat16 --seed 0 --focal-lambda 0 --chain-weight 0"

bd() {  # bd NAME ARGS...: one `diffdraft train` run in $W/runs/NAME (skipped once finished)
  local name="$1"; shift
  [ -f "$W/runs/$name/drafter/drafter.json" ] && return 0
  python3 -m diffdraft.cli train --out "$W/runs/$name" --model "$GGUF" --device cuda "$@" \
    > "$W/logs/$name.txt" 2>&1 || echo "$name failed" >> "$W/logs/failed"
}

dllm() {  # dllm NAME ARGS...: one `diffdraft dllm-train` run in $W/runs/NAME
  local name="$1"; shift
  [ -f "$W/runs/$name/adapter/drafter.json" ] && return 0
  python3 -m diffdraft.cli dllm-train --data "$W/data" --out "$W/runs/$name" --model "$GGUF" --device cuda \
    --amp bfloat16 --save-dtype bfloat16 --batch-size 32 --max-len 512 --lr 3e-4 --rank 8 \
    --eval-every 200 --save-every 200 "$@" > "$W/logs/$name.txt" 2>&1 || echo "$name failed" >> "$W/logs/failed"
}

lane() {  # lane N: the runs of lane N, one after another
  local D="--data $W/data"
  case "$1" in
    1) bd abl-uniform $D $ABLATION --gamma 0
       bd abl-positional $D $ABLATION
       bd abl-focal $D $ABLATION --gamma 0 --focal-lambda 1
       bd abl-chain $D $ABLATION --gamma 0 --chain-weight 1 ;;
    2) # an ablation row holds 25-30 GB: beside lanes 1 and 3 these three ran out of memory, so
       # lane 2 starts once lane 1 is done (when lane 1 runs at all)
       while grep -qw 1 <<< "${LANES:-1}" && ! grep -q "lane 1" "$W/logs/done" 2>/dev/null; do sleep 10; done
       bd abl-all3 $D $ABLATION --focal-lambda 1 --chain-weight 1
       bd abl-twostage $D $ABLATION --gamma 0 --align-fraction 0.3
       bd abl-masked $D $ABLATION --gamma 0 --kind masked-diffusion ;;
    3) bd bd16-stage1 --data "$W/sharegpt-answers" --eval-data "$W/data" --init-from "$W/shipped-bd16" \
         --steps 2000 --batch-size 64 --blocks 32 --draft-vocab 8192 --save-dtype bfloat16 --seed 1 \
         --lr 6e-4 --eval-every 250 --save-every 250 --chain-weight 1
       bd bd16-stage2 $D --init-from "$W/runs/bd16-stage1/drafter" --steps 1000 --batch-size 64 --blocks 32 \
         --draft-vocab 8192 --save-dtype bfloat16 --seed 2 --lr 3e-4 --eval-every 250 --save-every 250 \
         --chain-weight 1 ;;
    4|5) local b=$(( $1 == 4 ? 4 : 8 ))
       dllm "adapter-b$b" --block-size "$b" --steps 1200
       if [ -f "$W/runs/adapter-b$b/adapter/drafter.json" ]; then
         dllm "drafter-b$b" --block-size "$b" --layers 4 --init-from "$W/runs/adapter-b$b/adapter" --steps 600
       fi ;;
    6|7|8) local depth=$(( $1 == 6 ? 2 : ( $1 == 7 ? 3 : 5 ) ))
       local DF="--kind dflash --layers $depth --batch-size 64 --blocks 32 --save-dtype bfloat16 --chain-weight 1 --distill-weight 1 --eval-every 250 --save-every 250"
       if [ "$1" = 6 ] && [ ! -f "$W/sharegpt-all/manifest.json" ]; then
         python3 -m diffdraft.cli data --out "$W/sharegpt-all" --model "$GGUF" --responses sharegpt --turns all \
           --num-prompts 45000 --max-prompt-tokens 384 --max-new-tokens 256 > "$W/logs/sharegpt-all.txt" 2>&1
       fi
       while [ ! -f "$W/sharegpt-all/manifest.json" ]; do sleep 10; done
       bd "df16-l$depth-s1" --data "$W/sharegpt-all" --eval-data "$W/data" $DF --steps 3000 --lr 6e-4 --seed $1
       bd "df16-l$depth-s2" $D --init-from "$W/runs/df16-l$depth-s1/drafter" $DF --steps 1500 --lr 3e-4 --seed $1 ;;
  esac
  echo "lane $1 done" >> "$W/logs/done"
}

setup() {  # the gguf wheel and the joined GGUF, converted once to safetensors in $DIFFDRAFT_CACHE
  python3 -m pip install -q --no-index --no-deps --target "$W/site" .gpu/p3/gguf-*.whl
  cat "$W/gguf-00" "$W/gguf-01" .gpu/p3/gguf-02 > "$GGUF"
  sha256sum "$GGUF" | cut -c1-16
}

progress() {  # the last log line of every run, and the lanes that finished
  for f in "$W"/runs/*/log.jsonl; do
    [ -f "$f" ] || continue
    echo "$(basename "$(dirname "$f")"): $(tail -1 "$f" | cut -c1-230)"
  done
  cat "$W/logs/done" "$W/logs/failed" 2>/dev/null || true
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
}

export_finished() {  # tar the finished, not yet exported runs (up to ~110 MiB) into $OUT
  local list=() total=0 size
  touch "$W/exported"
  for run in "$W"/runs/*; do
    local name; name=$(basename "$run")
    grep -qx "$name" "$W/exported" && continue
    local result="$run/drafter"; [ -d "$run/adapter" ] && result="$run/adapter"
    [ -f "$result/drafter.json" ] || continue
    size=$(du -sm "$result" | cut -f1)
    [ $(( total + size )) -gt 110 ] && continue
    total=$(( total + size )); list+=("runs/$name/$(basename "$result")" "runs/$name/log.jsonl")
    echo "$name" >> "$W/exported"
  done
  [ ${#list[@]} -eq 0 ] && { echo "nothing new to export"; return 0; }
  tar cf - -C "$W" "${list[@]}" | split -b 15M -d - "$OUT/runs-$(date +%s).tar.part-"
  echo "exported: ${list[*]}"
}

watch_lanes() {  # watch SECONDS: progress every minute until the time is up or every lane is done
  local until=$(( $(date +%s) + $1 ))
  while [ "$(date +%s)" -lt "$until" ]; do
    [ "$(wc -l < "$W/logs/done" 2>/dev/null || echo 0)" -ge "$(cat "$W/logs/lanes")" ] && break
    sleep 60; echo "--- $(date +%T)"; progress
  done
  for f in "$W"/logs/*.txt; do grep -l -i "error\|traceback" "$f" >/dev/null && { echo "== $f"; tail -5 "$f"; }; done || true
  export_finished
}

case "${1:-}" in
  pack)  # DATA: a `diffdraft data` folder (default /work/data/data); SHAREGPT_ANSWERS: another, optional
    data="${2:-/work/data/data}" answers="${SHAREGPT_ANSWERS:-/work/data/sharegpt-answers}"
    rm -rf .gpu/p1 .gpu/p2 .gpu/p3 "$W/split" && mkdir -p .gpu/p1 .gpu/p2 .gpu/p3 "$W/split"
    gguf=$(python3 -c "from diffdraft.loading import default_gguf_path; print(default_gguf_path())")
    split -b 42M -d "$gguf" "$W/split/gguf-"
    mv "$W/split/gguf-00" .gpu/p1/ && mv "$W/split/gguf-01" .gpu/p2/ && mv "$W/split/gguf-02" .gpu/p3/
    python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu/p3 gguf==0.19.0
    python3 -c "from diffdraft.train.data import load_sharegpt_prompts as p; import json; json.dump(p(), open('.gpu/p3/prompts.json', 'w'))"
    [ -f "$data/manifest.json" ] && tar czf .gpu/p3/data.tgz -C "$(dirname "$data")" "$(basename "$data")"
    [ -f "$answers/manifest.json" ] && tar czf .gpu/p3/sharegpt-answers.tgz -C "$(dirname "$answers")" "$(basename "$answers")"
    tar czf .gpu/p3/shipped-bd16.tgz -C src/diffdraft/weights smollm2-bd16
    du -sh .gpu/p1 .gpu/p2 .gpu/p3
    ;;
  part)
    mkdir -p "$W" && cp ".gpu/p$2/gguf-0$(( $2 - 1 ))" "$W/"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    ;;
  data)
    setup
    python3 -m diffdraft.cli data --out "$W/data" --model "$GGUF" --dtype bfloat16 --device cuda \
      --prompts .gpu/p3/prompts.json --num-prompts "${2:-13983}" --shard-size 512 --batch-size 512 \
      --max-new-tokens 256 --max-prompt-tokens 256 --temperatures 0,0.8 2>&1 | tr '\r' '\n' | grep -v "^regenerating" || true
    cat "$W/data/manifest.json"
    tar czf "$OUT/data.tgz" -C "$W" data
    ;;
  launch)
    mkdir -p "$W/logs" "$W/runs"
    echo ${LANES:-6 7 8} | wc -w > "$W/logs/lanes"
    setup
    tar xzf .gpu/p3/data.tgz -C "$W"
    [ -f .gpu/p3/sharegpt-answers.tgz ] && tar xzf .gpu/p3/sharegpt-answers.tgz -C "$W"
    tar xzf .gpu/p3/shipped-bd16.tgz -C "$W" && mv "$W/smollm2-bd16" "$W/shipped-bd16"
    python3 -c "from diffdraft.loading import load_model; m, _ = load_model('$GGUF'); print(m.config.num_hidden_layers, 'layers')"
    for n in ${LANES:-6 7 8}; do
      setsid nohup bash "$0" lane "$n" > "$W/logs/lane$n.out" 2>&1 < /dev/null &
    done
    watch_lanes "${2:-480}"
    ;;
  lane) lane "$2" ;;
  watch) watch_lanes "${2:-540}" ;;
  install)  # install [RUNS]: the dLLM conversions and drafters in RUNS (default runs/gpu) -> the package's weights
    for b in 4 8; do
      for kind in adapter drafter; do
        src="${2:-runs/gpu}/$kind-b$b/adapter"
        [ -f "$src/drafter.json" ] || continue
        dest="src/diffdraft/weights/smollm2-dllm-b$b$([ "$kind" = drafter ] && echo -drafter || true)"
        mkdir -p "$dest" && cp "$src/drafter.json" "$src/drafter.safetensors" "$dest/"
        echo "installed $dest ($(du -h "$dest/drafter.safetensors" | cut -f1))"
      done
    done
    ;;
  unpack)
    mkdir -p runs/gpu
    for tarball in $(ls "$2"/runs-*.tar.part-00 2>/dev/null); do
      cat "${tarball%-00}"-* | tar xf - -C runs/gpu --strip-components 1
    done
    ls runs/gpu
    ;;
  *) sed -n '2,24p' "$0"; exit 2 ;;
esac
