#!/usr/bin/env bash
# Issue 12's and issue 13's single-GPU benchmarks side by side on a 2-GPU machine, as ONE command (about 9 minutes):
#
#   bash bench/two_gpus.sh OUT       # GPU 0: bench/gpu_train.sh (training); GPU 1: bench/gpu_generate.sh (generation)
#
# Each benchmark measures its own baselines on its own card in the same run, so its ratios hold as in a run alone; the
# two share only the host, each on its own half of the cores (taskset). The random-weight Llama-2-7B is written once to
# $MODELS/l7 (default /tmp/models; /tmp/l7 links to it: bench/multi_gpu.sh finds it there). Env: VARIANTS (training),
# GEN_ARGS (generate_speed.py flags), STAGES (gpu_train.sh's: speed,parity), DEADLINE_S (seconds from now for both;
# default 540), WHEELS_INSTALLED (skip the install). Carry .whl and .tok as for the scripts it runs.
set -u
out=$(mkdir -p "${1:?usage: bash bench/two_gpus.sh OUT}" && cd "$1" && pwd)
start=$(date +%s)
deadline=$((start + ${DEADLINE_S:-540}))
[ -n "${WHEELS_INSTALLED:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site WHEELS_INSTALLED=1 PYTHONUNBUFFERED=1
models=${MODELS:-/tmp/models}
mkdir -p "$models"
[ -f "$models/l7/config.json" ] || CUDA_VISIBLE_DEVICES=0 python3 bench/make_random_llama.py --out "$models/l7" \
  --tokenizer .tok/llama2-tokenizer > "$out/make_model.log" 2>&1 || { tail -5 "$out/make_model.log"; exit 1; }
[ -e /tmp/l7 ] || ln -s "$models/l7" /tmp/l7
left=$((deadline - $(date +%s)))
echo "[two_gpus] model ready after $(($(date +%s) - start)) s; $left s left"
half=$(($(nproc) / 2))  # each benchmark on its own half of the cores (both are host-bound at small steps)
pin0=() pin1=()
command -v taskset > /dev/null && [ "$half" -ge 2 ] && pin0=(taskset -c "0-$((half - 1))") pin1=(taskset -c "$half-$((2 * half - 1))")
CUDA_VISIBLE_DEVICES=0 DEADLINE_S=$((left - 15)) OMP_NUM_THREADS=$half timeout -k 10 $((left - 5)) "${pin0[@]}" \
  bash bench/gpu_train.sh "$out/train" > "$out/train.log" 2>&1 &
CUDA_VISIBLE_DEVICES=1 BENCH_ARGS="--budget-s $((left - ${GEN_TAIL_S:-150})) ${GEN_ARGS:-}" OMP_NUM_THREADS=$half \
  timeout -k 10 $((left - 10)) "${pin1[@]}" bash bench/gpu_generate.sh "$out/generate" > "$out/generate.log" 2>&1 &
wait
echo "[two_gpus] done after $(($(date +%s) - start)) s"
grep -h "^\[bench\]\|^\[train_speed\]\|ratio\|tokens/s" "$out/train.log" | tail -25
grep -h "^\[bench\] [a-z]" "$out/generate.log" | tail -25
