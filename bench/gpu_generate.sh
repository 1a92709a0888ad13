#!/usr/bin/env bash
# Generation figures for BENCHMARKS.md on one GPU, from the repository root, one command (about 8 minutes on an H100):
#
#   bash bench/gpu_generate.sh OUT
#
# Carry .whl (../shared/gpu/fetch-wheels.sh) and .tok (cp -r ../shared/llama2-tokenizer .tok/). Installs the carried
# wheels, writes a random-weight Llama-2-7B to /tmp, and runs bench/generate_speed.py: JSON in OUT/generate_speed.json
# (rewritten after each variant), the log in OUT/generate_speed.log.
set -u
out=${1:?usage: bash bench/gpu_generate.sh OUT}
mkdir -p "$out"
[ -n "${WHEELS_INSTALLED:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ -d /tmp/l7 ] || python3 bench/make_random_llama.py --out /tmp/l7 --tokenizer .tok/llama2-tokenizer 2>&1 | tee "$out/make_random_llama.log"
python3 bench/generate_speed.py --model /tmp/l7 --out "$out/generate_speed.json" ${BENCH_ARGS:-} 2>&1 | tee "$out/generate_speed.log"
nvidia-smi --query-gpu=name,memory.total --format=csv >> "$out/generate_speed.log" 2>&1
