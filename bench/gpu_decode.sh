#!/usr/bin/env bash
# Issue 13's decode measurements in ONE GPU command (~5-7 min on one H200), from the repository root, carrying .whl and .tok:
#   bash bench/gpu_decode.sh          (OUT set by the device tool)
# 1. gpu tests of the decode kernels and the static engines (tests/test_decode_kernel.py, tests/test_model.py -k TESTS);
# 2. unless KERNELS=0: bench/decode_attention.py at mean contexts 360 and 200 (FlashAttention's varlen kernel, SDPA,
#    decode_kernel's launch configs swept); the best config at 204 rows goes to step 3 (else CFG, default 64,4,3);
# 3. bench/generate_speed.py on a random Llama-2-7B: ENGINES (default flash,triton,compiled_flash,compiled_triton),
#    256 prompts x 256 forced tokens, then a profile of PROFILE_ENGINE (default compiled_triton) on PROFILE_PROMPTS x 64;
#    GEN_ARGS: more arguments for it (the last of a repeated one wins).
# Everything lands in OUT/results.tgz; a summary is printed.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site WHEELS_INSTALLED=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/gen; nvidia-smi --query-gpu=name --format=csv > $OUT/card.txt
(timeout 60 python3 bench/make_random_llama.py --out /tmp/l7 --tokenizer .tok/llama2-tokenizer > $OUT/make.log 2>&1) &
timeout 200 python3 -m pytest -q -m gpu tests/test_decode_kernel.py tests/test_model.py -k "${TESTS-kernel}" > $OUT/pytest.log 2>&1
wait
CFG=${CFG:-64,4,3}
if [ "${KERNELS:-1}" != 0 ]; then
timeout 100 python3 bench/decode_attention.py --mean-context 360 --kernels flash_varlen,sdpa_masked,triton --out $OUT/decode_attention_ctx360.json > $OUT/da.log 2>&1
timeout 40 python3 bench/decode_attention.py --mean-context 200 --kernels flash_varlen,triton --out $OUT/decode_attention_ctx200.json > $OUT/da200.log 2>&1
CFG=$(python3 -c "import json;print(','.join(json.load(open('$OUT/decode_attention_ctx360.json'))['cases']['204']['best_triton'].split('_')[1:]))" 2>/dev/null || echo $CFG)
python3 -c "import json; [print(f[-9:], r, {k: v.get('us') for k, v in c.items() if isinstance(v, dict)}) for f in ['$OUT/decode_attention_ctx360.json', '$OUT/decode_attention_ctx200.json'] for r, c in json.load(open(f))['cases'].items()]"
fi
echo "cfg $CFG" | tee $OUT/cfg.txt
timeout ${GEN_TIMEOUT:-330} python3 bench/generate_speed.py --model /tmp/l7 --out $OUT/gen/generate_speed.json --engines ${ENGINES:-flash,triton,compiled_flash,compiled_triton} --decode-config $CFG --single-prompts 0 --naive-prompts 0 --old-prompts 0 --profile-prompts ${PROFILE_PROMPTS:-128} --profile-engine ${PROFILE_ENGINE:-compiled_triton} --budget-s ${BUDGET_S:-300} ${GEN_ARGS:-} > $OUT/gen.log 2>&1
cd $OUT && tar czf results.tgz --remove-files gen *.log $(ls *.json 2>/dev/null); cd - >/dev/null
tar xzf $OUT/results.tgz -O --wildcards "*pytest.log" | tail -5; tar xzf $OUT/results.tgz -O --wildcards "*gen.log" | grep -E "\[bench\]|FAILED|Error" | tail -16
