"""Generation speed: one-at-a-time vs naive batching vs eval.py's path, side by side, one command.

    python bench/make_random_llama.py --out /tmp/l7 --tokenizer .tok/llama2-tokenizer
    python bench/generate_speed.py --model /tmp/l7 --out $OUT/generate_speed.json

The model is loaded once through the project's path (4-bit NF4) with a LoRA adapter of r=16 on
all linear layers whose B matrices are random and non-zero, so the adapter changes the outputs.
Prompts are dolly-like (bench/train_speed.py's length model of ../shared/dolly-lengths.md, real
Llama 2 tokenizer). Every variant produces exactly --new-tokens tokens per prompt (min_new_tokens
= max_new_tokens: EOS cannot end a sequence early), greedy, so all variants do the same work.

Variants, in this order on the same weights:
- one_at_a_time: the seed's way, `generate` on one prompt at a time on 4-bit + unmerged LoRA
  (timed on the first --single-prompts prompts, reported per token: all 256 would take an hour);
- naive16: batches of 16 in input order, left-padded, 4-bit (timed on the first --naive-prompts);
- eval_tuned / eval_base: what eval.py does by default, for the adapter's and the base's answers:
  `Llama.generate` with eval.py's default batch size (64), longest prompts first, on the 16-bit
  copy of the 4-bit weights (dequantize="auto"), all --prompts prompts;
- merged (not used by eval.py; measured to decide whether it should be): the LoRA update added
  into the 16-bit weights, generated with the LoRA branch off.
Reported per variant: wall time, new tokens/s, time to first token (a batch's prefill plus one
token), peak GPU memory; greedy answers of the fast paths compared with the plain 4-bit path's on
every prompt both produced, and last-position logits compared on --logit-prompts prompts.
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


def build_llama(model_path: str, seed: int, gguf_file: str | None = None):
    import torch
    from peft import LoraConfig, get_peft_model

    from config import LLAMA_LINEAR_LAYERS
    from hub import resolve_base_model
    from loading import load_base_model, load_tokenizer
    from model import Llama

    torch.manual_seed(seed)
    model_path = resolve_base_model(model_path, gguf_file)
    base = load_base_model(model_path, "4bit")
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=LLAMA_LINEAR_LAYERS, task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    return Llama(model, load_tokenizer(model_path), dequantize="no")


def merge_lora(model) -> int:
    """W += (alpha / r) * B @ A in every LoRA layer (computed in fp32, stored in the weight's dtype)."""
    import torch

    merged = 0
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                weight = module.get_base_layer().weight
                delta = module.lora_B["default"].weight.float() @ module.lora_A["default"].weight.float()
                weight.copy_((weight.float() + module.scaling["default"] * delta).to(weight.dtype))
                merged += 1
    return merged


def gpu_sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(llama, prompts: list[str], batch_size: int, sorted_path: bool, new_tokens: int, use_adapter: bool = True) -> dict:
    """Generate for `prompts`: sorted_path = eval.py's `Llama.generate`, else plain input-order batches."""
    import torch

    gen = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    llama.dequantize_if_allowed()  # a one-time conversion is not part of the timed generation (reported separately)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    gpu_sync()
    t0 = time.perf_counter()
    llama._generate(prompts[:batch_size], use_adapter, max_new_tokens=1)
    gpu_sync()
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    if sorted_path:
        answers = [g["answer"] for g in llama.generate(prompts, batch_size, use_adapter, **gen)]
    else:
        answers = [
            g["answer"]
            for s in range(0, len(prompts), batch_size)
            for g in llama._generate(prompts[s : s + batch_size], use_adapter, **gen)
        ]
    gpu_sync()
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    tokens = len(prompts) * new_tokens
    result = {"prompts": len(prompts), "batch_size": batch_size, "wall_s": wall, "new_tokens": tokens, "tokens_per_s": tokens / wall,
              "ttft_s": ttft, "peak_gpu_mem_gib": peak, "answers": answers}
    print(f"[bench] {len(prompts)} prompts at batch {batch_size}: {tokens / wall:.1f} new tok/s, wall {wall:.1f} s", flush=True)
    return result


def last_logits(llama, prompts: list[str], use_adapter: bool = True):
    import torch

    llama.tokenizer.padding_side = "left"
    batch = llama.tokenizer(prompts, return_tensors="pt", padding=True).to(llama.model.device)
    with torch.inference_mode(), llama.adapter(use_adapter):
        return llama.model(**batch).logits[:, -1].float().cpu()


def same_share(answers: list[str], reference: list[str]) -> float:
    n = min(len(answers), len(reference))
    return sum(a == b for a, b in zip(answers[:n], reference[:n], strict=True)) / n


def logit_agreement(a, b) -> dict:
    return {"max_abs_diff": float((a - b).abs().max()), "max_abs_logit": float(b.abs().max()),
            "argmax_equal": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


def main() -> None:
    import torch
    from train_speed import make_records, versions

    from runtime import silence_harmless_logs

    silence_harmless_logs()  # before bitsandbytes logs its harmless start-up line

    from config import EvalConfig
    from dataset import create_question
    from generation import dequantized_bytes
    from model import Llama

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Local model directory (bench/make_random_llama.py for Llama-2-7B).")
    parser.add_argument("--out", default="generate_speed.json", help="JSON results.")
    parser.add_argument("--prompts", type=int, default=256, help="Dolly-like prompts for eval.py's path.")
    parser.add_argument("--new-tokens", type=int, default=256, help="Tokens generated per prompt (forced: no early EOS).")
    parser.add_argument("--batch-size", type=int, default=EvalConfig.batch_size, help="eval.py path's batch size (eval.py's default).")
    parser.add_argument("--single-prompts", type=int, default=4, help="Prompts timed one at a time (the first N).")
    parser.add_argument("--naive-prompts", type=int, default=64, help="Prompts timed in naive batches of 16 (the first N).")
    parser.add_argument("--logit-prompts", type=int, default=16, help="Prompts whose last-position logits are compared across paths.")
    parser.add_argument(
        "--gguf-file", default=None, help="GGUF file inside --model (e.g. the demo's SmolLM2 on a CPU: a real model, real answers)."
    )
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    prompts = [create_question(r) for r in make_records(args.prompts, args.seed)]
    rng.shuffle(prompts)
    llama = build_llama(args.model, args.seed, args.gguf_file)
    lengths = sorted(len(ids) for ids in llama.tokenizer(prompts)["input_ids"])
    print(f"[bench] {len(prompts)} prompts, tokens p50 {lengths[len(lengths) // 2]} p90 {lengths[int(0.9 * len(lengths))]} "
          f"max {lengths[-1]}", flush=True)
    probe = prompts[: args.logit_prompts]
    logits = {"4bit": last_logits(llama, probe)}
    results: dict[str, dict] = {}

    def partial(name: str, result: dict) -> None:  # written after every variant: a run cut short keeps what it measured
        results[name] = result
        with open(args.out, "w") as fh:
            variants = {k: {kk: vv for kk, vv in v.items() if kk != "answers"} for k, v in results.items()}
            json.dump({"partial": True, "variants": variants}, fh, indent=2)

    partial("one_at_a_time", timed(llama, prompts[: args.single_prompts], 1, False, args.new_tokens))
    partial("naive16", timed(llama, prompts[: args.naive_prompts], 16, False, args.new_tokens))
    extra_gib = dequantized_bytes(llama.model) / 2**30
    # The same weights, now as eval.py uses them on a GPU (dequantize="auto"; forced on a CPU, where auto never converts).
    llama = Llama(llama.model, llama.tokenizer, dequantize="auto" if torch.cuda.is_available() else "yes")
    t0 = time.perf_counter()
    llama.dequantize_if_allowed()
    gpu_sync()
    dequantize_s = time.perf_counter() - t0
    logits["16bit"] = last_logits(llama, probe)
    partial("eval_tuned", timed(llama, prompts, args.batch_size, True, args.new_tokens))
    partial("eval_base", timed(llama, prompts, args.batch_size, True, args.new_tokens, use_adapter=False))
    merge_lora(llama.model)
    with llama.model.disable_adapter():
        logits["merged"] = last_logits(llama, probe)
        partial("merged", timed(llama, prompts, args.batch_size, True, args.new_tokens))

    plain = results["naive16"]["answers"]
    one = results["one_at_a_time"]["answers"]
    base_rate = results["one_at_a_time"]["tokens_per_s"]
    for name, r in results.items():
        r.update(
            speedup_vs_one_at_a_time=r["tokens_per_s"] / base_rate,
            speedup_vs_naive16=r["tokens_per_s"] / results["naive16"]["tokens_per_s"],
        )
        if name != "eval_base":
            r.update(same_as_naive16=same_share(r["answers"], plain), same_as_one_at_a_time=same_share(r["answers"], one))
    results["merged"]["same_as_eval_tuned"] = same_share(results["merged"]["answers"], results["eval_tuned"]["answers"])
    for name, r in results.items():
        same = f"same as naive16 {r['same_as_naive16']:.0%} (n={min(r['prompts'], len(plain))})" if "same_as_naive16" in r else ""
        print(f"[bench] {name:<14} {r['tokens_per_s']:>9.1f} new tok/s  {r['speedup_vs_one_at_a_time']:>6.1f}x one-at-a-time  "
              f"{r['speedup_vs_naive16']:>5.2f}x naive16  wall {r['wall_s']:.1f} s  TTFT {r['ttft_s']:.2f} s  "
              f"peak {r['peak_gpu_mem_gib'] or 0:.1f} GiB  {same}", flush=True)
    agreement = {
        "16bit_vs_4bit": logit_agreement(logits["16bit"], logits["4bit"]),
        "merged_vs_16bit": logit_agreement(logits["merged"], logits["16bit"]),
    }
    print(f"[bench] logits: {json.dumps(agreement)}; dequantizing took {dequantize_s:.1f} s (+{extra_gib:.1f} GiB)", flush=True)
    with open(args.out, "w") as fh:
        json.dump({"args": vars(args), "versions": versions(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                   "prompt_tokens": {"p50": lengths[len(lengths) // 2], "p90": lengths[int(0.9 * len(lengths))], "max": lengths[-1]},
                   "dequantize_s": dequantize_s, "dequantized_extra_gib": extra_gib, "logits": agreement,
                   "variants": {k: {kk: vv for kk, vv in v.items() if kk != "answers"} for k, v in results.items()}}, fh, indent=2)


if __name__ == "__main__":
    main()
