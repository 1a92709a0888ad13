"""Fine-tune Llama-2-7B with QLoRA on databricks-dolly-15k; the adapter goes to llama_adapter/.

    python main.py                        # Llama-2-7B, 4-bit NF4 + LoRA r=16, dolly-15k, 3 epochs
    python main.py --preset smoke         # tiny random Llama + the shipped sample: seconds on a CPU
    python main.py --preset demo          # SmolLM2-135M-Instruct + the shipped sample: minutes on a CPU
    python main.py --max-steps 100 --lora-r 8 --config configs/my.yaml
    python main.py --resume               # continue from the newest complete checkpoint in OUTPUT_DIR/checkpoints

Ctrl-C or SIGTERM saves a checkpoint at the end of the current step and exits 130 / 143; kill -9 loses
at most the steps since the last checkpoint. Either way `--resume` continues (resilience.py).

Without a CUDA GPU (or without the hub and no cached copy of the base) the default run says
so and runs the demo preset instead; --no-fallback stops instead.

Reads top to bottom: parse the config, load the model, prepare the data, train, save.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from typing import Any

import torch
from transformers import set_seed

from cli import run_cli
from config import ConfigError, TrainConfig, parse_config
from dataset import (
    DataError,
    fingerprint,
    format_load_summary,
    format_summary,
    load_records_with_summary,
    pack_examples,
    split_records,
    tokenize_records,
)
from hub import TINY_MODEL, ModelError, base_model_available
from loading import load_for_training
from memory_plan import apply_memory_plan
from resilience import EXIT_CODES, TrainingStopped, checkpoint_dir, checkpoints, main_process, newest_complete, remove_previous_run
from runtime import launched_processes, silence_harmless_logs
from training import build_trainer, save_outputs, train

DEFAULT_BASE = TrainConfig.__dataclass_fields__["base_model"].default


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return run_cli(run, argv)
    except TrainingStopped as stop:  # Ctrl-C / SIGTERM (checkpoint saved), a NaN loss, CUDA out of memory
        print(stop.message, file=sys.stderr)
        return stopped(stop.code)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (loading, final save): nothing half-written is kept
        print("[main] interrupted (Ctrl-C); complete checkpoints stay valid for --resume", file=sys.stderr)
        return EXIT_CODES[signal.SIGINT]


def stopped(code: int) -> int:
    """The exit code of a stopped run. Launched as several processes, this one exits here at once (os._exit), its
    output flushed: its checkpoint part is written and the process group closed, and releasing the stopped Trainer's
    objects (a gloo group whose peer may already have exited) could block until the launcher SIGKILLs it 30 s later,
    turning exit code 143 into -9 (seen intermittently in tests/test_distributed.py's SIGTERM test)."""
    if launched_processes() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def run(argv: list[str]) -> None:
    silence_harmless_logs()
    cfg, args = parse_config(TrainConfig, argv, __doc__, extra=_extra_flags)
    cfg = fall_back_if_needed(cfg, argv)
    cfg = apply_memory_plan(cfg, args.explicit)  # on a GPU: checkpointing, tokens per micro-batch, accumulation that fit
    print(f"[main] base model {cfg.base_model} -> adapter in {cfg.output_dir}/", flush=True)
    check_output_dir(cfg, args.overwrite)
    # Bad data fails here, before minutes of model loading.
    records, load_summary = load_records_with_summary(cfg.dataset, cfg.max_records, cfg.skip_bad_records)
    print("[data] " + format_load_summary(cfg.dataset, load_summary))
    set_seed(cfg.seed)
    model, tokenizer, base_path = load_for_training(cfg)
    print_trainable(model)
    train_ds, val_ds, data_summary = prepare_data(cfg, records, tokenizer)
    if args.overwrite:
        clear_output_dir(cfg)  # only now: a typo in a flag or a bad data file must not cost the previous run
    trainer = build_trainer(cfg, model, tokenizer, train_ds, val_ds)
    metrics = train(trainer, cfg, has_val=len(val_ds) > 0)
    saved_cfg = cfg if cfg.base_model == TINY_MODEL else dataclasses.replace(cfg, base_model=base_path, gguf_file=None)
    fingerprints = data_summary.pop("fingerprints")
    save_outputs(trainer, tokenizer, saved_cfg, metrics | {"data": {"load": load_summary} | data_summary}, fingerprints)
    if trainer.is_world_process_zero():
        print(f"[main] done: a LoRA adapter for {saved_cfg.base_model} in {cfg.output_dir}/; compare it with that base: "
              f"python eval.py --adapter {cfg.output_dir}")


def _extra_flags(parser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help=("Replace the run in OUTPUT_DIR instead of refusing: "
                              "its adapter, checkpoints, logs and reports are deleted just before training."))


def fall_back_if_needed(cfg: TrainConfig, argv: list[str]) -> TrainConfig:
    """The 7B default needs a CUDA GPU and the hub (or a cached copy); elsewhere run the demo preset."""
    if cfg.base_model != DEFAULT_BASE:
        return cfg
    reason = None
    if not torch.cuda.is_available():
        reason = "no CUDA GPU found (Llama-2-7B QLoRA needs one)"
    elif not base_model_available(cfg.base_model):
        reason = f"the Hugging Face hub is unreachable and {cfg.base_model} is not in the local cache"
    if reason is None:
        return cfg
    if not cfg.fallback:
        raise ModelError(f"{reason}; run `python main.py --preset demo` (CPU, minutes) or `--preset smoke` (seconds)")
    print(f"[main] {reason}.\n[main] Running the demo preset instead: SmolLM2-135M-Instruct on the shipped dolly sample "
          f"(same pipeline, a small model). Pass --no-fallback to stop instead.", flush=True)
    demo, _ = parse_config(TrainConfig, ["--preset", "demo", *argv], __doc__, extra=_extra_flags)
    return dataclasses.replace(demo, output_dir=cfg.output_dir)


def check_output_dir(cfg: TrainConfig, overwrite: bool) -> None:
    """Never silently overwrite a finished adapter or mix two runs in one directory."""
    if os.path.exists(cfg.output_dir) and not os.path.isdir(cfg.output_dir):
        raise ConfigError(f"--output-dir {cfg.output_dir} is a file; choose a directory")
    if cfg.resume and overwrite:
        raise ConfigError("--resume continues the run in OUTPUT_DIR and --overwrite deletes it: pass one of them")
    finished = os.path.isfile(os.path.join(cfg.output_dir, "adapter_config.json"))
    started = bool(checkpoints(checkpoint_dir(cfg)))  # complete or not
    if cfg.resume and newest_complete(checkpoint_dir(cfg)) is None:
        if started:
            raise ConfigError(f"--resume: no checkpoint in {checkpoint_dir(cfg)} was completed (every save was cut short); "
                              "start again with --overwrite")
        raise ConfigError(f"--resume: no checkpoint in {checkpoint_dir(cfg)}; start without --resume")
    if (finished or started) and not (cfg.resume or overwrite):
        what = "a finished adapter" if finished else "checkpoints of an unfinished run"
        raise ConfigError(f"{cfg.output_dir} already holds {what}; "
                          "pass --resume to continue it, --overwrite to replace it, or another --output-dir")


def clear_output_dir(cfg: TrainConfig) -> None:
    """--overwrite: remove the previous run's adapter, checkpoints, logs and reports, so two runs never mix."""
    if not main_process():  # several processes (torchrun / accelerate launch): rank 0 removes it, once
        return
    removed = remove_previous_run(cfg.output_dir) if os.path.isdir(cfg.output_dir) else []
    if removed:
        print(f"[main] --overwrite: removed the previous run from {cfg.output_dir}/ ({', '.join(removed)})")


def print_trainable(model: torch.nn.Module) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"[model] trainable LoRA parameters: {trainable:,} of {total:,} stored ({100 * trainable / total:.2f}%)")


def prepare_data(cfg: TrainConfig, records, tokenizer) -> tuple[Any, Any, dict[str, Any]]:
    train_raw, val_raw = split_records(records, cfg.val_fraction, cfg.seed)
    fingerprints = {"train": sorted(map(fingerprint, train_raw)), "validation": sorted(map(fingerprint, val_raw))}
    train_ds, train_summary = tokenize_records(train_raw, tokenizer, cfg.max_length, cfg.dataset)
    val_ds, val_summary = tokenize_records(val_raw, tokenizer, cfg.max_length, cfg.dataset)
    print("[data] " + format_summary("train", train_summary))
    if len(val_raw):
        print("[data] " + format_summary("validation", val_summary))
    if len(train_ds) == 0:
        raise DataError(f"{cfg.dataset}: no training record left: {why_none_kept(train_summary, cfg.max_length)}")
    if cfg.packing:
        records = len(train_ds)
        train_ds, val_ds = (pack_examples(ds, cfg.pack_tokens, cfg.seed, cfg.open_rows) for ds in (train_ds, val_ds))
        fill = train_summary["tokens"] / (len(train_ds) * cfg.pack_tokens)
        how = f"first fit over {cfg.open_rows} open rows" if cfg.open_rows > 1 else "greedy filling"
        print(f"[data] packed {records} training records into {len(train_ds)} rows of <= {cfg.pack_tokens} tokens "
              f"({fill:.0%} full, {how}, {'each padded to the budget' if cfg.pad_to_budget else 'no padding'})")
    return train_ds, val_ds, {"train": train_summary, "validation": val_summary, "fingerprints": fingerprints}





def why_none_kept(summary: dict[str, Any], max_length: int) -> str:
    """What dropped every record, with what to do about each cause (dataset.tokenize_records' counts)."""
    causes = {
        "dropped_empty_response": "with an empty response (nothing to learn; fill the response column)",
        "dropped_empty_instruction": "with an empty instruction (fill the instruction column)",
        "dropped_prompt_too_long": f"whose prompt (template + instruction + context) is longer than --max-length {max_length} (raise it)",
    }
    return "; ".join(f"{summary[key]} of {summary['records']} records {text}" for key, text in causes.items() if summary[key])

if __name__ == "__main__":
    raise SystemExit(main())
