"""Training with transformers' Trainer: its arguments, the train loop's bookkeeping, and what a finished run writes.

    trainer = build_trainer(cfg, model, tokenizer, train_ds, val_ds)
    metrics = train(trainer, cfg, has_val=True)      # Ctrl-C / SIGTERM / NaN / OOM handled (resilience.py)
    save_outputs(trainer, tokenizer, cfg, metrics)   # adapter, tokenizer, config, metrics, loss curve, README

Trainer does the loop, checkpoints, mixed precision and DDP/FSDP; this module chooses its arguments and adds
peak memory to its logs, steady tokens/s (`SteadyThroughput`), the loss curve and the adapter's README.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from compile_layers import CompileWatch, compile_decoder_layers, compile_enabled
from config import CONFIG_NAME, FINGERPRINTS_NAME, FP8ES, TrainConfig, save_config
from dataset import DocumentBounds, PaddedPackedCollator, collate_packed, make_collator, max_records_per_row
from fsdp_state import create_optimizer_state, gather_lora, load_lora, write_adapter
from memory import MemoryProbe, dump_snapshot
from resilience import (
    EXIT_TRAINING_FAILED,
    CheckpointMarker,
    StopOnNonFiniteLoss,
    StopOnSignal,
    TrainingStopped,
    checkpoint_dir,
    out_of_memory_message,
    pick_checkpoint,
    raise_if_stopped_early,
    staged,
)
from runtime import VARLEN, attention_choice, runtime


class ProjectTrainer(Trainer):
    """transformers' Trainer with two additions: peak memory in every log line (console, TensorBoard,
    trainer_state.json), and a token-weighted held-out loss.

    Trainer's own eval_loss averages the loss of each evaluation batch (a packed row), so a short row counts as
    much as a full one. Here eval_loss is the sum of the NLL over all supervised tokens / their count, and
    eval_perplexity its exp: the same definition as eval.py's report. Trainer itself logs train_tokens_per_second
    (non-padding tokens); its checkpoints are marked complete, and rotated, by resilience.CheckpointMarker.
    """

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs or "train_loss" in logs:
            logs.update(peak_memory())
        super().log(logs, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        evaluating = not model.training and hasattr(self, "_eval_sums")
        # Evaluating: the batch's own mean NLL (transformers >= 5.2x would divide by a count gathered across processes
        # and rescale it), times its supervised tokens, is its NLL sum; evaluation_loop adds the sums up.
        count = None if evaluating else num_items_in_batch
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=count)
        if evaluating:
            loss = result[0] if return_outputs else result
            tokens = (inputs["labels"][..., 1:] != -100).sum()
            self._eval_sums += torch.stack([loss.detach().float() * tokens, tokens.float()]).to(self._eval_sums.device)
        return result

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        self._eval_sums = torch.zeros(2, dtype=torch.float64, device=self.args.device)
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        nll, tokens = self.accelerator.reduce(self._eval_sums, reduction="sum").tolist()
        del self._eval_sums
        if tokens:
            output.metrics[f"{metric_key_prefix}_loss"] = nll / tokens
            output.metrics[f"{metric_key_prefix}_perplexity"] = math.exp(nll / tokens)
        return output

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under FSDP: the LoRA weights gathered (every process) and written by rank 0 in PEFT's format, as a checkpoint
        of one process holds them; Trainer's own FSDP checkpoint (pytorch_model_fsdp_0) holds none (fsdp_state.py)."""
        if not self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call)
        weights = gather_lora(self.model)
        if self.args.should_save:
            write_adapter(self.model, weights, output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """--resume under FSDP: the checkpoint's LoRA weights into every process's shards (Trainer's own load restores none)."""
        if not self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_lora(self.model if model is None else model, resume_from_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """--resume under FSDP: the optimizer gets its state first, else the sharded load restores none of it (fsdp_state.py)."""
        if self.is_fsdp_enabled and checkpoint is not None:
            create_optimizer_state(self.optimizer)
        super()._load_optimizer_and_scheduler(checkpoint)

    bounds_vary = False  # build_trainer: compiled layers over rows whose record count varies (varlen without --pad-to-budget)

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        inputs = super()._prepare_inputs({k: v for k, v in inputs.items() if k != "num_tokens"})  # the host-side count stays here
        return mark_bounds_dynamic(inputs) if self.bounds_vary else inputs

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        """Tokens seen, counted on the host for packed rows (one process): Trainer's count reads the GPU every micro-batch.

        A packed row is all real tokens unless padded to its budget (PaddedPackedCollator says how many are real).
        """
        if self.args.world_size > 1 or "attention_mask" in inputs or self.args.include_num_input_tokens_seen == "no":
            return super()._track_num_input_tokens(inputs)
        self.state.num_input_tokens_seen += inputs.get("num_tokens", inputs["input_ids"].numel())

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """Trainer's 6 x tokens x parameters, with the parameter count taken once (Trainer walks every parameter per micro-batch)."""
        if not hasattr(self, "_parameters_no_embeddings"):
            self._parameters_no_embeddings = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs["input_ids"].numel() * self._parameters_no_embeddings


def mark_bounds_dynamic(inputs: dict[str, Any]) -> dict[str, Any]:
    """The record bounds' length (records per row + 1) symbolic from the first compile of the layers. Else Dynamo keeps
    it static until it differs from the first row's, and a row whose record count first changes after its length did
    makes one more compiled variant (and compile seconds in the middle of training)."""
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        if key in inputs:
            torch._dynamo.maybe_mark_dynamic(inputs[key], 0)
    return inputs


def peak_memory() -> dict[str, float]:
    if torch.cuda.is_available():
        return {"peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    return {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def build_trainer(cfg: TrainConfig, model, tokenizer, train_ds, val_ds) -> Trainer:
    rt = runtime()
    evaluate = len(val_ds) > 0 and cfg.eval_steps > 0
    compiled = compile_enabled(cfg.compile, rt, cfg.gradient_checkpointing, cfg.dense_base in FP8ES)
    args = TrainingArguments(
        **checkpointing_args(cfg.gradient_checkpointing),
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
        # Liger's RMSNorm/RoPE/SwiGLU dispatchers are torch.compiler.disable'd (a graph break inside every compiled layer,
        # measured on the H100): with --compile, Inductor fuses those element-wise ops itself; the fused cross-entropy stays.
        liger_kernel_config={"rope": False, "rms_norm": False, "swiglu": False} if compiled else None,
        dataloader_pin_memory=rt.cuda,
        use_cpu=not rt.cuda,  # on a CPU, several processes (torchrun, accelerate launch with ddp.yaml) then train with DDP over gloo
    )
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", os.path.join(cfg.output_dir, "tensorboard"))
    callbacks: list[TrainerCallback] = [CheckpointMarker(keep=cfg.save_total_limit), MemoryProbe()]  # probe: LLAMA_DOLLY_MEMORY_PROBE
    if compiled:  # compiled lazily at the first step; Liger's patches (Trainer init) are traced too
        callbacks.append(CompileWatch(compile_decoder_layers(model, cfg.compile_mode, dynamic=False if cfg.pad_to_budget else None)))
    trainer = ProjectTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds if len(val_ds) else None,
        data_collator=collator(cfg, tokenizer, (train_ds, val_ds)), processing_class=tokenizer, callbacks=callbacks,
    )
    trainer.bounds_vary = compiled and not cfg.pad_to_budget
    return trainer


def collator(cfg: TrainConfig, tokenizer, rows: tuple = ()):
    """One packed row per micro-batch (padded to --pack-tokens with --pad-to-budget), or padded batches of records.

    varlen with --pad-to-budget and the packed rows given: the record bounds get one shape too (DocumentBounds' slots:
    the most records a row holds + the padding's records of at most --max-length tokens each), so every micro-batch has
    one shape and --compile-mode reduce-overhead can replay it from a CUDA graph."""
    if not cfg.packing:
        return make_collator(tokenizer)
    varlen = attention_choice(cfg.attention, cfg.packing, runtime()) == VARLEN
    if not cfg.pad_to_budget:
        return DocumentBounds(collate_packed, longest=cfg.max_length) if varlen else collate_packed
    fixed = varlen and bool(rows)  # the record bounds in one shape too
    packed = PaddedPackedCollator(cfg.pack_tokens, tokenizer.pad_token_id, cfg.max_length if fixed else None)
    if not fixed:
        return DocumentBounds(packed, longest=cfg.max_length) if varlen else packed
    slots = max_records_per_row(*rows) + -(-cfg.pack_tokens // cfg.max_length)  # + the padding's records
    return DocumentBounds(packed, slots, cfg.max_length)


def checkpointing_args(on: bool) -> dict[str, Any]:
    """Activation (gradient) checkpointing for TrainingArguments, under the name this transformers version uses.

    transformers 5.2x renamed gradient_checkpointing* to activation_checkpointing* (the old names warn); 5.17 knows only the old.
    """
    name = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else "gradient_checkpointing"
    return {name: on, f"{name}_kwargs": {"use_reentrant": False}}


def train(trainer: Trainer, cfg: TrainConfig, has_val: bool) -> dict[str, Any]:
    checkpoint = pick_checkpoint(checkpoint_dir(cfg)) if cfg.resume else None  # the newest complete one
    if checkpoint:
        print(f"[main] resuming from {checkpoint}")
    if trainer.is_world_process_zero():
        print("[main] " + describe_batch(trainer.args, cfg))
        warn_if_other_process_count(checkpoint, trainer.args.world_size)
    signals, losses, speed = StopOnSignal(cfg.signal_check_steps), StopOnNonFiniteLoss(), SteadyThroughput()
    for callback in (signals, losses, speed):
        trainer.add_callback(callback)
    try:
        with signals.handling_signals():  # Ctrl-C / SIGTERM: a checkpoint at the end of the step, then stop
            result = trainer.train(resume_from_checkpoint=checkpoint)
    except torch.cuda.OutOfMemoryError:
        dump_snapshot("oom")  # with LLAMA_DOLLY_MEMORY_SNAPSHOT=1: who held the memory (memory.py)
        raise TrainingStopped(out_of_memory_message(cfg), EXIT_TRAINING_FAILED) from None
    raise_if_stopped_early(signals, losses, checkpoint_dir(cfg), cfg.learning_rate)  # exits 130 / 143 / 1, naming the checkpoint
    tokens = trainer.state.num_input_tokens_seen - trainer._initial_num_input_tokens_seen
    metrics = dict(result.metrics) | peak_memory()
    metrics["train_tokens_per_second"] = round(tokens / metrics["train_runtime"], 1)
    steady = speed.tokens_per_second()
    if steady is not None:
        metrics["train_tokens_per_second_steady"] = round(steady, 1)
    watch = next((c for c in trainer.callback_handler.callbacks if isinstance(c, CompileWatch)), None)
    if watch is not None:
        metrics["compile"] = watch.report
    if has_val:
        metrics |= trainer.evaluate()  # eval_loss and eval_perplexity: token-weighted (ProjectTrainer)
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
            f"accumulation step(s) = {total} {'packed rows' if cfg.packing else 'records'}; "
            f"learning rate {cfg.learning_rate:g} (not scaled)")


def warn_if_other_process_count(checkpoint: str | None, world_size: int) -> None:
    """--resume continues exactly only with the number of processes that wrote the checkpoint (one RNG state each)."""
    saved = len([f for f in os.listdir(checkpoint) if f.startswith("rng_state")]) if checkpoint else 0
    if saved and saved != world_size:
        print(f"[main] warning: {checkpoint} was written by {saved} process(es), this run has {world_size}: training continues, "
              "but the data order and the RNG streams differ from an uninterrupted run; relaunch with the same number for an exact resume")


def save_outputs(trainer: Trainer, tokenizer, cfg: TrainConfig, metrics: dict[str, Any], fingerprints: dict[str, list[str]]) -> None:
    out = cfg.output_dir
    # FSDP: every process hands in its shards of the LoRA weights (collectives), rank 0 gets them whole (on its CPU)
    lora = gather_lora(trainer.model) if trainer.is_fsdp_enabled else None
    if not trainer.is_world_process_zero():  # several processes (DDP/FSDP): only the main one writes and reports
        return
    with staged(out) as tmp:  # written to OUTPUT_DIR/.saving, then moved in place file by file (os.replace)
        # adapter_config.json + adapter_model.safetensors (PEFT format)
        if lora is not None:
            write_adapter(trainer.model, lora, tmp)
        else:
            trainer.accelerator.unwrap_model(trainer.model).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_config(cfg, os.path.join(tmp, CONFIG_NAME))
        with open(os.path.join(tmp, "metrics.json"), "w", encoding="utf-8") as fh:
            json.dump(metrics | {"versions": versions()}, fh, indent=2)
        write_adapter_readme(tmp, cfg, metrics, trainer.state.global_step)
        with open(os.path.join(tmp, FINGERPRINTS_NAME), "w", encoding="utf-8") as fh:
            json.dump(fingerprints, fh)  # eval.py refuses to score these training records, and finds the held-out ones
        plot_losses(trainer.state.log_history, os.path.join(tmp, "loss_curve.png"))
    print(f"[main] adapter, tokenizer, {CONFIG_NAME}, metrics.json, loss_curve.png and README.md written to {out}/")


def versions() -> dict[str, str]:
    import bitsandbytes
    import peft
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
    }


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


def write_adapter_readme(folder: str, cfg: TrainConfig, metrics: dict[str, Any], steps: int) -> None:
    """README.md of the adapter folder (replacing PEFT's blank model card): which base it belongs to, and how to use it."""
    loss = metrics.get("eval_loss")
    held_out = "n/a" if loss is None else f"{loss:.4f} (perplexity {math.exp(loss):.2f})"
    text = f"""# LoRA adapter for {cfg.base_model}

This adapter only works on top of **{cfg.base_model}** ({cfg.quantization} base, LoRA r={cfg.lora_r} on
{", ".join(cfg.lora_target_modules)}), trained on {cfg.dataset} by `python main.py` (the full settings are in
{CONFIG_NAME}; speed, losses and library versions in metrics.json).

- {steps} optimizer steps; mean training loss {metrics.get("train_loss", float("nan")):.4f}
- held-out loss, token-weighted (NLL summed over the responses' tokens / their count): {held_out}

    python eval.py --adapter {folder_name(cfg.output_dir)}          # base vs fine-tuned answers, side by side
    from model import Llama; Llama.load_pretrained_model("{folder_name(cfg.output_dir)}").ask_model(question)
"""
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as fh:
        fh.write(text)


def folder_name(path: str) -> str:
    return os.path.relpath(path) if not os.path.relpath(path).startswith("..") else path
