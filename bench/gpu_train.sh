#!/usr/bin/env bash
# Issue 12's GPU measurements in ONE command (about 9 minutes on one H100), from the repository root:
#
#   cp -r ../shared/llama2-tokenizer .tok/        # once, here (ignored); the device run carries .whl and .tok
#   bash bench/gpu_train.sh OUT
#
# In priority order, each step writing its JSON as soon as it ends, skipping what would end after DEADLINE_S
# (default 530 s from the start):
#   1. bench/train_speed.py -> OUT/train_speed.json (+ one log per variant):
#      hf_tuned, hf_tuned_nogc (plain HF, issue 12's settings; each run twice, where listed and after every other
#      variant, the faster kept: --baseline-runs; over a whole megabatch each run takes ~100-120 s, so name fewer
#      VARIANTS: the default list does not fit in one command, and the deadline skips the later ones);
#      default = python main.py (memory plan, --compile auto, --attention auto: varlen FlashAttention over the record
#      bounds, --dense-base auto: the 16-bit copy of the base where it fits; listed second, so that its ratio comes
#      before the deadline: session 17's command that listed both baselines first ran out of time for it), then 3 more
#      steps profiled (OUT/profile-default/trace.json.gz, summary.json); default_4bit (--dense-base no: the default
#      before session 6);
#      default_cap24 (a 24 GiB cap); dense_nogc_2048 / varlen_nogc_2048 (with default / default_4bit: fixed_overhead_s);
#      compiled_cudagraphs (--pad-to-budget --compile-mode reduce-overhead: CUDA graphs over fixed shapes);
#      compiled_16k (the recipe doubled: one 16,384-token micro-batch per step); baseline (plain HF as commonly run).
#      VARIANTS=a,b,... replaces it.
#   2. bench/loss_parity.py -> OUT/loss_parity.json + .png: project (python main.py's setting: 8,192-token rows, no
#      checkpointing, compiled, varlen; 4-bit base) vs project --dense-base yes vs plain HF (with and without
#      checkpointing) vs project --no-liger, same records: where the 8,192-token gap to plain HF comes from.
# PROFILE=a,b (default: default; empty: none) picks the profiled variants; STEPS / WARMUP (8 / 3) the steps per variant and
# the first ones left out of the timing (the project's variants; the plain-HF ones time one whole length-grouped megabatch,
# BASELINE_WINDOW=steps: the same steps as the others, issue 12's protocol); VARIANT_RUNS=2 runs the project's variants
# in two alternating passes (A/B).
# STAGES=parity runs only step 2 (a second command, if device time is left). CPU_DRY_RUN=1: the same plumbing on the
# tiny model on the CPU (a few steps, no wheels, nothing timed that means anything).
set -u
out=${1:?usage: bash bench/gpu_train.sh OUT}
mkdir -p "$out"
deadline=$(($(date +%s) + ${DEADLINE_S:-530}))
stages=${STAGES:-speed,parity}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -z "${CPU_DRY_RUN:-}" ]; then
  [ -n "${WHEELS_INSTALLED:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
  tok=.tok/llama2-tokenizer
  [ -f "$tok/tokenizer.model" ] || tok=../shared/llama2-tokenizer
  [ -f "$tok/tokenizer.model" ] || { echo "[gpu_train] no Llama 2 tokenizer: cp -r ../shared/llama2-tokenizer .tok/ first"; exit 1; }
  model=/tmp/l7
  [ -f "$model/config.json" ] || python bench/make_random_llama.py --out "$model" --tokenizer "$tok" > "$out/make_model.log" 2>&1 \
    || { tail -20 "$out/make_model.log"; exit 1; }
  nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv > "$out/gpu.csv"
  variants=${VARIANTS:-hf_tuned,default,hf_tuned_nogc,default_4bit,default_cap24,dense_nogc_2048,varlen_nogc_2048,compiled_cudagraphs,compiled_16k,baseline}
  speed=(--steps "${STEPS:-8}" --warmup "${WARMUP:-3}" --records 3000)
  parity=(--steps 20 --records 1500 --pack-tokens 8192 --no-gc --sides project,project_dense,hf,hf_nogc,project_noliger)
else
  model=$(python -c "from tiny_llama import ensure_tiny_llama; print(ensure_tiny_llama())")
  variants=${VARIANTS:-hf_tuned,default,default_cap24,nogc_2048}
  speed=(--steps 3 --warmup 1 --records 150 --profile-steps-n 1)
  parity=(--steps 3 --records 100 --sides project,hf)
fi
echo "[gpu_train] model $model, stages $stages, $((deadline - $(date +%s))) s left"
if [[ $stages == *speed* ]]; then
  python bench/train_speed.py --model "$model" --out "$out/train_speed.json" "${speed[@]}" --variants "$variants" \
    --profile "${PROFILE-default}" --variant-runs "${VARIANT_RUNS:-1}" \
    --baseline-window "${BASELINE_WINDOW:-megabatch}" --deadline "$deadline" 2>&1 | tee "$out/train_speed.log"
fi
left=$((deadline - $(date +%s)))
if [[ $stages == *parity* ]] && { [ $left -gt 240 ] || [ -n "${CPU_DRY_RUN:-}" ] || [[ $stages != *speed* ]]; }; then
  python bench/loss_parity.py --model "$model" --out "$out/loss_parity.json" "${parity[@]}" 2>&1 | tee "$out/loss_parity.log"
else
  echo "[gpu_train] loss parity skipped ($left s left): run STAGES=parity bash bench/gpu_train.sh OUT"
fi
echo "[gpu_train] done: $(ls "$out" | tr '\n' ' ')"
