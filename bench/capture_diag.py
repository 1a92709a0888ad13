"""Why does a static-decode warm-up cost ~0.8 s for each new attention window? (GPU diagnostic, 2-layer 7B-width Llama.)

    python bench/capture_diag.py --tokenizer .tok/llama2-tokenizer
"""

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import generation

p = argparse.ArgumentParser()
p.add_argument("--tokenizer", required=True)
args = p.parse_args()
cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, num_hidden_layers=2,
                  vocab_size=32000, attn_implementation="sdpa")
model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
tok = AutoTokenizer.from_pretrained(args.tokenizer)
tok.pad_token = tok.unk_token
tok.padding_side = "left"
prompts = [("word " * (20 + 7 * i)).strip() for i in range(64)]
batch = tok(prompts, return_tensors="pt", padding=True).to("cuda")
for ws in (0, 64, 64, 16):
    stats = {}
    torch.cuda.synchronize()
    t = time.perf_counter()
    generation.decode_static(model, tok, batch, [], max_new_tokens=256, min_new_tokens=256, window_step=ws, stats=stats)
    torch.cuda.synchronize()
    print(f"window_step {ws}: {time.perf_counter() - t:.2f} s", {k: round(v, 3) for k, v in stats.items()}, flush=True)
prof = cProfile.Profile()
prof.enable()
generation.decode_static(model, tok, batch, [], max_new_tokens=256, min_new_tokens=256, window_step=32, stats={})
torch.cuda.synchronize()
prof.disable()
s = io.StringIO()
pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
print(s.getvalue()[:6000])
