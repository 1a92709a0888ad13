#!/usr/bin/env bash
# Multi-GPU figures on one machine with 2 GPUs (issue 14), from the repository root, as ONE command:
#
#   bash bench/multi_gpu.sh all  OUT    # fsdp, then ddp: about 8-9 minutes on 2 x H100
#   bash bench/multi_gpu.sh fsdp OUT    # random Llama-2-13B, --quant-storage bfloat16, the same tokens per micro-batch:
#       1 single13  one process, one GPU, no cap: the one-process peak (steady: training only; and while loading)
#       2 fsdp13    FSDP-QLoRA on 2 GPUs, no cap: per-rank peaks (ratio to 1), FSDP tokens/s per GPU; checkpoints 3 and 6
#       3 fsdp13_resume_capped  both processes capped at 0.75 x the one-process peak, --resume from fsdp13's step 3:
#                   loads, wraps and trains steps 4-6 under the cap; its losses against fsdp13's; checkpoint and final adapter
#       4 adapter13 the final adapter on ONE GPU: PeftModel.from_pretrained (model.Llama) and an answer
#       5 fsdp13_offload  FSDP with --fsdp_offload_params true (shards in CPU RAM): per-GPU peak and tokens/s
#   bash bench/multi_gpu.sh ddp  OUT    # random Llama-2-7B: 1 GPU vs DDP on 2 GPUs (scaling), and FSDP 7B's per-rank peak
#                                       # (with 13B's: the two points the 70B figure is extrapolated from)
#
# Before, here: ../shared/gpu/fetch-wheels.sh (.whl/) and mkdir -p .tok && cp -r ../shared/llama2-tokenizer .tok/ (the real
# tokenizer); both folders are git-ignored, so the device run carries them: carry [".whl", ".tok"].
# Every run is main.py itself through configs/accelerate/*.yaml, with LLAMA_DOLLY_MEMORY_PROBE (memory.py): each rank
# writes OUT/NAME.memory/rankR.json (after load, after LoRA, after the FSDP wrap, steps 1-3, steady peak, memory_summary).
# OUT/NAME.log, OUT/NAME.metrics.json per run; OUT/fsdp_summary.json and OUT/ddp_summary.json after each stage.
# Env: MODELS (default /tmp/models), RUNS (/tmp/runs), SNAPSHOT=1 (allocation snapshots of the capped run, large),
# FSDP_AB=1 (adds fsdp13_gpu: the old placement, 4-bit base left on each GPU, LLAMA_DOLLY_FSDP_LOAD=gpu).
set -u
[ -n "${WHEELS_INSTALLED:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
mode=${1:-all}
out=$(mkdir -p "${2:-bench_out}" && cd "${2:-bench_out}" && pwd)
models=${MODELS:-/tmp/models}
runs=${RUNS:-/tmp/runs}
mkdir -p "$models" "$runs"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # every run, the one-process baseline included
launch=(python3 -m accelerate.commands.launch)
data=$models/dolly-like.jsonl
common=(--dataset "$data" --eval-steps 0 --val-fraction 0 --logging-steps 1 --save-total-limit 5)

prepare() {  # SIZES...: the random-weight models (7B on GPU 0 and 13B on GPU 1 at once) and dolly-like records
  local tok=.tok/llama2-tokenizer
  [ -f "$tok/tokenizer.model" ] || { echo "[multi_gpu] $tok missing: cp -r ../shared/llama2-tokenizer .tok/"; exit 1; }
  [[ " $* " != *" 7 "* ]] || [ -f "$models/l7/config.json" ] || CUDA_VISIBLE_DEVICES=0 python3 bench/make_random_llama.py --out "$models/l7" --tokenizer $tok &
  [[ " $* " != *" 13 "* ]] || [ -f "$models/l13/config.json" ] || CUDA_VISIBLE_DEVICES=1 python3 bench/make_random_llama.py --size 13b --out "$models/l13" --tokenizer $tok &
  [ -f "$data" ] || python3 -c "
import json, sys
sys.path.insert(0, 'bench')
from train_speed import make_records  # the dolly-15k length model of bench/train_speed.py
with open('$data', 'w') as fh:
    fh.writelines(json.dumps(r | {'category': 'open_qa'}) + '\n' for r in make_records(4000, 42))"
  wait
}

train() {  # NAME SECONDS launcher-and-its-flags ... -- main.py flags
  local name=$1 limit=$2; shift 2
  local launcher=()
  while [ "$1" != "--" ]; do launcher+=("$1"); shift; done
  shift
  local t0=$SECONDS
  [[ " $* " == *" --resume "* ]] || rm -rf "${runs:?}/$name"
  rm -rf "${out:?}/$name.memory"
  LLAMA_DOLLY_MEMORY_PROBE="$out/$name.memory" timeout -s TERM -k 20 "$limit" "${launcher[@]}" "$@" \
    --output-dir "$runs/$name" "${common[@]}" > "$out/$name.log" 2>&1
  local rc=$?
  echo "[multi_gpu] $name: exit $rc after $((SECONDS - t0)) s"
  [ -f "$runs/$name/metrics.json" ] && cp "$runs/$name/metrics.json" "$out/$name.metrics.json"
  grep -E "^\[memory\] rank . (after (load|wrap)|step 3|parameters)|^\[capped\]|^\[main\] (global batch|stopped)|Error|error:" \
    "$out/$name.log" | head -14
  return $rc
}

summarize() {  # MODE: read every result present in OUT, write OUT/MODE_summary.json, print it
  python3 bench/multi_gpu_summary.py "$1" "$out" "$runs"
}

# The same settings for every FSDP-QLoRA and one-process memory figure (the memory plan is off under FSDP, so it is off
# for the one-process run too): the first run on 2x H100 compared a plan-chosen one process (no checkpointing, 8192
# tokens) with FSDP (4096, checkpointing). fsdp7 uses them too: 7B and 13B are the two points of the 70B extrapolation.
same=(--quant-storage bfloat16 --memory-plan off --gradient-checkpointing --pack-tokens 4096)

fsdp() {
  local flags=(--base-model "$models/l13" "${same[@]}")
  train single13 240 env CUDA_VISIBLE_DEVICES=0 "${launch[@]}" --config_file configs/accelerate/single_gpu.yaml main.py -- \
    "${flags[@]}" --max-steps 5 --save-steps 100000
  summarize fsdp
  train fsdp13 300 "${launch[@]}" --config_file configs/accelerate/fsdp_qlora.yaml --num_processes 2 main.py -- \
    "${flags[@]}" --max-steps 6 --save-steps 3
  summarize fsdp
  local cap
  cap=$(python3 -c "import json; print(json.load(open('$out/fsdp_summary.json'))['cap_gib'])") || return
  rm -rf "$runs/fsdp13_resume_capped" && mkdir -p "$runs/fsdp13_resume_capped/checkpoints"
  cp -r "$runs/fsdp13/checkpoints/checkpoint-3" "$runs/fsdp13_resume_capped/checkpoints/"
  [ "${SNAPSHOT:-0}" = 1 ] && export LLAMA_DOLLY_MEMORY_SNAPSHOT=1
  train fsdp13_resume_capped 300 env GPU_MEM_CAP_GIB="$cap" "${launch[@]}" --config_file configs/accelerate/fsdp_qlora.yaml \
    --num_processes 2 bench/capped_main.py -- "${flags[@]}" --max-steps 6 --save-steps 3 --resume
  unset LLAMA_DOLLY_MEMORY_SNAPSHOT
  summarize fsdp
  local t0=$SECONDS
  CUDA_VISIBLE_DEVICES=0 timeout 180 python3 bench/multi_gpu_summary.py adapter "$out" "$runs/fsdp13_resume_capped" \
    > "$out/adapter13.log" 2>&1
  echo "[multi_gpu] adapter13: exit $? after $((SECONDS - t0)) s"; tail -3 "$out/adapter13.log"
  # 5 fsdp13_offload: the same FSDP run with the shards in CPU RAM (fsdp_offload_params): what takes the per-GPU peak
  #   below the 2-GPU floor of plain sharding (activations do not shard); its speed beside it; the final adapter written
  train fsdp13_offload 240 "${launch[@]}" --config_file configs/accelerate/fsdp_qlora.yaml --num_processes 2 \
    --fsdp_offload_params true main.py -- "${flags[@]}" --max-steps 5 --save-steps 100000
  summarize fsdp
  if [ "${FSDP_AB:-0}" = 1 ]; then
    LLAMA_DOLLY_FSDP_LOAD=gpu train fsdp13_gpu 300 "${launch[@]}" --config_file configs/accelerate/fsdp_qlora.yaml \
      --num_processes 2 main.py -- "${flags[@]}" --max-steps 5 --save-steps 100000
  fi
  summarize fsdp
}

ddp() {
  local flags=(--base-model "$models/l7" --save-steps 100000)
  train ddp1 180 env CUDA_VISIBLE_DEVICES=0 "${launch[@]}" --config_file configs/accelerate/single_gpu.yaml main.py -- \
    "${flags[@]}" --max-steps 12
  train ddp2 180 "${launch[@]}" --config_file configs/accelerate/ddp.yaml --num_processes 2 main.py -- "${flags[@]}" --max-steps 12
  summarize ddp
  train fsdp7 180 "${launch[@]}" --config_file configs/accelerate/fsdp_qlora.yaml --num_processes 2 main.py -- \
    "${flags[@]}" "${same[@]}" --max-steps 3
  summarize ddp
}

case $mode in
  fsdp) prepare 13; fsdp ;;
  ddp) prepare 7; ddp ;;
  all) prepare 7 13; fsdp; ddp ;;
  *) echo "usage: bash bench/multi_gpu.sh {all|fsdp|ddp} OUT"; exit 2 ;;
esac
echo "[multi_gpu] done in $SECONDS s; results in $out"
