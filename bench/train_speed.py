"""Training speed and memory: plain Hugging Face QLoRA vs this project's path, side by side, one command.

    python bench/make_random_llama.py --out /tmp/l7 --tokenizer .tok/llama2-tokenizer
    python bench/train_speed.py --model /tmp/l7 --out $OUT/train_speed.json

Each variant runs in its own process (fresh CUDA memory stats; Liger patches stay out of the
baseline) on the same synthetic dolly-like records, tokenized with the model's (real Llama 2)
tokenizer and the project's template and label masking:

- baseline: plain transformers + peft + bitsandbytes as users commonly run it: 4-bit NF4 + double
  quant, bf16 compute, SDPA, LoRA r=16 alpha=32 dropout 0.05 on all linear layers, gradient
  checkpointing, per-device batch 4 padded to the longest record, no packing, default AdamW, Trainer.
- default: exactly what `python main.py` runs with its defaults (main.py's own functions).
- the others: main.py with the flags listed in VARIANTS.

Reported per variant: effective tokens/s (non-padding tokens), samples/s, seconds per optimizer
step, peak GPU memory, MFU (4 x parameters per token + attention, over 989 TFLOP/s bf16 dense on
an H100 SXM), and the projected wall time of 3 epochs of dolly-15k (3.45 M tokens per epoch).

Record lengths reproduce ../shared/dolly-lengths.md (157 real records, Llama 2 tokens): response
and context lengths are drawn from piecewise-linear quantile functions through the measured
percentiles, 28% of records carry a context; the script prints the resulting percentiles and the
padding share of random batches of 4, to compare with the measured 238/147/566 and 46%.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DOLLY_TOKENS_PER_EPOCH = 3.45e6  # ../shared/dolly-lengths.md, at a 1024-token cap
H100_BF16_FLOPS = 989e12
# Quantile points (probability, tokens) through ../shared/dolly-lengths.md's measured percentiles.
RESPONSE_Q = [(0.0, 1), (0.5, 46), (0.9, 201), (0.99, 646), (1.0, 1316)]
# Context given that a record has one (28% do): the overall p90/p99 sit at the conditional 64%/96%.
CONTEXT_Q = [(0.0, 20), (0.3, 120), (0.643, 366), (0.964, 864), (1.0, 1385)]
INSTRUCTION_Q = [(0.0, 3), (0.5, 13), (0.9, 40), (0.99, 120), (1.0, 300)]
WORDS = ("the of and to in is was for on that with as by at from his an were are which this be has also "
         "or had its first one their after new who they two her she been other when time during there into "
         "school more may years over only year most would world city some where between later made under "
         "state known team american such then national both well many team game season river music").split()
VARIANTS = {
    "baseline": None,
    "default": [],
    "default_noupcast": ["--no-fp32-upcast"],
    "default_dropout005": ["--lora-dropout", "0.05"],
    "default_sdpa": ["--attention", "sdpa"],
    "lowmem": ["--pack-tokens", "2048"],
    "fast80": ["--no-gradient-checkpointing", "--pack-tokens", "8192"],
    "fast80_noupcast": ["--no-gradient-checkpointing", "--pack-tokens", "8192", "--no-fp32-upcast"],
    "baseline_again": None,  # run twice: the spread between the two is the noise floor of this machine
}


def quantile(points: list[tuple[float, float]], u: float) -> int:
    for (p0, v0), (p1, v1) in zip(points, points[1:], strict=False):
        if u <= p1:
            return max(1, round(v0 + (v1 - v0) * (u - p0) / (p1 - p0)))
    return round(points[-1][1])


def text_of(tokens: int, rng: random.Random) -> str:
    # English words average ~1.3 Llama 2 tokens; the realised counts are measured and printed.
    return " ".join(rng.choice(WORDS) for _ in range(max(1, round(tokens / 1.3))))


def make_records(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        context = text_of(quantile(CONTEXT_Q, rng.random()), rng) if rng.random() < 0.28 else ""
        records.append({"instruction": text_of(quantile(INSTRUCTION_Q, rng.random()), rng) + "?", "context": context,
                        "response": text_of(quantile(RESPONSE_Q, rng.random()), rng) + ".", "category": "open_qa"})
    return records


def length_report(lengths: list[int], seed: int) -> dict[str, float]:
    import numpy as np

    arr = np.array(lengths)
    rng = random.Random(seed)
    order = lengths[:]
    rng.shuffle(order)
    batches = [order[i : i + 4] for i in range(0, len(order) - 3, 4)]
    real = sum(sum(b) for b in batches)
    padded = sum(max(b) * len(b) for b in batches)
    return {"mean": float(arr.mean()), "p50": float(np.percentile(arr, 50)), "p90": float(np.percentile(arr, 90)),
            "p99": float(np.percentile(arr, 99)), "max": int(arr.max()), "padding_share_batch4": 1 - real / padded}


class StepTimer:
    """Trainer callback: wall time and tokens at every optimizer step (CUDA synchronised)."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                import torch

                torch.cuda.synchronize()
                timer.marks.append((time.perf_counter(), state.num_input_tokens_seen, state.global_step))
                if state.log_history and "loss" in state.log_history[-1]:
                    timer.losses[state.global_step] = state.log_history[-1]["loss"]

        self.marks: list[tuple[float, int, int]] = []
        self.losses: dict[int, float] = {}
        self.callback = _CB()


def baseline_trainer(args, train_ds, tokenizer):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments

    from dataset import make_collator

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=bnb, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa", device_map={"": 0})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    targs = TrainingArguments(output_dir="/tmp/bench-baseline", per_device_train_batch_size=4, gradient_accumulation_steps=1,
                              gradient_checkpointing=True, bf16=True, max_steps=args.steps, learning_rate=2e-4,
                              logging_steps=1, save_strategy="no", report_to=[], include_num_input_tokens_seen="non_padding",
                              seed=args.seed, data_seed=args.seed, label_names=["labels"], disable_tqdm=True)
    return Trainer(model=model, args=targs, train_dataset=train_ds, data_collator=make_collator(tokenizer), processing_class=tokenizer)


def project_trainer(args, flags, data_path):
    import dataclasses

    from config import TrainConfig, parse_config
    from dataset import load_records
    from loading import load_for_training
    from main import prepare_data
    from training import build_trainer

    cfg, _ = parse_config(TrainConfig, ["--base-model", args.model, "--dataset", data_path, "--output-dir", "/tmp/bench-project",
                                        "--max-steps", str(args.steps), "--eval-steps", "0", "--save-steps", "100000",
                                        "--logging-steps", "1", "--val-fraction", "0", *flags], "bench")
    cfg = dataclasses.replace(cfg, seed=args.seed)
    model, tokenizer, _ = load_for_training(cfg)
    train_ds, val_ds, _ = prepare_data(cfg, load_records(data_path), tokenizer)
    trainer = build_trainer(cfg, model, tokenizer, train_ds, val_ds)
    trainer.args.report_to = []
    trainer.args.disable_tqdm = True
    return trainer, cfg


def profile_steps(trainer, steps: int = 2) -> None:
    """Where the time goes: the top CUDA kernels over a few more training steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    batches = iter(trainer.get_train_dataloader())
    model = trainer.model
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            batch = {k: v.to(model.device) for k, v in next(batches).items()}
            trainer.training_step(model, batch)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60), flush=True)


def run_variant(args) -> dict:
    import torch
    from transformers import set_seed

    from dataset import load_records, tokenize_records
    from loading import load_tokenizer

    set_seed(args.seed)
    data_path = args.data
    tokenizer = load_tokenizer(args.model)
    flags = VARIANTS[args.variant]
    args.profile = bool(args.profile)
    torch.cuda.reset_peak_memory_stats()
    if flags is None:
        train_ds, _ = tokenize_records(load_records(data_path), tokenizer, 1024)
        trainer = baseline_trainer(args, train_ds, tokenizer)
        records_per_step = 4
    else:
        trainer, cfg = project_trainer(args, flags, data_path)
        records_per_step = None
    timer = StepTimer()
    trainer.add_callback(timer.callback)
    trainer.train()
    if args.profile:
        profile_steps(trainer)
    (t0, tok0, s0), (t1, tok1, s1) = timer.marks[args.warmup - 1], timer.marks[-1]
    tokens_per_s = (tok1 - tok0) / (t1 - t0)
    n_params = 6.74e9
    flops_per_token = 4 * n_params + 12 * 32 * 4096 * args.mean_context  # + attention: fwd 4*L*d*ctx, x3 with input grads
    result = {
        "variant": args.variant, "flags": flags, "steps_timed": s1 - s0, "tokens_per_s": tokens_per_s,
        "seconds_per_step": (t1 - t0) / (s1 - s0), "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_gpu_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "mfu": tokens_per_s * flops_per_token / H100_BF16_FLOPS,
        "hours_3_epochs_dolly": 3 * DOLLY_TOKENS_PER_EPOCH / tokens_per_s / 3600,
        "tokens_per_step": (tok1 - tok0) / (s1 - s0), "losses": timer.losses,
    }
    if records_per_step:
        result["samples_per_s"] = records_per_step / result["seconds_per_step"]
    else:
        result["samples_per_s"] = tokens_per_s / args.mean_record
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Local Llama-2-7B directory (bench/make_random_llama.py).")
    parser.add_argument("--out", default="train_speed.json", help="JSON results.")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="Comma-separated subset of: " + ", ".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=12, help="Optimizer steps per variant.")
    parser.add_argument("--warmup", type=int, default=3, help="Steps excluded from timing.")
    parser.add_argument("--records", type=int, default=3000, help="Synthetic records.")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--profile", default="fast80_noupcast", help="Variant to profile (top CUDA kernels, printed); '' for none.")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--mean-context", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--mean-record", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from runtime import silence_harmless_logs

    silence_harmless_logs()  # before liger and bitsandbytes log their harmless start-up lines
    if args.variant:  # child process
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return
    from dataset import load_records, tokenize_records
    from loading import load_tokenizer

    records = make_records(args.records, args.seed)
    data = "/tmp/bench-dolly-like.jsonl"
    with open(data, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    tokenized, summary = tokenize_records(load_records(data), load_tokenizer(args.model), 1024)
    lengths = [len(x) for x in tokenized["input_ids"]]
    stats = length_report(lengths, args.seed)
    mean_context = sum(n * (n + 1) / 2 for n in lengths) / sum(lengths)  # mean attended keys per token (causal)
    print("[bench] record lengths (tokens): " + ", ".join(f"{k} {v:.3g}" for k, v in stats.items()), flush=True)
    results = {"length_stats": stats, "data_summary": summary, "versions": versions(), "variants": {}}
    for name in args.variants.split(","):
        cmd = [sys.executable, __file__, "--model", args.model, "--variant", name, "--data", data, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--seed", str(args.seed), "--mean-context", str(mean_context),
               "--mean-record", str(stats["mean"]), "--profile", "1" if name == args.profile else ""]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if name == args.profile:
            print(proc.stdout[proc.stdout.find("----"):proc.stdout.find("RESULT ")], flush=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"[bench] {name} failed:\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}", flush=True)
            continue
        results["variants"][name] = json.loads(line[7:])
        print_row(results["variants"][name], results["variants"].get("baseline"))
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=2)


def print_row(r: dict, base: dict | None) -> None:
    ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
    print(f"[bench] {r['variant']:<18} {r['tokens_per_s']:>8.0f} tok/s {ratio:>6}  {r['samples_per_s']:>6.1f} samples/s  "
          f"{r['seconds_per_step']:>6.2f} s/step  {r['peak_gpu_mem_gib']:>5.1f} GiB  MFU {r['mfu']:.1%}  "
          f"3 epochs {r['hours_3_epochs_dolly']:.2f} h", flush=True)


def versions() -> dict[str, str]:
    import torch

    from training import versions as library_versions  # the same record main.py writes into metrics.json

    out = library_versions() | {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    try:
        from importlib.metadata import version

        import liger_kernel  # noqa: F401

        out["liger_kernel"] = version("liger-kernel")
    except ImportError:
        pass
    return out


if __name__ == "__main__":
    main()
