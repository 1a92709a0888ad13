"""Training speed and memory: plain Hugging Face QLoRA vs this project's path, side by side, one command.

    python bench/make_random_llama.py --out /tmp/l7 --tokenizer .tok/llama2-tokenizer
    python bench/train_speed.py --model /tmp/l7 --out $OUT/train_speed.json

Each variant runs in its own process (fresh CUDA memory stats; Liger patches stay out of the
baseline) on the same synthetic dolly-like records, tokenized with the model's (real Llama 2)
tokenizer and the project's template and label masking. VARIANTS lists them: plain Hugging Face as
commonly run (`baseline`), well tuned (`hf_tuned`, `hf_tuned_nogc`: issue 12's exact settings), and
main.py itself with flags (`default` = `python main.py`, its memory plan, `--compile auto` and `--dense-base auto`
included; `default_4bit` = the same without the 16-bit copy of the base (the default before session 6); `eager` =
the same with `--compile off`; `default_cap24`/`_cap40` under a per-process memory cap, acting as a 24 / 40 GB card).

Timing (from session 6): every variant logs every --logging-steps (10, main.py's default) and the GPU is synchronized only at
the ends of the timed window, as in a real run; sessions 1-5 logged and synchronized at every step (--logging-steps 1
--sync-every-step), which leaves the GPU idle while the host prepares each next step. Per-step losses: loss_parity.py.
From session 16 the plain-HF variants that group records by length time one whole length-grouped megabatch (their
second: --baseline-window megabatch, megabatch_window), a random sample of the records; the first steps, issue 12's
window, hold only the longest batches, on which the baseline runs fastest per token.

Reported per variant: tokens/s (non-padding tokens) and its ratio to baseline, hf_tuned and
hf_tuned_nogc; seconds and tokens per optimizer step and per micro-batch; peak GPU memory; MFU
(4 x parameters per token + attention, over 989 TFLOP/s bf16 dense on an H100 SXM); the plan main.py
chose; compile report (--compile). `fixed_overhead` fits seconds per micro-batch = overhead + c x tokens
from two budgets of one setting. `--profile NAME` profiles 3 steps after NAME's timed ones (trace.json.gz,
summary.json in OUT's folder, bench/profile_steps.py).

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
VARIANTS = {  # name -> main.py flags, or the plain Hugging Face setup it runs
    "baseline": "hf_common",  # plain HF as commonly run
    "hf_tuned": "hf_tuned",  # plain HF, well tuned (issue 12): batch 16, GC, group_by_length, Liger
    "hf_tuned_nogc": "hf_tuned_nogc",  # the same without GC, batch 8
    "default": [],  # python main.py: --memory-plan auto, --compile auto (on: one GPU, no checkpointing)
    "eager": ["--compile", "off"],  # python main.py before --compile auto became the default: the plan, eager layers
    "default_foreach": ["--optimizer", "adamw_torch"],  # python main.py before AdamW fused became its default (session 4)
    "varlen": ["--attention", "varlen"],  # PyTorch's varlen FlashAttention: --attention auto's choice since session 5
    "flex": ["--attention", "flex_attention"],  # the default before session 5: flex attention's block-sparse mask
    "flex_eager": ["--attention", "flex_attention", "--compile", "off"],
    "varlen_eager": ["--attention", "varlen", "--compile", "off"],
    "varlen_cap24": ["--attention", "varlen"],  # varlen under a 24 GiB cap
    "varlen_nogc_2048": ["--attention", "varlen", "--memory-plan", "off", "--no-gradient-checkpointing", "--pack-tokens", "2048"],
    # packed rows by first fit over 4 open rows (--pack-open-rows 4): against default (greedy: rows not padded). Under the
    # 24 GiB cap the plan pads every row to the budget, where auto has taken first fit since session 16: cap24_greedy is the old
    "default_firstfit": ["--pack-open-rows", "4"],
    "cap24_firstfit": ["--pack-open-rows", "4"],
    "cap24_greedy": ["--pack-open-rows", "1"],
    "default_dense": ["--dense-base", "yes"],  # python main.py before session 11: the 16-bit copy, no FP8 input gradients
    "default_4bit": ["--dense-base", "no"],  # python main.py before session 6: the plan without the 16-bit copy of the base
    "dense_nogc_2048": ["--attention", "varlen", "--memory-plan", "off", "--no-gradient-checkpointing", "--pack-tokens", "2048",
                        "--dense-base", "yes"],  # with default: the fixed overhead with the 16-bit copy (varlen_nogc_2048: without)
    "default_cap24": [],  # the same under a 24 GiB cap (CAPS): a 24 GB card
    "default_cap40": [],  # a 40 GB card
    "default_4096": ["--tokens-per-step", "4096"],  # the recipe before issue 12, planned
    "compiled": ["--compile", "on"],
    "compiled_padded": ["--compile", "on", "--pad-to-budget"],
    "compiled_cudagraphs": ["--compile", "on", "--pad-to-budget", "--compile-mode", "reduce-overhead"],
    "compiled_cap24": ["--compile", "on"],
    # the 24 GB plan with Inductor's autotuning of the products it sees (LoRA's, FP8's _scaled_mm) beside its CUDA graphs
    "compiled_autotune_cap24": ["--compile-mode", "max-autotune"],
    # with compiled_cudagraphs: the fixed overhead per micro-batch with CUDA graphs (dense_nogc_2048: without)
    "cudagraphs_nogc_2048": ["--compile", "on", "--pad-to-budget", "--compile-mode", "reduce-overhead", "--memory-plan", "off",
                             "--no-gradient-checkpointing", "--pack-tokens", "2048", "--dense-base", "yes"],
    # the same recipe doubled (16,384 tokens per optimizer step, one micro-batch): what a bigger micro-batch buys, not the default
    "compiled_16k": ["--compile", "on", "--memory-plan", "off", "--no-gradient-checkpointing", "--pack-tokens", "16384",
                     "--tokens-per-step", "16384"],
    # CUDA graphs with two micro-batches per step (session 7: 13-19 s per step, re-recorded at every step; session 8: one
    # generation per micro-batch and zeroed gradients, compile_layers.CompileWatch): under a 24 / 40 GiB cap, and uncapped
    "cudagraphs_cap24": ["--compile", "on", "--pad-to-budget", "--compile-mode", "reduce-overhead"],
    "cudagraphs_cap40": ["--compile", "on", "--pad-to-budget", "--compile-mode", "reduce-overhead"],
    "padded_cap24": ["--compile", "on", "--pad-to-budget"],  # with cudagraphs_cap24: what the padding alone costs
    "cudagraphs_accum2": ["--compile", "on", "--pad-to-budget", "--compile-mode", "reduce-overhead", "--memory-plan", "off",
                          "--no-gradient-checkpointing", "--pack-tokens", "4096", "--tokens-per-step", "8192", "--dense-base", "yes"],
    "dense_accum2": ["--memory-plan", "off", "--no-gradient-checkpointing", "--pack-tokens", "4096", "--tokens-per-step", "8192",
                     "--dense-base", "yes"],
    # the doubled recipe with the 16-bit copy of the base: the best setting's MFU (compiled_16k: the 4-bit base)
    "dense_16k": ["--memory-plan", "off", "--no-gradient-checkpointing", "--pack-tokens", "16384", "--tokens-per-step", "16384",
                  "--dense-base", "yes"],
    # --dense-base fp8 (session 9): the base's matmuls in FP8 (fp8.py); uncapped it keeps default's plan (8,192 x 1, no GC);
    # under a 24 GiB cap the plan takes checkpointing with one 8,192-token micro-batch (the copy leaves no room without)
    "fp8": ["--dense-base", "fp8"],
    "fp8_cap24": ["--dense-base", "fp8"],
    "fp8_cap24_compiled": ["--dense-base", "fp8", "--compile", "on"],
    "fp8_cap40": ["--dense-base", "fp8"],
    "fp8_16k": ["--memory-plan", "off", "--no-gradient-checkpointing", "--pack-tokens", "16384", "--tokens-per-step", "16384",
                "--dense-base", "fp8"],
    # CUDA graphs over fp8's step (session 9's profile: the GPU idle 0.029 of its 0.333 s)
    "fp8_cudagraphs": ["--dense-base", "fp8", "--compile", "on", "--pad-to-budget", "--compile-mode", "reduce-overhead"],
    "fp8_cudagraphs_cap24": ["--dense-base", "fp8", "--compile", "on", "--pad-to-budget", "--compile-mode", "reduce-overhead"],
    "fp8_nogc_2048": ["--memory-plan", "off", "--no-gradient-checkpointing", "--pack-tokens", "2048", "--dense-base", "fp8"],
    # --dense-base fp8_backward (session 11): the forward exact (16-bit copy), only the input gradients in FP8
    "fp8_backward": ["--dense-base", "fp8_backward"],
    "fp8_backward_cap40": ["--dense-base", "fp8_backward"],
    "fp8_backward_nogc_2048": ["--memory-plan", "off", "--no-gradient-checkpointing", "--pack-tokens", "2048", "--dense-base",
                               "fp8_backward"],
    # --dense-base fp8_backward_4bit (sessions 12-13): no copy, FP8 input gradients from the 4-bit base, W^T cast by
    # nf4_kernel in each backward; with CUDA graphs (the variant below) the 24 GiB plan on Hopper since session 13
    # (default_cap24); nf4_cap24 is the 4-bit base alone (default_cap24 until then), nf4 / fp8_backward_4bit the two uncapped
    "fp8_backward_4bit": ["--dense-base", "fp8_backward_4bit"],
    "nf4": ["--dense-base", "no"],
    "nf4_cap24": ["--dense-base", "no"],
    # the same under CUDA graphs: is the 24 GiB step bound by the host once the FP8 products shorten the GPU's part?
    "fp8_backward_4bit_cudagraphs_cap24": ["--dense-base", "fp8_backward_4bit", "--compile", "on", "--pad-to-budget",
                                           "--compile-mode", "reduce-overhead"],
    # CUDA graphs over fp8_backward (session 12): at 8,192 against default, and at 2,048 for the fixed overhead with graphs
    "fp8_backward_cudagraphs": ["--dense-base", "fp8_backward", "--compile", "on", "--pad-to-budget", "--compile-mode",
                                "reduce-overhead"],
    "fp8_backward_cudagraphs_2048": ["--dense-base", "fp8_backward", "--compile", "on", "--pad-to-budget", "--compile-mode",
                                     "reduce-overhead", "--memory-plan", "off", "--no-gradient-checkpointing", "--pack-tokens", "2048"],
    "compiled_nogc_2048": ["--compile", "on", "--memory-plan", "off", "--no-gradient-checkpointing", "--pack-tokens", "2048"],
    "nogc_2048": ["--memory-plan", "off", "--no-gradient-checkpointing", "--pack-tokens", "2048"],
    "nogc_4096": ["--memory-plan", "off", "--no-gradient-checkpointing", "--pack-tokens", "4096"],
    "nogc_8192": ["--memory-plan", "off", "--no-gradient-checkpointing", "--pack-tokens", "8192"],
    "gc_4096": ["--memory-plan", "off", "--pack-tokens", "4096"],  # python main.py before issue 12
    "baseline_again": "hf_common",  # run twice: the spread between the two is the noise floor of this machine
}
# GiB: torch.cuda.set_per_process_memory_fraction
CAPS = {"default_cap24": 24, "default_cap40": 40, "compiled_cap24": 24, "varlen_cap24": 24, "cudagraphs_cap24": 24,
        "cudagraphs_cap40": 40, "padded_cap24": 24, "fp8_cap24": 24, "fp8_cap24_compiled": 24, "fp8_cap40": 40,
        "fp8_cudagraphs_cap24": 24, "fp8_backward_cap40": 40, "cap24_firstfit": 24, "nf4_cap24": 24,
        "fp8_backward_4bit_cudagraphs_cap24": 24, "compiled_autotune_cap24": 24, "cap24_greedy": 24}
REFERENCES = ("baseline", "hf_tuned", "hf_tuned_nogc")  # every row's tokens/s is given as a ratio to each of these


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


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class StepTimer:
    """Trainer callback: wall time and tokens at every optimizer step. The device is synchronized only at the steps in
    `sync_at` (the two ends of the timed window), as a run that logs every --logging-steps steps never waits for it in
    between; sync_at None: at every step (the method of sessions 1-5, which exposes the host's per-step work)."""

    def __init__(self, sync_at: set[int] | None = None):
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                import torch

                if cuda() and (sync_at is None or state.global_step in sync_at):
                    torch.cuda.synchronize()
                timer.marks.append((time.perf_counter(), state.num_input_tokens_seen, state.global_step))
                if state.log_history and "loss" in state.log_history[-1] and state.log_history[-1].get("step") == state.global_step:
                    timer.losses[state.global_step] = state.log_history[-1]["loss"]

        self.marks: list[tuple[float, int, int]] = []
        self.losses: dict[int, float] = {}
        self.callback = _CB()


HF_SETUPS = {  # batch, gradient checkpointing, LoRA dropout, prepare_model_for_kbit_training, sampling, Liger
    "hf_common": dict(batch=4, gc=True, dropout=0.05, kbit=True, sampling="random", liger=False),
    "hf_tuned": dict(batch=16, gc=True, dropout=0.0, kbit=False, sampling="group_by_length", liger=True),
    "hf_tuned_nogc": dict(batch=8, gc=False, dropout=0.0, kbit=False, sampling="group_by_length", liger=True),
}


def megabatch_window(records: int, batch: int) -> tuple[int, int]:
    """(warmup, steps) that time exactly the second length-grouped megabatch of a plain-HF run (--baseline-window megabatch).

    transformers' group_by_length sampler cuts a random order into megabatches of min(records // (4 x batch), 50) batches
    and sorts each longest first (the longest record of all swapped to the very front). So issue 12's window, steps 4-8,
    times the 4th-8th longest batches of the first megabatch: 8,328 tokens per step at batch 16 on the bench's records,
    against 3,718 for the mean batch (16 x 232). Long batches run faster per token, so that window flatters the baseline.
    A whole megabatch is a random sample of the records: its tokens/s is what a run of the epoch gets.
    """
    mult = max(1, min(records // (batch * 4), 50))
    return mult, 2 * mult


def hf_trainer(args, setup: str, train_ds, tokenizer):
    """Plain transformers + peft + bitsandbytes QLoRA: NF4 + double quant, bf16 compute, SDPA, LoRA r=16 alpha=32 on all
    linear layers, Trainer with per-device batches padded to their longest record (setups in HF_SETUPS)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments

    from dataset import make_collator

    s, on_gpu = HF_SETUPS[setup], cuda()
    dtype = torch.bfloat16 if on_gpu else torch.float32
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=bnb, dtype=dtype, attn_implementation="sdpa",
                                                 device_map={"": 0 if on_gpu else "cpu"})
    model.config.use_cache = False
    if s["kbit"]:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=s["gc"])
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=s["dropout"], task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    targs = TrainingArguments(
        output_dir=f"/tmp/bench-{setup}", per_device_train_batch_size=s["batch"], gradient_accumulation_steps=1,
        gradient_checkpointing=s["gc"], gradient_checkpointing_kwargs={"use_reentrant": False} if s["gc"] and not s["kbit"] else None,
        train_sampling_strategy=s["sampling"], use_liger_kernel=s["liger"] and on_gpu, bf16=on_gpu, use_cpu=not on_gpu,
        max_steps=args.steps + args.profile_steps, learning_rate=2e-4, logging_steps=args.logging_steps, save_strategy="no", report_to=[],
        include_num_input_tokens_seen="non_padding", seed=args.seed, data_seed=args.seed, label_names=["labels"], disable_tqdm=True)
    return Trainer(model=model, args=targs, train_dataset=train_ds, data_collator=make_collator(tokenizer), processing_class=tokenizer)


def project_trainer(args, flags, data_path):
    """Exactly what main.py builds for these flags: config, memory plan, model, packed data, Trainer."""
    import dataclasses

    from transformers.integrations import TensorBoardCallback

    from config import TrainConfig, parse_config
    from dataset import load_records
    from loading import load_for_training
    from main import prepare_data
    from memory_plan import apply_memory_plan
    from training import build_trainer

    cfg, parsed = parse_config(TrainConfig, ["--base-model", args.model, "--dataset", data_path, "--output-dir", "/tmp/bench-project",
                                             "--max-steps", str(args.steps + args.profile_steps), "--eval-steps", "0",
                                             "--save-steps", "100000", "--logging-steps", str(args.logging_steps),
                                             "--val-fraction", "0", *flags], "bench")
    cfg = apply_memory_plan(dataclasses.replace(cfg, seed=args.seed), parsed.explicit)
    model, tokenizer, _ = load_for_training(cfg)
    train_ds, val_ds, _ = prepare_data(cfg, load_records(data_path), tokenizer)
    trainer = build_trainer(cfg, model, tokenizer, train_ds, val_ds)
    trainer.remove_callback(TensorBoardCallback)  # registered at construction: setting report_to afterwards is too late
    trainer.args.disable_tqdm = True
    return trainer, cfg


def cap_memory(gib: float) -> None:
    """Act as a smaller card: PyTorch's allocator on this GPU limited to `gib` (as bench/capped_main.py)."""
    import torch

    torch.cuda.set_per_process_memory_fraction(gib * 2**30 / torch.cuda.get_device_properties(0).total_memory, 0)
    print(f"[bench] GPU memory capped at {gib} GiB", flush=True)


def run_variant(args) -> dict:
    import torch
    from transformers import set_seed

    from dataset import load_records, tokenize_records
    from loading import load_tokenizer
    from training import peak_memory

    if args.variant in CAPS and cuda():
        cap_memory(CAPS[args.variant])
    set_seed(args.seed)
    spec = VARIANTS[args.variant]
    if cuda():
        torch.cuda.reset_peak_memory_stats()
    if is_baseline(args.variant):
        tokenizer = load_tokenizer(args.model)
        train_ds, _ = tokenize_records(load_records(args.data), tokenizer, 1024)
        window = baseline_window(args, args.variant, len(train_ds))
        if window:
            args.warmup, args.steps = window
        extra = {"window": {"kind": "megabatch" if window else "steps", "warmup": args.warmup, "steps": args.steps}}
        trainer, micro = hf_trainer(args, spec, train_ds, tokenizer), 1
    else:
        trainer, cfg = project_trainer(args, spec, args.data)
        micro = cfg.gradient_accumulation_steps
        extra = {"plan": {"gradient_checkpointing": cfg.gradient_checkpointing, "pack_tokens": cfg.pack_tokens,
                          "gradient_accumulation_steps": micro, "compile": cfg.compile, "compile_mode": cfg.compile_mode,
                          "pad_to_budget": cfg.pad_to_budget,
                          "attention": trainer.model.config._attn_implementation, "dense_base": cfg.dense_base,
                          "pack_open_rows": cfg.open_rows}}
    timer = StepTimer(None if args.sync_every_step else {args.warmup, args.steps})
    trainer.add_callback(timer.callback)
    profiler = None
    if args.profile_steps:  # after the timed steps, so that the profiler's overhead stays out of the timing
        from profile_steps import ProfileSteps

        profiler = ProfileSteps(os.path.join(args.out_dir, f"profile-{args.variant}"), start=args.steps, active=args.profile_steps)
        trainer.add_callback(profiler)
    trainer.train()
    result = timing(args, timer, micro) | extra | peak_memory()
    watch = next((c for c in trainer.callback_handler.callbacks if type(c).__name__ == "CompileWatch"), None)
    if watch is not None:
        result["compile"] = watch.report
    if profiler is not None and profiler.summary:
        result["profile"] = {k: v for k, v in profiler.summary.items() if not k.startswith("top_")}
    if cuda():
        result["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    return {"variant": args.variant, "flags": spec, "cap_gib": CAPS.get(args.variant)} | result


def timing(args, timer: StepTimer, micro_batches: int) -> dict:
    """Steps warmup+1 .. steps: tokens/s, s/step, tokens/step (real tokens), s and tokens per micro-batch, MFU."""
    (t0, tok0, s0), (t1, tok1, s1) = timer.marks[args.warmup - 1], timer.marks[args.steps - 1]
    tokens_per_s = (tok1 - tok0) / (t1 - t0)
    flops_per_token = 4 * 6.74e9 + 12 * 32 * 4096 * args.mean_context  # + attention: fwd 4*L*d*ctx, x3 with input grads
    seconds_per_step, tokens_per_step = (t1 - t0) / (s1 - s0), (tok1 - tok0) / (s1 - s0)
    return {"steps_timed": s1 - s0, "tokens_per_s": tokens_per_s, "seconds_per_step": seconds_per_step, "tokens_per_step": tokens_per_step,
            "micro_batches_per_step": micro_batches, "seconds_per_micro_batch": seconds_per_step / micro_batches,
            "tokens_per_micro_batch": tokens_per_step / micro_batches, "mfu": tokens_per_s * flops_per_token / H100_BF16_FLOPS,
            "hours_3_epochs_dolly": 3 * DOLLY_TOKENS_PER_EPOCH / tokens_per_s / 3600, "samples_per_s": tokens_per_s / args.mean_record,
            "losses": {k: v for k, v in timer.losses.items() if k <= args.steps}}


def intercept(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(seconds at zero tokens, seconds per token) of the line through two (seconds, tokens) points."""
    (t1, n1), (t2, n2) = sorted(points, key=lambda p: p[1])
    per_token = (t2 - t1) / (n2 - n1)
    return t1 - per_token * n1, per_token


def fixed_overhead_s(a: dict, b: dict) -> dict:
    """Two runs of one setting (same checkpointing, eager or compiled) at two token budgets: seconds per micro-batch =
    fixed overhead + seconds_per_token x real tokens. Returns the intercept, the marginal rate and the pair. Rows padded
    to their budget (--pad-to-budget) compute the padding too, which that fit counts in the overhead: for them also
    `fixed_overhead_computed_s`, the same fit over the tokens computed (the budget)."""
    overhead, per_token = intercept([(r["seconds_per_micro_batch"], r["tokens_per_micro_batch"]) for r in (a, b)])
    out = {"pair": [a["variant"], b["variant"]], "fixed_overhead_s": round(overhead, 4), "seconds_per_token": per_token,
           "marginal_tokens_per_s": round(1 / per_token) if per_token > 0 else None}
    if all((r.get("plan") or {}).get("pad_to_budget") for r in (a, b)):
        computed, _ = intercept([(r["seconds_per_micro_batch"], r["plan"]["pack_tokens"]) for r in (a, b)])
        out["fixed_overhead_computed_s"] = round(computed, 4)
    return out


def overheads(variants: dict) -> list[dict]:
    """fixed_overhead_s for every setting measured at two or more budgets: the smallest and the largest micro-batch."""
    groups: dict[tuple, list[dict]] = {}
    for r in variants.values():
        plan = r.get("plan")
        if plan and not r.get("cap_gib"):
            groups.setdefault((plan["gradient_checkpointing"], plan["compile"] in ("auto", "on"), plan.get("compile_mode"),
                               plan["pad_to_budget"], plan["attention"], plan.get("dense_base"), plan.get("pack_open_rows")),
                              []).append(r)
    out = []
    for rows in groups.values():
        rows = sorted(rows, key=lambda r: r["tokens_per_micro_batch"])
        if len(rows) > 1 and rows[-1]["tokens_per_micro_batch"] > 1.5 * rows[0]["tokens_per_micro_batch"]:
            out.append(fixed_overhead_s(rows[0], rows[-1]))
    return out


def add_ratios(variants: dict) -> None:
    for r in variants.values():
        r["ratios"] = {f"vs_{ref}": round(r["tokens_per_s"] / variants[ref]["tokens_per_s"], 3) for ref in REFERENCES if ref in variants}


def write_data(args) -> tuple[str, dict, float]:
    """The synthetic dolly-like records (JSONL), their length statistics and the mean attended context."""
    from dataset import load_records, tokenize_records
    from loading import load_tokenizer

    data = os.path.join(args.out_dir, "bench-dolly-like.jsonl")
    with open(data, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in make_records(args.records, args.seed))
    tokenized, summary = tokenize_records(load_records(data), load_tokenizer(args.model), 1024)
    lengths = [len(x) for x in tokenized["input_ids"]]
    stats = length_report(lengths, args.seed)
    print("[bench] record lengths (tokens): " + ", ".join(f"{k} {v:.3g}" for k, v in stats.items()), flush=True)
    return data, {"length_stats": stats, "data_summary": summary}, sum(n * (n + 1) / 2 for n in lengths) / sum(lengths)


def run_child(args, name: str, data: str, mean_context: float, mean_record: float) -> dict | None:
    profile = args.profile_steps_n if name in args.profile.split(",") else 0
    cmd = [sys.executable, __file__, "--model", args.model, "--variant", name, "--data", data, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--seed", str(args.seed), "--mean-context", str(mean_context), "--mean-record", str(mean_record),
           "--profile-steps", str(profile), "--out", args.out, "--logging-steps", str(args.logging_steps),
           "--baseline-window", args.baseline_window,
           *(["--sync-every-step"] if args.sync_every_step else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    with open(os.path.join(args.out_dir, f"{name}.log"), "w") as fh:
        fh.write(proc.stdout + "\n" + proc.stderr)
    for line in proc.stdout.splitlines():
        if line.startswith(("[memory-plan]", "[compile]", "[profile]", "[bench] GPU")):
            print(f"[bench] {name}: {line}", flush=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        print(f"[bench] {name} failed (log: {name}.log):\n{proc.stderr[-2500:]}", flush=True)
        return None
    return json.loads(line[7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Local Llama-2-7B directory (bench/make_random_llama.py).")
    parser.add_argument("--out", default="train_speed.json", help="JSON results (rewritten after every variant); logs, profiles beside.")
    parser.add_argument("--variants", default="baseline,hf_tuned,hf_tuned_nogc,default,default_cap24,nogc_2048,compiled",
                        help="Comma-separated, run in this order: " + ", ".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=10, help="Optimizer steps per variant (timed: warmup+1 .. steps).")
    parser.add_argument("--warmup", type=int, default=3, help="Steps excluded from timing.")
    parser.add_argument("--logging-steps", type=int, default=10,
                        help="Every variant logs its loss every N steps (main.py's default; each log reads the GPU). Sessions 1-5: 1.")
    parser.add_argument("--sync-every-step", action="store_true",
                        help="Synchronize the GPU at every step (sessions 1-5) instead of only at the ends of the timed window.")
    parser.add_argument("--records", type=int, default=3000, help="Synthetic records.")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--profile", default="default", help="Variants profiled after their timed steps (trace.json.gz, summary.json).")
    parser.add_argument("--profile-steps-n", type=int, default=3, help="Steps profiled.")
    parser.add_argument("--baseline-runs", type=int, default=2,
                        help="Runs of each plain-HF variant, the fastest kept (all in runs_tokens_per_s): one where it is listed, "
                             "the others after every other variant. Its first run on a fresh machine was 1.5-1.8x slower than "
                             "later ones, and one at a command's start 4-12% slower than one at its end (H200); the baseline "
                             "must be the strongest.")
    parser.add_argument("--variant-runs", type=int, default=1,
                        help="Runs of each of the project's variants, in passes over them in the listed order (two variants: "
                             "A, B, A, B), all runs kept in runs_tokens_per_s and the fastest reported: for an A/B of two "
                             "settings whose difference is smaller than a command's drift (session 15: first fit).")
    parser.add_argument("--baseline-window", choices=("megabatch", "steps"), default="megabatch",
                        help="Timed steps of the plain-HF variants that group by length (hf_tuned, hf_tuned_nogc): megabatch = "
                             "exactly their second length-grouped megabatch (steps 47-92 at batch 16 over 3,000 records), a random "
                             "sample of the records, as a whole run sees them; steps = --warmup+1 .. --steps like every other "
                             "variant (issue 12's protocol, which times only the longest batches of the first megabatch: "
                             "megabatch_window). The project's packed rows are alike, so its window is --steps either way.")
    parser.add_argument("--deadline", type=float, default=0, help="Unix time: variants that would end later are skipped (0: none).")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--profile-steps", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--mean-context", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--mean-record", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(args.out_dir, exist_ok=True)
    from runtime import silence_harmless_logs

    silence_harmless_logs()  # before liger and bitsandbytes log their harmless start-up lines
    if args.variant:  # child process
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return
    data, results, mean_context = write_data(args)
    results |= {"versions": versions(), "variants": {}}
    attempts: dict[str, list[dict]] = {}
    names = args.variants.split(",")
    order = schedule(names, args.baseline_runs, args.variant_runs)
    for i, name in enumerate(order):
        again = name in attempts
        # seconds: load, steps, and the compilation; before the baselines' runs at the end, room is kept for them (a
        # baseline left with its first run alone, maybe a fresh machine's slow one, would flatter every ratio)
        needs = seconds_needed(args, name) + sum(seconds_needed(args, n) for n in order[max(i + 1, len(names)):] if is_baseline(n))
        if args.deadline and time.time() + needs > args.deadline:
            print(f"[bench] {name}{' (another run)' if again else ''} skipped: it would not finish before the deadline "
                  f"({needs} s needed)", flush=True)
            continue
        attempt = run_child(args, name, data, mean_context, results["length_stats"]["mean"])
        if not attempt:
            continue
        attempts.setdefault(name, []).append(attempt)
        result = max(attempts[name], key=lambda r: r["tokens_per_s"]) | {"runs_tokens_per_s": [r["tokens_per_s"] for r in attempts[name]]}
        results["variants"][name] = result
        add_ratios(results["variants"])
        results["fixed_overhead"] = overheads(results["variants"])
        print_row(result)
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=2)
    short = [n for n in names if is_baseline(n) and 0 < len(attempts.get(n, [])) < args.baseline_runs]
    if short:
        print(f"[bench] WARNING: {short} ran fewer than --baseline-runs {args.baseline_runs} times: a weaker baseline", flush=True)
    if any(len(a) > 1 for a in attempts.values()):  # the ratios printed above were against the baselines' runs so far
        print("[bench] with each plain-HF baseline's fastest run (runs_tokens_per_s):", flush=True)
        for result in results["variants"].values():
            print_row(result)
    for o in results.get("fixed_overhead", []):
        computed = f" ({o['fixed_overhead_computed_s']:.3f} s over the tokens computed)" if "fixed_overhead_computed_s" in o else ""
        print(f"[bench] fixed overhead {o['pair']}: {o['fixed_overhead_s']:.3f} s per micro-batch{computed}, "
              f"marginal {o['marginal_tokens_per_s']} tokens/s", flush=True)


def schedule(names: list[str], baseline_runs: int, variant_runs: int = 1) -> list[str]:
    """The order of the runs: each variant once, as listed; then variant_runs - 1 more passes over the project's variants
    (--variant-runs: A, B, A, B); then each plain-HF variant's further runs (--baseline-runs) at the end. Each variant's
    fastest run is kept. A baseline run only at the start of a command came out 4-12% slower than one at its end
    (sessions 13-14, H200, across commands; 24-47% in session 15), so a ratio depended on where the baseline stood.
    Bracketing the other variants, its best run sees both ends."""
    project = [n for n in names if not is_baseline(n)]
    return list(names) + project * (variant_runs - 1) + [n for n in names if is_baseline(n) for _ in range(baseline_runs - 1)]


def seconds_needed(args, name: str) -> int:
    """A run's seconds, roughly: load, steps and compilation. A baseline over a whole megabatch: ~30 s of loading and
    0.8 s per step (hf_tuned over 92 steps took ~92 s in all on an H200, at 0.67 s per timed step; session 16). On session
    17's slower H200 the four runs of hf_tuned and hf_tuned_nogc took ~110 s each against 104-110 s estimated, so
    gpu_train.sh's deadline keeps some 30 s below the device's 600 s limit."""
    window = baseline_window(args, name, args.records)
    if window:
        return int(30 + 0.8 * window[1])
    return 180 if name.startswith("compiled") else 75


def baseline_window(args, name: str, records: int) -> tuple[int, int] | None:
    """(warmup, steps) of a plain-HF variant that groups by length under --baseline-window megabatch; None otherwise
    (the variant is timed over --warmup+1 .. --steps)."""
    if not is_baseline(name) or args.baseline_window != "megabatch":
        return None
    setup = HF_SETUPS[VARIANTS[name]]
    return megabatch_window(records, setup["batch"]) if setup["sampling"] == "group_by_length" else None


def is_baseline(name: str) -> bool:
    """A plain Hugging Face variant (VARIANTS maps it to an HF_SETUPS name, not to main.py flags)."""
    return isinstance(VARIANTS[name], str)


def print_row(r: dict) -> None:
    ratios = " ".join(f"{k[3:]} {v:.2f}x" for k, v in r["ratios"].items())
    plan = r.get("plan")
    setting = ""
    if plan:
        setting = f"GC {'on' if plan['gradient_checkpointing'] else 'off'} {plan['pack_tokens']}x{plan['gradient_accumulation_steps']}"
        setting += " 16-bit base" if plan.get("dense_base") == "yes" else ""
    if r.get("window", {}).get("kind") == "megabatch":
        setting += f"steps {r['window']['warmup'] + 1}-{r['window']['steps']} (one megabatch)"
    if len(r.get("runs_tokens_per_s", [])) > 1:
        setting += " runs " + " / ".join(f"{t:.0f}" for t in r["runs_tokens_per_s"])
    memory = r.get("peak_gpu_mem_gib", float("nan"))
    print(f"[bench] {r['variant']:<20} {r['tokens_per_s']:>8.0f} tok/s  {ratios}  {r['seconds_per_step']:.3f} s/step  "
          f"{r['tokens_per_step']:.0f} tok/step  {memory:.1f} GiB  MFU {r['mfu']:.1%}  {setting}", flush=True)


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
