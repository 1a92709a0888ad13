"""Loss parity: main.py's training path vs plain Hugging Face on the same records, same order, same LoRA init.

    python bench/loss_parity.py --model /tmp/l7 --out $OUT/loss_parity.json --steps 20 --pack-tokens 8192 --no-gc \
        --sides project,project_flex,hf

Step i of every side trains on the same records: the project as ONE packed row (main.py's path: packed rows,
--attention auto (varlen on one CUDA GPU; flex_attention for project_flex), Liger, --compile auto; --compile on for
project_compiled, which matters with checkpointing, where auto leaves it off), plain HF as one padded batch of
exactly those records
(SDPA, eager cross-entropy, no Liger). The first side writes its initial LoRA weights and the others load them, so
all start from the same adapter (sha256 of each side's initial state in the JSON). Constant learning rate, no
warm-up, one micro-batch per step: Trainer's logged loss is then the per-token mean of that step (sum of the
cross-entropy over supervised tokens / their count) on every side, and step 1 is computed before any update.
Writes OUT (JSON: per-step losses, differences, supervised tokens per step) and OUT with .png (curves + difference).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SIDES = {"project": [], "project_compiled": ["--compile", "on"], "project_varlen": ["--attention", "varlen"],
         "project_flex": ["--attention", "flex_attention"], "project_dense": ["--dense-base", "yes"],
         "project_fp8": ["--dense-base", "fp8"],
         "project_fp8_backward": ["--dense-base", "fp8_backward"], "project_fp8_backward_4bit": ["--dense-base", "fp8_backward_4bit"],
         "project_noliger": ["--no-liger"],
         "hf": None, "hf_nogc": None}  # None: plain HF (hf_side); hf_nogc without gradient checkpointing
COMMON = ["--memory-plan", "off", "--gradient-accumulation-steps", "1", "--lr-scheduler", "constant", "--warmup-ratio", "0",
          "--logging-steps", "1", "--eval-steps", "0", "--val-fraction", "0", "--save-steps", "100000"]


def lora_state(model) -> dict:
    from peft import get_peft_model_state_dict

    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def same_init(model, path: str) -> str:
    """Load the LoRA init that the first side wrote (or write it); the sha256 of the state this side starts from."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    if os.path.isfile(path):
        set_peft_model_state_dict(model, load_file(path))
    else:
        save_file(lora_state(model), path)
    digest = hashlib.sha256()
    for key, value in sorted(lora_state(model).items()):
        digest.update(key.encode() + value.numpy().tobytes())
    return digest.hexdigest()


def sequential(trainer):
    """The rows in dataset order on every side (Trainer would shuffle them with its own sampler)."""
    from torch.utils.data import SequentialSampler

    trainer._get_train_sampler = lambda *a, **k: SequentialSampler(trainer.train_dataset)
    return trainer


def project_side(args, flags: list[str], groups: list[list[int]]):
    import datasets

    from config import TrainConfig, parse_config
    from dataset import load_records, tokenize_records
    from loading import load_for_training
    from training import build_trainer

    cfg, _ = parse_config(TrainConfig, ["--base-model", args.model, "--dataset", args.data, "--output-dir", "/tmp/parity-project",
                                        "--max-steps", str(args.steps), "--seed", str(args.seed), "--pack-tokens", str(args.pack_tokens),
                                        "--gradient-checkpointing" if args.gc else "--no-gradient-checkpointing", *COMMON, *flags],
                               "parity")
    model, tokenizer, _ = load_for_training(cfg)
    sha = same_init(model, args.init)
    ds, _ = tokenize_records(load_records(args.data), tokenizer, cfg.max_length)
    ids, labels = ds["input_ids"], ds["labels"]
    rows = [{"input_ids": [t for i in g for t in ids[i]], "labels": [t for i in g for t in labels[i]],
             "position_ids": [p for i in g for p in range(len(ids[i]))]} for g in groups]
    trainer = build_trainer(cfg, model, tokenizer, datasets.Dataset.from_list(rows), datasets.Dataset.from_list([]))
    return sequential(trainer), sha


def hf_side(args, groups: list[list[int]]):
    """Plain transformers + peft: 4-bit NF4, SDPA, padded batches of each row's records, eager cross-entropy; gradient
    checkpointing except for the hf_nogc side."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments

    from dataset import load_records, make_collator, tokenize_records
    from loading import load_tokenizer

    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu else torch.float32
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=bnb, dtype=dtype, attn_implementation="sdpa",
                                                 device_map={"": 0 if on_gpu else "cpu"})
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    sha = same_init(model, args.init)
    tokenizer = load_tokenizer(args.model)
    ds, _ = tokenize_records(load_records(args.data), tokenizer, 1024)
    examples = [{"input_ids": x, "labels": y} for x, y in zip(ds["input_ids"], ds["labels"], strict=True)]
    pad = make_collator(tokenizer)
    targs = TrainingArguments(output_dir="/tmp/parity-hf", per_device_train_batch_size=1, max_steps=args.steps, learning_rate=2e-4,
                              lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.3, weight_decay=0.0, optim="adamw_torch",
                              gradient_checkpointing=args.side != "hf_nogc", gradient_checkpointing_kwargs={"use_reentrant": False},
                              bf16=on_gpu,
                              use_cpu=not on_gpu, logging_steps=1, save_strategy="no", report_to=[], remove_unused_columns=False,
                              logging_nan_inf_filter=False, seed=args.seed, data_seed=args.seed, disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=[[examples[i] for i in g] for g in groups],
                      data_collator=lambda batch: pad(batch[0]))
    return sequential(trainer), sha


def run_side(args) -> dict:
    from transformers import set_seed

    set_seed(args.seed)
    with open(args.groups) as fh:
        groups = json.load(fh)
    trainer, sha = hf_side(args, groups) if SIDES[args.side] is None else project_side(args, SIDES[args.side], groups)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"side": args.side, "losses": losses, "lora_init_sha256": sha}


def compare(sides: dict, supervised: list[int]) -> dict:
    """Per-step absolute differences against the project side, token-weighted mean losses over the run."""
    ref = sides["project"]["losses"]
    out = {"steps": list(range(1, len(ref) + 1)), "supervised_tokens_per_step": supervised[: len(ref)], "sides": sides}
    for side in sides.values():
        n = min(len(ref), len(side["losses"]))
        diffs = [abs(a - b) for a, b in zip(ref[:n], side["losses"][:n], strict=True)]
        weighted = sum(loss * c for loss, c in zip(side["losses"], supervised, strict=False)) / sum(supervised[: len(side["losses"])])
        relative = sum(d / r for d, r in zip(diffs, ref, strict=False)) / n
        side |= {"abs_diff_vs_project": diffs, "max_abs_diff": max(diffs), "mean_rel_diff": relative, "token_weighted_mean_loss": weighted}
    out["same_init"] = len({s["lora_init_sha256"] for s in sides.values()}) == 1
    return out


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    twin = ax.twinx()
    for name, side in result["sides"].items():
        ax.plot(range(1, len(side["losses"]) + 1), side["losses"], label=name)
        if name != "project":
            diffs = side["abs_diff_vs_project"]
            twin.plot(range(1, len(diffs) + 1), diffs, linestyle=":", label=f"|{name} - project|")
    ax.set(xlabel="optimizer step", ylabel="training loss per supervised token", title="Loss parity: main.py path vs plain HF")
    twin.set_ylabel("absolute difference")
    ax.legend(loc="upper right")
    twin.legend(loc="center right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def prepare(args) -> tuple[str, list[int]]:
    """The records (JSONL), the record groups of each step (packed rows of <= --pack-tokens) and their supervised tokens."""
    from train_speed import make_records

    from dataset import load_records, pack_groups, tokenize_records
    from loading import load_tokenizer

    args.data = os.path.join(args.out_dir, "parity-records.jsonl")
    if args.records_file:  # real records (e.g. data/dolly_sample.jsonl, for a real model on the CPU), in their order
        with open(args.records_file, encoding="utf-8") as src, open(args.data, "w") as fh:
            fh.write(src.read())
    else:
        with open(args.data, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in make_records(args.records, args.seed))
    ds, _ = tokenize_records(load_records(args.data), load_tokenizer(args.model), 1024)
    groups = pack_groups([len(x) for x in ds["input_ids"]], args.pack_tokens, args.seed)[: args.steps]
    groups_path = os.path.join(args.out_dir, "parity-groups.json")
    with open(groups_path, "w") as fh:
        json.dump(groups, fh)
    supervised = [sum(sum(1 for t in ds["labels"][i] if t != -100) for i in g) for g in groups]
    return groups_path, supervised


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Local model directory (bench/make_random_llama.py).")
    parser.add_argument("--out", default="loss_parity.json")
    parser.add_argument("--sides", default="project,project_compiled,hf", help="Comma-separated, project first: " + ", ".join(SIDES))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--records", type=int, default=1200, help="Synthetic dolly-like records (about 17 per step).")
    parser.add_argument("--records-file", help="A dolly-format JSONL to train on instead of --records synthetic ones.")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--pack-tokens", type=int, default=4096, help="Tokens per packed row (one row, one step).")
    parser.add_argument("--no-gc", dest="gc", action="store_false",
                        help="The project sides without gradient checkpointing (plain HF keeps it: memory only).")
    for hidden in ("--side", "--data", "--groups", "--init"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # child process
        print("RESULT " + json.dumps(run_side(args)), flush=True)
        return
    args.out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(args.out_dir, exist_ok=True)
    groups_path, supervised = prepare(args)
    init = os.path.join(tempfile.gettempdir(), "parity-lora-init.safetensors")  # 160 MB for 7B: not in OUT
    if os.path.exists(init):
        os.remove(init)
    sides = {}
    for side in args.sides.split(","):
        cmd = [sys.executable, __file__, "--model", args.model, "--side", side, "--data", args.data, "--groups", groups_path,
               "--init", init, "--steps", str(args.steps), "--seed", str(args.seed), "--pack-tokens", str(args.pack_tokens),
               *([] if args.gc else ["--no-gc"])]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        with open(os.path.join(args.out_dir, f"parity-{side}.log"), "w") as fh:
            fh.write(proc.stdout + "\n" + proc.stderr)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"[parity] {side} failed:\n{proc.stderr[-2500:]}", flush=True)
            continue
        sides[side] = json.loads(line[7:])
        print(f"[parity] {side}: losses {[round(x, 4) for x in sides[side]['losses']]}", flush=True)
    if "project" not in sides:
        raise SystemExit("[parity] the project side failed: nothing to compare")
    result = compare(sides, supervised)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    plot(result, os.path.splitext(args.out)[0] + ".png")
    for name, side in result["sides"].items():
        print(f"[parity] {name}: max |diff| {side['max_abs_diff']:.4f}, mean relative {side['mean_rel_diff']:.2e}, "
              f"token-weighted mean loss {side['token_weighted_mean_loss']:.4f}", flush=True)
    print(f"[parity] same LoRA init on every side: {result['same_init']} -> {args.out}", flush=True)


if __name__ == "__main__":
    main()
