#!/usr/bin/env bash
# Multi-GPU figures for BENCHMARKS.md, on one machine with 2 GPUs, from the repository root:
#
#   bash bench/multi_gpu.sh ddp  OUT    # random Llama-2-7B: 1 GPU vs DDP on 2 GPUs, same per-GPU batch
#   bash bench/multi_gpu.sh fsdp OUT    # random Llama-2-13B: one process (uncapped, its peak memory), then
#                                       # FSDP-QLoRA on 2 GPUs with each process capped below that peak:
#                                       # trains, checkpoints, saves; the one-process run under the same cap
#
# Needs the real Llama 2 tokenizer in .tok/llama2-tokenizer (random-weight models are written to $MODELS,
# default /tmp/models). Every run is main.py itself, launched through configs/accelerate/*.yaml; its
# metrics.json (train_tokens_per_second_steady: tokens/s of all processes after the first 3 steps) and
# its log are copied to OUT. NCCL's NVLink multicast stays off (NCCL_NVLS_ENABLE=0).
set -u
mode=$1
out=$2
models=${MODELS:-/tmp/models}
runs=${RUNS:-/tmp/runs}
steps=${STEPS:-30}
mkdir -p "$out" "$models" "$runs"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
data=$models/dolly-like.jsonl
if [ ! -f "$data" ]; then
  python - "$data" <<'EOF'
import json, sys
sys.path.insert(0, "bench")
from train_speed import make_records  # the dolly-15k length model of bench/train_speed.py
with open(sys.argv[1], "w") as fh:
    fh.writelines(json.dumps(r | {"category": "open_qa"}) + "\n" for r in make_records(4000, 42))
EOF
fi
common=(--dataset "$data" --eval-steps 0 --val-fraction 0 --logging-steps 1)

train() {  # name, launcher and its flags ..., then main.py flags after "--"
  local name=$1; shift
  local launcher=()
  while [ "$1" != "--" ]; do launcher+=("$1"); shift; done
  shift
  local t0=$SECONDS
  [[ " $* " == *" --resume "* ]] || rm -rf "${runs:?}/$name"
  "${launcher[@]}" "$@" --output-dir "$runs/$name" "${common[@]}" > "$out/$name.log" 2>&1
  local rc=$?
  echo "[multi_gpu] $name: exit $rc after $((SECONDS - t0)) s"
  [ -f "$runs/$name/metrics.json" ] && cp "$runs/$name/metrics.json" "$out/$name.metrics.json"
  grep -E "^\[main\] (train_runtime|global batch)|^\[capped\]|Error|error:" "$out/$name.log" | head -8
  return $rc
}

steady() { python -c "import json,sys; print(json.load(open(sys.argv[1]))['train_tokens_per_second_steady'])" "$1"; }
peak() { python -c "import json,sys; print(json.load(open(sys.argv[1]))['peak_gpu_mem_gib'])" "$1"; }

if [ "$mode" = ddp ]; then
  [ -f "$models/l7/config.json" ] || python bench/make_random_llama.py --out "$models/l7" --tokenizer .tok/llama2-tokenizer
  flags=(--base-model "$models/l7" --max-steps "$steps" --save-steps 100000)
  train ddp1 env CUDA_VISIBLE_DEVICES=0 accelerate launch --config_file configs/accelerate/single_gpu.yaml main.py -- "${flags[@]}"
  train ddp2 accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2 main.py -- "${flags[@]}"
  python - "$out" <<'EOF'
import json, sys
one, two = (json.load(open(f"{sys.argv[1]}/ddp{n}.metrics.json")) for n in (1, 2))
s1, s2 = one["train_tokens_per_second_steady"], two["train_tokens_per_second_steady"]
result = {"one_gpu_tokens_per_s": s1, "two_gpu_tokens_per_s": s2, "scaling_efficiency": s2 / (2 * s1),
          "peak_gpu_mem_gib": {"1": one.get("peak_gpu_mem_gib"), "2": two.get("peak_gpu_mem_gib")}, "versions": two["versions"]}
json.dump(result, open(f"{sys.argv[1]}/ddp_scaling.json", "w"), indent=2)
print(f"[multi_gpu] DDP: 1 GPU {s1:.0f} tok/s, 2 GPUs {s2:.0f} tok/s, scaling efficiency {s2 / (2 * s1):.3f}")
EOF
fi

if [ "$mode" = fsdp ]; then
  [ -f "$models/l13/config.json" ] || python bench/make_random_llama.py --size 13b --out "$models/l13" --tokenizer .tok/llama2-tokenizer
  flags=(--base-model "$models/l13" --quant-storage bfloat16 ${FSDP_FLAGS:-})
  # 1) one process, one GPU, no cap: what Llama-2-13B QLoRA needs on one card (peak allocated memory).
  train single13 env CUDA_VISIBLE_DEVICES=0 python main.py -- "${flags[@]}" --max-steps 4 --save-steps 100000
  need=$(peak "$out/single13.metrics.json")
  cap=$(python -c "print(round(0.75 * $need, 2))")
  echo "[multi_gpu] one process needs $need GiB; cap for FSDP: $cap GiB per process"
  # 2) FSDP-QLoRA on 2 GPUs, each process capped at 75% of that: 6 steps, checkpoints at 3 and 6, final save.
  train fsdp13 env GPU_MEM_CAP_GIB="$cap" accelerate launch --config_file configs/accelerate/fsdp_qlora.yaml --num_processes 2 \
    bench/capped_main.py -- "${flags[@]}" --max-steps 6 --save-steps 3
  ls -la "$runs/fsdp13" "$runs/fsdp13/checkpoints"/* > "$out/fsdp13.files.txt" 2>&1
  head -40 "$out/fsdp13.files.txt"
  # 3) resume from the step-3 checkpoint (same 2 processes): the losses of steps 4-6 must equal the uninterrupted run's.
  mkdir -p "$runs/fsdp13_resume/checkpoints" && cp -r "$runs/fsdp13/checkpoints/checkpoint-3" "$runs/fsdp13_resume/checkpoints/"
  train fsdp13_resume env GPU_MEM_CAP_GIB="$cap" accelerate launch --config_file configs/accelerate/fsdp_qlora.yaml --num_processes 2 \
    bench/capped_main.py -- "${flags[@]}" --max-steps 6 --save-steps 3 --resume
  python - "$runs" "$out" <<'EOF'
import json, sys
runs, out = sys.argv[1:]
def losses(name):
    with open(f"{runs}/{name}/checkpoints/checkpoint-6/trainer_state.json") as fh:
        return [h["loss"] for h in json.load(fh)["log_history"] if "loss" in h]
full, resumed = losses("fsdp13"), losses("fsdp13_resume")
print(f"[multi_gpu] FSDP losses uninterrupted {full}\n[multi_gpu] FSDP losses resumed       {resumed}")
json.dump({"uninterrupted": full, "resumed": resumed}, open(f"{out}/fsdp13_resume_losses.json", "w"), indent=2)
EOF
  # 4) the same one-process run under the same cap: expected to run out of memory.
  train single13_capped env CUDA_VISIBLE_DEVICES=0 GPU_MEM_CAP_GIB="$cap" python bench/capped_main.py -- "${flags[@]}" --max-steps 2 --save-steps 100000
  grep -m2 -iE "out of (GPU )?memory" "$out/single13_capped.log"
fi
