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
import json
import os
import resource
import signal
import sys
import time
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from config import ConfigError, TrainConfig, parse_config, run_cli, save_config
from dataset import (
    DataError,
    collate_packed,
    format_load_summary,
    format_summary,
    load_records_with_summary,
    make_collator,
    pack_examples,
    split_records,
    tokenize_records,
)
from model import CONFIG_NAME, TINY_MODEL, ModelError, base_model_available, load_for_training, runtime
from resilience import (
    EXIT_CODES,
    EXIT_TRAINING_FAILED,
    CheckpointMarker,
    StopOnNonFiniteLoss,
    StopOnSignal,
    TestHooks,
    TrainingStopped,
    checkpoints,
    main_process,
    newest_complete,
    out_of_memory_message,
    pick_checkpoint,
    raise_if_stopped_early,
    remove_previous_run,
    staged,
)

DEFAULT_BASE = TrainConfig.__dataclass_fields__["base_model"].default


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return run_cli(run, argv)
    except TrainingStopped as stop:  # Ctrl-C / SIGTERM (checkpoint saved), a NaN loss, CUDA out of memory
        print(stop.message, file=sys.stderr)
        return stop.code
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (loading, final save): nothing half-written is kept
        print("[main] interrupted (Ctrl-C); complete checkpoints stay valid for --resume", file=sys.stderr)
        return EXIT_CODES[signal.SIGINT]


def run(argv: list[str]) -> None:
    cfg, args = parse_config(TrainConfig, argv, __doc__, extra=_extra_flags)
    cfg = fall_back_if_needed(cfg, argv)
    check_output_dir(cfg, args.overwrite)
    records, load_summary = load_records_with_summary(cfg.dataset, cfg.max_records, cfg.skip_bad_records)  # bad data fails here, before minutes of model loading
    print("[data] " + format_load_summary(cfg.dataset, load_summary))
    set_seed(cfg.seed)
    model, tokenizer, base_path, gguf_file = load_for_training(cfg)
    print_trainable(model)
    train_ds, val_ds, data_summary = prepare_data(cfg, records, tokenizer)
    if args.overwrite:
        clear_output_dir(cfg)  # only now: a typo in a flag or a bad data file must not cost the previous run
    trainer = build_trainer(cfg, model, tokenizer, train_ds, val_ds)
    metrics = train(trainer, cfg, has_val=len(val_ds) > 0)
    saved_cfg = cfg if cfg.base_model == TINY_MODEL else dataclasses.replace(cfg, base_model=base_path, gguf_file=gguf_file)
    save_outputs(trainer, tokenizer, saved_cfg, metrics | {"data": {"load": load_summary} | data_summary})


def _extra_flags(parser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="Replace the run in OUTPUT_DIR instead of refusing: its adapter, checkpoints, logs and reports are deleted just before training.")


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
            raise ConfigError(f"--resume: no checkpoint in {checkpoint_dir(cfg)} was completed (every save was cut short); start again with --overwrite")
        raise ConfigError(f"--resume: no checkpoint in {checkpoint_dir(cfg)}; start without --resume")
    if (finished or started) and not (cfg.resume or overwrite):
        what = "a finished adapter" if finished else "checkpoints of an unfinished run"
        raise ConfigError(f"{cfg.output_dir} already holds {what}; pass --resume to continue it, --overwrite to replace it, or another --output-dir")


def checkpoint_dir(cfg: TrainConfig) -> str:
    return os.path.join(cfg.output_dir, "checkpoints")


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
    train_ds, train_summary = tokenize_records(train_raw, tokenizer, cfg.max_length, cfg.dataset)
    val_ds, val_summary = tokenize_records(val_raw, tokenizer, cfg.max_length, cfg.dataset)
    print("[data] " + format_summary("train", train_summary))
    if len(val_raw):
        print("[data] " + format_summary("validation", val_summary))
    if len(train_ds) == 0:
        if train_summary["dropped_prompt_too_long"] == train_summary["records"]:
            raise DataError(f"{cfg.dataset}: every training record's prompt (template + instruction + context) is longer than "
                            f"--max-length {cfg.max_length}, so none is left to train on; raise --max-length")
        raise DataError(f"{cfg.dataset}: no training record left after the length policy; raise --max-length")
    if cfg.packing:
        records = len(train_ds)
        train_ds, val_ds = pack_examples(train_ds, cfg.pack_tokens, cfg.seed), pack_examples(val_ds, cfg.pack_tokens, cfg.seed)
        fill = train_summary["tokens"] / (len(train_ds) * cfg.pack_tokens)
        print(f"[data] packed {records} training records into {len(train_ds)} rows of <= {cfg.pack_tokens} tokens ({fill:.0%} full, no padding)")
    return train_ds, val_ds, {"train": train_summary, "validation": val_summary}


class DollyTrainer(Trainer):
    """transformers' Trainer, plus peak memory in every log line (console and TensorBoard).

    Trainer itself logs train_tokens_per_second (non-padding tokens, this session). Its checkpoints are
    marked complete, and rotated, by resilience.CheckpointMarker.
    """

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs or "train_loss" in logs:
            logs.update(peak_memory())
        super().log(logs, *args, **kwargs)


def peak_memory() -> dict[str, float]:
    if torch.cuda.is_available():
        return {"peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    return {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def build_trainer(cfg: TrainConfig, model, tokenizer, train_ds, val_ds) -> Trainer:
    rt = runtime()
    evaluate = len(val_ds) > 0 and cfg.eval_steps > 0
    args = TrainingArguments(
        output_dir=checkpoint_dir(cfg),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=1 if cfg.packing else cfg.batch_size,
        per_device_eval_batch_size=1 if cfg.packing else cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a share of the total steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optimizer,
        bf16=rt.cuda and rt.dtype == torch.bfloat16,
        fp16=rt.cuda and rt.dtype == torch.float16,
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        eval_strategy="steps" if evaluate else "no",
        eval_steps=cfg.eval_steps if evaluate else None,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=None,  # CheckpointMarker rotates, counting only complete checkpoints
        logging_steps=cfg.logging_steps,
        logging_nan_inf_filter=False,  # log a NaN loss as NaN, so that StopOnNonFiniteLoss sees it
        report_to=["tensorboard"],
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=cfg.dataloader_workers,
        include_num_input_tokens_seen="non_padding",
        label_names=["labels"],
        ddp_find_unused_parameters=False,
        use_liger_kernel=cfg.liger and rt.cuda,
        dataloader_pin_memory=rt.cuda,
        use_cpu=not rt.cuda,  # on a CPU, several processes (torchrun, accelerate launch with ddp.yaml) then train with DDP over gloo
    )
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", os.path.join(cfg.output_dir, "tensorboard"))
    return DollyTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds if len(val_ds) else None,
        data_collator=collate_packed if cfg.packing else make_collator(tokenizer), processing_class=tokenizer,
        callbacks=[CheckpointMarker(keep=cfg.save_total_limit), *TestHooks.if_requested()],
    )


def train(trainer: Trainer, cfg: TrainConfig, has_val: bool) -> dict[str, Any]:
    checkpoint = pick_checkpoint(checkpoint_dir(cfg)) if cfg.resume else None  # the newest complete one
    if checkpoint:
        print(f"[main] resuming from {checkpoint}")
    if trainer.is_world_process_zero():
        print("[main] " + describe_batch(trainer.args, cfg))
        warn_if_other_process_count(checkpoint, trainer.args.world_size)
    signals, losses, speed = StopOnSignal(), StopOnNonFiniteLoss(), SteadyThroughput()
    for callback in (signals, losses, speed):
        trainer.add_callback(callback)
    try:
        with signals.handling_signals():  # Ctrl-C / SIGTERM: a checkpoint at the end of the step, then stop
            result = trainer.train(resume_from_checkpoint=checkpoint)
    except torch.cuda.OutOfMemoryError:
        raise TrainingStopped(out_of_memory_message(cfg), EXIT_TRAINING_FAILED) from None
    raise_if_stopped_early(signals, losses, checkpoint_dir(cfg), cfg.learning_rate)  # exits 130 / 143 / 1, naming the checkpoint
    tokens = trainer.state.num_input_tokens_seen - trainer._initial_num_input_tokens_seen
    metrics = dict(result.metrics) | peak_memory()
    metrics["train_tokens_per_second"] = round(tokens / metrics["train_runtime"], 1)
    steady = speed.tokens_per_second()
    if steady is not None:
        metrics["train_tokens_per_second_steady"] = round(steady, 1)
    if has_val:
        metrics |= trainer.evaluate()
        metrics["eval_perplexity"] = float(torch.exp(torch.tensor(metrics["eval_loss"])))
    if trainer.is_world_process_zero():
        print("[main] " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    return metrics


class SteadyThroughput(TrainerCallback):
    """Training tokens/s (all processes) from the end of step `skip` to the last step.

    The first steps carry one-time costs (flex_attention and Triton compilation, allocator warm-up) that
    train_tokens_per_second averages in; this is the rate the rest of a long run goes at. Evaluations and
    checkpoint saves between those steps are included.
    """

    def __init__(self, skip: int = 3):
        self.skip = skip
        self.marks: list[tuple[float, int]] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append((time.perf_counter(), state.num_input_tokens_seen))  # the count is summed over processes

    def tokens_per_second(self) -> float | None:
        if len(self.marks) < self.skip + 2:
            return None
        (t0, n0), (t1, n1) = self.marks[self.skip], self.marks[-1]
        return (n1 - n0) / (t1 - t0)


def describe_batch(args: TrainingArguments, cfg: TrainConfig) -> str:
    """The global batch of one optimizer step: processes x micro-batch per process x accumulation steps."""
    per_process = f"1 packed row of <= {cfg.pack_tokens} tokens" if cfg.packing else f"{args.per_device_train_batch_size} records"
    total = args.world_size * args.per_device_train_batch_size * args.gradient_accumulation_steps
    return (f"global batch per optimizer step: {args.world_size} process(es) x {per_process} x {args.gradient_accumulation_steps} "
            f"accumulation step(s) = {total} {'packed rows' if cfg.packing else 'records'}; learning rate {cfg.learning_rate:g} (not scaled)")


def warn_if_other_process_count(checkpoint: str | None, world_size: int) -> None:
    """--resume continues exactly only with the number of processes that wrote the checkpoint (one RNG state each)."""
    saved = len([f for f in os.listdir(checkpoint) if f.startswith("rng_state")]) if checkpoint else 0
    if saved and saved != world_size:
        print(f"[main] warning: {checkpoint} was written by {saved} process(es), this run has {world_size}: training continues, "
              "but the data order and the RNG streams differ from an uninterrupted run; relaunch with the same number for an exact resume")


def save_outputs(trainer: Trainer, tokenizer, cfg: TrainConfig, metrics: dict[str, Any]) -> None:
    out = cfg.output_dir
    # FSDP: every process hands in its shards (a collective), rank 0 gets the full state dict (on the CPU); else None
    state_dict = trainer.accelerator.get_state_dict(trainer.model) if trainer.is_fsdp_enabled else None
    if not trainer.is_world_process_zero():  # several processes (DDP/FSDP): only the main one writes and reports
        return
    with staged(out) as tmp:  # written to OUTPUT_DIR/.saving, then moved in place file by file (os.replace)
        # adapter_config.json + adapter_model.safetensors (PEFT format); PEFT keeps only the LoRA weights of state_dict
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        save_config(cfg, os.path.join(tmp, CONFIG_NAME))
        with open(os.path.join(tmp, "metrics.json"), "w", encoding="utf-8") as fh:
            json.dump(metrics | {"versions": versions()}, fh, indent=2)
        plot_losses(trainer.state.log_history, os.path.join(tmp, "loss_curve.png"))
    print(f"[main] adapter, tokenizer, {CONFIG_NAME}, metrics.json and loss_curve.png written to {out}/")
    print(f"[main] compare it with the base model: python eval.py --adapter {out}")


def versions() -> dict[str, str]:
    import bitsandbytes
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__}


def plot_losses(history: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train"), ("eval_loss", "validation")):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o" if key == "eval_loss" else None, label=label)
    ax.set(xlabel="optimizer step", ylabel="cross-entropy loss (response tokens)", title="Training and validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
