"""Generation speed: one-at-a-time vs naive batching vs eval.py's path, side by side, one command.

    python bench/make_random_llama.py --out /tmp/l7 --tokenizer .tok/llama2-tokenizer
    python bench/generate_speed.py --model /tmp/l7 --out $OUT/generate_speed.json

The model is loaded through the project's path (4-bit NF4) with a LoRA adapter of r=16 on all
linear layers whose B matrices are random and non-zero, so the adapter changes the outputs.
Prompts are dolly-like (bench/train_speed.py's length model, real Llama 2 tokenizer). Every
variant produces exactly --new-tokens tokens per prompt: min_new_tokens = max_new_tokens, so EOS
cannot end a sequence early and all variants do the same work.

Variants:
- one_at_a_time: the seed's way, `generate` on one prompt at a time (timed on --single-prompts
  prompts and reported per token, since all 256 would take hours at batch 1);
- naive16: batches of 16 in input order, left-padded;
- eval_path: `Llama.generate` as eval.py calls it (length-sorted batches of --batch-size).
Reported: wall time, new tokens/s, time to first token (the first batch's prefill + one token),
peak GPU memory, and the share of greedy answers equal to one_at_a_time's on the shared prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def build_llama(model_path: str, quantization: str, seed: int):
    import torch
    from peft import LoraConfig, get_peft_model

    from config import LLAMA_LINEAR_LAYERS
    from model import Llama, load_base_model, load_tokenizer

    torch.manual_seed(seed)
    base = load_base_model(model_path, quantization)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=LLAMA_LINEAR_LAYERS, task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    return Llama(model, load_tokenizer(model_path))


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(llama, prompts: list[str], batch_size: int, sort: bool, new_tokens: int) -> dict:
    """Generate for `prompts`; sorted = eval.py's path (Llama.generate), else input-order batches."""
    gen = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    synchronize()
    t0 = time.perf_counter()
    first = llama._generate(prompts[:batch_size], True, max_new_tokens=1)
    synchronize()
    ttft = time.perf_counter() - t0
    del first
    t0 = time.perf_counter()
    if sort:
        answers = [g["answer"] for g in llama.generate(prompts, batch_size, True, **gen)]
    else:
        answers = [g["answer"] for s in range(0, len(prompts), batch_size) for g in llama._generate(prompts[s : s + batch_size], True, **gen)]
    synchronize()
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "new_tokens": len(prompts) * new_tokens, "tokens_per_s": len(prompts) * new_tokens / wall,
            "ttft_s": ttft, "answers": answers}


def main() -> None:
    import torch
    from train_speed import make_records

    from dataset import create_question

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Local model directory (bench/make_random_llama.py for Llama-2-7B).")
    parser.add_argument("--out", default="generate_speed.json", help="JSON results.")
    parser.add_argument("--prompts", type=int, default=256, help="Dolly-like prompts.")
    parser.add_argument("--new-tokens", type=int, default=256, help="Tokens generated per prompt (forced: no early EOS).")
    parser.add_argument("--batch-size", type=int, default=64, help="eval.py path's batch size.")
    parser.add_argument("--single-prompts", type=int, default=4, help="Prompts timed one at a time.")
    parser.add_argument("--quantization", default="4bit", choices=["4bit", "8bit", "none"])
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    prompts = [create_question(r) for r in make_records(args.prompts, args.seed)]
    rng.shuffle(prompts)
    llama = build_llama(args.model, args.quantization, args.seed)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    results = {"one_at_a_time": timed(llama, prompts[: args.single_prompts], 1, False, args.new_tokens),
               "naive16": timed(llama, prompts, 16, False, args.new_tokens),
               "eval_path": timed(llama, prompts, args.batch_size, True, args.new_tokens)}
    reference = results["one_at_a_time"]["answers"]
    base = results["one_at_a_time"]["tokens_per_s"]
    for name, r in results.items():
        same = sum(a == b for a, b in zip(r["answers"], reference, strict=False)) / len(reference)
        r.update(speedup=r["tokens_per_s"] / base, same_as_one_at_a_time=same)
        print(f"[bench] {name:<14} {r['tokens_per_s']:>9.1f} new tok/s {r['speedup']:>7.1f}x  wall {r['wall_s']:.1f} s  "
              f"TTFT {r['ttft_s']:.2f} s  same answers {same:.0%}", flush=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    with open(args.out, "w") as fh:
        json.dump({"args": vars(args), "peak_gpu_mem_gib": peak,
                   "variants": {k: {kk: vv for kk, vv in v.items() if kk != "answers"} for k, v in results.items()}}, fh, indent=2)


if __name__ == "__main__":
    main()
