#!/usr/bin/env bash
# Issue 13 decode-kernel measurements in ONE GPU command (~7 min on one H200), from the repository root, carrying .whl and .tok:
#   bash bench/gpu_decode.sh   (OUT set by the device tool): gpu tests of the kernels, bench/decode_attention.py at mean contexts
#   360 and 200 (the triton launch configs swept), then bench/generate_speed.py with the best config, flash vs triton engines.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site WHEELS_INSTALLED=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/gen; nvidia-smi --query-gpu=name --format=csv > $OUT/card.txt
(timeout 60 python3 bench/make_random_llama.py --out /tmp/l7 --tokenizer .tok/llama2-tokenizer > $OUT/make.log 2>&1) &
timeout 150 python3 -m pytest -q -m gpu tests/test_decode_kernel.py tests/test_model.py -k "kernel" > $OUT/pytest.log 2>&1
wait
timeout 100 python3 bench/decode_attention.py --mean-context 360 --kernels flash_varlen,sdpa_masked,triton --out $OUT/decode_attention_ctx360.json > $OUT/da.log 2>&1
timeout 40 python3 bench/decode_attention.py --mean-context 200 --kernels flash_varlen,triton --out $OUT/decode_attention_ctx200.json > $OUT/da200.log 2>&1
CFG=$(python3 -c "import json;print(','.join(json.load(open('$OUT/decode_attention_ctx360.json'))['cases']['204']['best_triton'].split('_')[1:]))" 2>/dev/null || echo dot,64,4,3); echo "cfg $CFG" | tee $OUT/cfg.txt
timeout 330 python3 bench/generate_speed.py --model /tmp/l7 --out $OUT/gen/generate_speed.json --engines flash,triton,compiled_flash,compiled_triton --decode-config $CFG --single-prompts 0 --naive-prompts 0 --old-prompts 0 --profile-prompts 128 --profile-engine compiled_triton --budget-s 300 > $OUT/gen.log 2>&1
python3 -c "import json; [print(f[-9:], r, {k: v.get('us') for k, v in c.items() if isinstance(v, dict)}) for f in ['$OUT/decode_attention_ctx360.json', '$OUT/decode_attention_ctx200.json'] for r, c in json.load(open(f))['cases'].items()]"
cd $OUT && tar czf results.tgz --remove-files gen *.log *.json; cd - >/dev/null; tar xzf $OUT/results.tgz -O --wildcards "*pytest.log" | tail -5; tar xzf $OUT/results.tgz -O --wildcards "*gen.log" | grep "\[bench\]" | tail -14
