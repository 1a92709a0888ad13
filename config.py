"""The typed configuration: one dataclass per entry point, each field with a default and a doc line.

The dataclasses ARE the schema. `parse_config` turns them into command-line flags
(`--help` lists every field with its default), layers a YAML preset or file under the
flags (CLI wins), and validates the result in `__post_init__`. The resolved config is
saved beside every adapter (`train_config.yaml`), so eval.py knows exactly which base
model, template and data split an adapter was trained with.

Precedence, lowest to highest: dataclass defaults < `--preset` < `--config FILE` < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from cli import OneLineErrorParser, UserError

ROOT = os.path.dirname(os.path.abspath(__file__))
CONFIG_DIR = os.path.join(ROOT, "configs")
PRESETS = ("smoke", "demo")
CONFIG_NAME = "train_config.yaml"  # the resolved TrainConfig, saved beside every adapter
FINGERPRINTS_NAME = "data_fingerprints.json"  # content hashes of the training and validation records, beside every adapter
COPIES = ("yes", "fp8", "fp8_backward")  # --dense-base values that copy the 4-bit base (FP8ES: those with FP8 products)
FP8ES = ("fp8", "fp8_backward", "fp8_backward_4bit")  # fp8_backward_4bit: no copy, the 4-bit base's input gradients in FP8
LLAMA_LINEAR_LAYERS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ConfigError(UserError, ValueError):
    """A user error in flags or config files: reported as one line, exit code 2."""


def doc(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its one-line documentation attached."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Everything `python main.py` needs. Defaults reproduce the QLoRA recipe on Llama-2-7B."""

    # --- what to train -------------------------------------------------------------
    base_model: str = doc(
        "meta-llama/Llama-2-7b-hf",
        "Hub id or local directory of the base model (gated: accept Meta's licence on the hub first).",
    )
    gguf_file: str | None = doc(
        None,
        "GGUF file name inside --base-model's directory (dequantized to float at load time); the demo preset's offline path.",
    )
    dataset: str = doc(
        "databricks/databricks-dolly-15k",
        "Hub dataset id, or a local .jsonl/.json/.parquet/.csv with columns instruction, context, response, category.",
    )
    output_dir: str = doc("llama_adapter", "Where the adapter, tokenizer, resolved config, metrics, loss curve and checkpoints go.")
    # --- data ---------------------------------------------------------------------------
    max_length: int = doc(
        1024,
        "Longest tokenized record (prompt + response + EOS); longer ones lose context first, then the response's end (dolly: 2%"
        " of records exceed 1024).",
    )
    val_fraction: float = doc(0.05, "Share of records held out for validation, stratified by category and seeded.")
    max_records: int | None = doc(None, "Use only the first N records of the dataset (before the split); for quick runs.")
    skip_bad_records: bool = doc(
        False,
        "Skip and count bad records (malformed JSON, not UTF-8, a missing column, a number/list/object in a text column) "
        "instead of stopping at the first with its file and line.",
    )
    # --- model / LoRA ---------------------------------------------------------------------
    quantization: Literal["4bit", "8bit", "none"] = doc(
        "4bit",
        "Base weights: 4bit = NF4 + double quantization (QLoRA paper), 8bit = LLM.int8, none = bf16/fp16 on GPU, fp32 on CPU.",
    )
    quant_storage: Literal["uint8", "bfloat16"] = doc(
        "uint8",
        "dtype the packed 4-bit weights are stored in: bfloat16 for FSDP (configs/accelerate/fsdp_qlora.yaml), so the 4-bit "
        "weights shard with the bf16 params; uint8 otherwise.",
    )
    dense_base: Literal["auto", "yes", "fp8", "fp8_backward", "fp8_backward_4bit", "no"] = doc(
        "auto",
        "Train against a 16-bit copy of the 4-bit base: the same NF4 weight values, dequantized once at load, so each linear "
        "layer runs one 16-bit matmul instead of unpacking its weight again in every forward and backward pass (fewer "
        "kernels, less host work per micro-batch; 1.046x on an H200). Costs 2 bytes per base weight instead of ~0.5 (computed: "
        "+9 GiB for 7B once the 4-bit weights are freed; the plan counts 12). auto: on one CUDA GPU, when --memory-plan auto's "
        "plan still fits with it (never a smaller micro-batch for it), fp8_backward on a Hopper or newer card with compiled "
        "layers (1.15x yes on an H200, the same losses within noise: BENCHMARKS.md), yes otherwise; where no copy fits, "
        "fp8_backward_4bit with CUDA graphs on such a card without checkpointing (a 24 GB plan), no otherwise. "
        "Needs --quantization 4bit; not "
        "under FSDP. The adapter trained is the same (tests: equal losses and gradients). fp8: the copy held in float8 e4m3 "
        "(a scale per row, two orientations: the same 2 bytes per weight) and every base matmul run in FP8 with its input "
        "or gradient cast to e4m3 per token (fp8.py; Hopper or newer, or the CPU); the LoRA branch stays 16-bit. A change "
        "of numerics (~3-4% relative error per product), not the NF4 values exactly: see BENCHMARKS.md for its speed and loss. "
        "fp8_backward: the forward pass exactly the 16-bit copy's, only the input gradient through each base weight in FP8 "
        "(W^T held in e4m3 beside the 16-bit W: 3 bytes per base weight); the LoRA gradients are then rounded, not the loss. "
        "fp8_backward_4bit: no copy; the forward is the 4-bit base's own, and each backward pass casts W^T to e4m3 straight "
        "from the packed NF4 weight (nf4_kernel.py, two Triton kernels; bit-equal to fp8_backward's W^T) for an FP8 input "
        "gradient. Under a 24 GiB cap on an H200 (session 13): 1.23x the 4-bit base with CUDA graphs (--pad-to-budget "
        "--compile-mode reduce-overhead, what auto sets with it), 0.95x without them (the host launching kernels then "
        "bounds the shorter step).",
    )
    lora_r: int = doc(16, "LoRA rank (QLoRA paper uses 64 for 7B; 16 is the common PEFT recipe and 4x fewer adapter parameters).")
    lora_alpha: int = doc(32, "LoRA scaling numerator: the update is scaled by alpha / r (alpha = 2r is the PEFT convention).")
    lora_dropout: float = doc(
        0.0,
        "Dropout on the LoRA input. 0 (the QLoRA paper: 0.05): one element-wise pass less, and no worse held-out loss on the "
        "demo preset (BENCHMARKS.md).",
    )
    lora_target_modules: list[str] = doc(
        LLAMA_LINEAR_LAYERS,
        "Linear layers that get LoRA (QLoRA paper: all linear layers of the decoder).",
    )
    fp32_upcast: bool = doc(
        False,
        "With a quantized base, cast norms, embeddings and lm_head to fp32 (peft's prepare_model_for_kbit_training). Off: they "
        "stay bf16 (norms still compute in fp32 inside): less memory, faster (BENCHMARKS.md).",
    )
    trust_remote_code: bool = doc(
        False,
        "Run model code shipped with a hub repo. Off: Llama needs none; turn on only for a repo you trust.",
    )
    # --- optimisation ------------------------------------------------------------------
    epochs: float = doc(3.0, "Passes over the training split (alpaca-lora and the dolly fine-tunes use 3).")
    max_steps: int = doc(-1, "Stop after this many optimizer steps; -1 means run --epochs.")
    packing: bool = doc(
        True,
        "Padding-free batches: records packed into rows of --pack-tokens tokens, attention kept within each record "
        "(position_ids). Off: padded batches of --batch-size records.",
    )
    pack_tokens: int = doc(
        4096,
        "Tokens per packed micro-batch on each device (about 17 dolly records); must be >= --max-length. On a GPU --memory-plan "
        "auto sets it (and the accumulation) unless given.",
    )
    pack_open_rows: int = doc(
        0,
        "Packed rows kept open while packing: each record (in a seeded random order) goes into the oldest open row it fits "
        "in, else starts a new one; 1 = greedy filling. First fit over 4 fills 4,096-token rows of dolly-like records 99.35% "
        "instead of 95.1%. 0 (auto): 4 where every row is padded to the budget (--pad-to-budget: the 24 GB plan), else 1. "
        "Padded rows all cost the same, so a fuller row is more tokens for the same step: 1.03-1.07x greedy's tokens/s in "
        "four alternating pairs of runs under a 24 GiB cap (two commands, H200, session 16). Unpadded rows: 0.98x greedy at "
        "8,192 x 1 (session 12).",
    )
    tokens_per_step: int = doc(
        8192,
        "The recipe: tokens per optimizer step on each device (about 35 dolly records) that --memory-plan auto keeps on every "
        "card, as --pack-tokens x --gradient-accumulation-steps. Ignored with --memory-plan off.",
    )
    memory_plan: Literal["auto", "off"] = doc(
        "auto",
        "auto: on a CUDA GPU choose gradient checkpointing, --pack-tokens and --gradient-accumulation-steps to fit its free "
        "memory with a margin, fastest first (memory_plan.py; one [memory-plan] line). Values given by flags, --config or a "
        "preset win. off: use the fields as set. CPU, FSDP and --no-packing: off.",
    )
    compile: Literal["auto", "on", "off"] = doc(
        "auto",
        "torch.compile each decoder layer (regional, the 4-bit + LoRA layers inside; about a minute at the first steps); "
        "recompiles and graph breaks fail the run instead of falling back to eager. auto = on for one CUDA process without "
        "gradient checkpointing (1.11x on an H100, same losses: BENCHMARKS.md) or with --dense-base fp8 (checkpointing or "
        "not: eager FP8 casts were 2x slower on an H200), off otherwise.",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = doc(
        "default",
        "torch.compile mode for --compile; max-autotune: reduce-overhead's CUDA graphs plus Inductor's autotuning of the "
        "products it sees (LoRA's, FP8's _scaled_mm; not bitsandbytes' 4-bit product) and of its own kernels' launch configs "
        "(coordinate descent), cached in the Inductor cache. Under a 24 GiB cap on an H200 (session 16): 0.453 s per step "
        "against reduce-overhead's 0.456-0.465 s in other commands of the session (no same-command pair), after a 273 s first "
        "step (228 s of autotuning), so it stays opt-in. reduce-overhead adds CUDA graphs (one shape: use it with "
        "--pad-to-budget; with accumulation each micro-batch replays the same graphs into zeroed gradients). Measured on an "
        "H200 (BENCHMARKS.md): 1.27x default at 2,048-token micro-batches (1.49-1.71x with fp8_backward; a fixed 0.041-0.046 "
        "s per micro-batch instead of 0.12-0.14 s), equal at 8,192 (default's) and at 4,096 x 2 on a 4-bit base, 0.95x at "
        "4,096 x 2 with the 16-bit copy; not the default, except where --memory-plan auto picks --dense-base "
        "fp8_backward_4bit (no copy fits on a Hopper card: 1.23x the 4-bit base under a 24 GiB cap together). With gradient "
        "checkpointing its recording failed (session 9, an error, not a fallback).",
    )
    pad_to_budget: bool = doc(
        False,
        "Pad every packed row to exactly --pack-tokens (pad id, label -100, its own positions): one shape per micro-batch for "
        "--compile / CUDA graphs. With varlen attention the record bounds get one shape too (a fixed count of records, the "
        "padding cut into records of at most --max-length). Padding is computed, never trained on.",
    )
    attention: Literal["auto", "sdpa", "flex_attention", "varlen", "eager"] = doc(
        "auto",
        "Attention kernel for training. auto, with packing on CUDA: varlen in one process where it can run, else "
        "flex_attention (its block-sparse mask skips the other records); sdpa elsewhere. varlen (packing, CUDA sm80+, "
        "torch >= 2.10): PyTorch's variable-length FlashAttention over each row's record bounds, no mask; on one H200 "
        "1.04x flex_attention's speed, 16 s of compilation instead of 75, the same losses (BENCHMARKS.md).",
    )
    liger: bool = doc(
        True,
        "Liger Triton kernels on CUDA: fused RMSNorm, RoPE, SwiGLU and a linear cross-entropy that never materializes the "
        "32k-vocab logits. Ignored on the CPU.",
    )
    batch_size: int = doc(4, "Records per device per micro-batch when --no-packing (with packing, one packed row per micro-batch).")
    gradient_accumulation_steps: int = doc(
        1,
        "Micro-batches per optimizer step. Packed: one 4096-token row is ~17 records, close to the QLoRA paper's 16; with --no-"
        "packing use 4 with --batch-size 4.",
    )
    learning_rate: float = doc(2e-4, "Peak learning rate (QLoRA paper: 2e-4 for 7B).")
    lr_scheduler: str = doc("cosine", "transformers scheduler name: cosine, linear, constant_with_warmup, ...")
    warmup_ratio: float = doc(0.03, "Share of steps spent warming the learning rate up from 0 (QLoRA paper: 0.03).")
    weight_decay: float = doc(0.0, "AdamW weight decay on the LoRA weights (QLoRA paper: 0).")
    max_grad_norm: float = doc(0.3, "Gradient clipping norm (QLoRA paper: 0.3).")
    optimizer: str = doc(
        "adamw_torch_fused",
        "transformers optimizer name: adamw_torch_fused (Trainer's own default: one kernel per step, no per-tensor host work), "
        "adamw_torch, paged_adamw_8bit, adamw_bnb_8bit, ...",
    )
    gradient_checkpointing: bool = doc(
        True,
        "Recompute activations in the backward pass: about 1.75x slower, several times less memory (--memory-plan auto "
        "chooses it on a GPU unless given).",
    )
    seed: int = doc(42, "Seed for the split, LoRA initialisation, dropout and data order.")
    # --- bookkeeping -------------------------------------------------------------------
    eval_steps: int = doc(200, "Compute the held-out loss every N optimizer steps (0: only at the end).")
    save_steps: int = doc(200, "Write a checkpoint every N optimizer steps.")
    save_total_limit: int = doc(3, "Keep only the newest N checkpoints.")
    logging_steps: int = doc(10, "Log loss, learning rate, tokens/s and peak memory every N steps.")
    signal_check_steps: int = doc(
        1,
        "Several processes: agree on a Ctrl-C/SIGTERM every N optimizer steps (and at each save/stop), an 8-byte CPU all-reduce;"
        " a signal then stops within N steps.",
    )
    dataloader_workers: int = doc(0, "Worker processes feeding batches (records are pre-tokenized, so 0 is rarely slower).")
    resume: bool = doc(False, "Continue from the newest checkpoint in OUTPUT_DIR/checkpoints.")
    fallback: bool = doc(
        True,
        "When the default 7B base cannot run here (no CUDA GPU, or hub unreachable and not cached), run the demo preset instead"
        " of stopping.",
    )

    def __post_init__(self) -> None:
        checks = [
            ("max_length", self.max_length >= 16, "must be at least 16"),
            ("val_fraction", 0.0 <= self.val_fraction < 1.0, "must be in [0, 1)"),
            ("max_records", self.max_records is None or self.max_records > 0, "must be positive"),
            ("lora_r", self.lora_r > 0, "must be positive"),
            ("lora_alpha", self.lora_alpha > 0, "must be positive"),
            ("lora_dropout", 0.0 <= self.lora_dropout < 1.0, "must be in [0, 1)"),
            ("lora_target_modules", len(self.lora_target_modules) > 0, "must name at least one layer"),
            ("epochs", self.epochs > 0, "must be positive"),
            ("max_steps", self.max_steps == -1 or self.max_steps > 0, "must be -1 or positive"),
            ("batch_size", self.batch_size > 0, "must be positive"),
            ("pack_open_rows", self.pack_open_rows >= 0, "must be >= 0 (0: auto)"),
            ("pack_tokens", self.pack_tokens >= self.max_length, "must be >= max_length, so that every record fits a packed row"),
            ("attention", self.attention != "varlen" or self.packing, "varlen needs --packing (it reads each packed row's record bounds)"),
            ("dense_base", self.dense_base in ("auto", "no") or self.quantization == "4bit",
             f"{self.dense_base} needs --quantization 4bit (it {'is a copy of' if self.dense_base in COPIES else 'wraps the layers of'} "
             "the 4-bit base)"),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps > 0, "must be positive"),
            ("tokens_per_step", self.tokens_per_step >= self.max_length, "must be >= max_length"),
            ("learning_rate", self.learning_rate > 0, "must be positive"),
            ("warmup_ratio", 0.0 <= self.warmup_ratio < 1.0, "must be in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("max_grad_norm", self.max_grad_norm > 0, "must be positive"),
            ("eval_steps", self.eval_steps >= 0, "must be >= 0"),
            ("save_steps", self.save_steps > 0, "must be positive"),
            ("save_total_limit", self.save_total_limit > 0, "must be positive"),
            ("logging_steps", self.logging_steps > 0, "must be positive"),
            ("signal_check_steps", self.signal_check_steps > 0, "must be positive"),
            ("dataloader_workers", self.dataloader_workers >= 0, "must be >= 0"),
        ]
        _check_literals(self)
        _raise_first_failed(self, checks)

    @property
    def open_rows(self) -> int:
        """--pack-open-rows resolved: as given, or (0: auto) first fit over 4 rows where every row is padded to the budget."""
        return self.pack_open_rows or (4 if self.pad_to_budget else 1)


@dataclass
class EvalConfig:
    """Everything `python eval.py` needs: which adapter to compare with its base, on what."""

    adapter: str = doc("llama_adapter", "Adapter directory written by main.py (its train_config.yaml names the base model).")
    base_model: str | None = doc(None, "Override the base model recorded in the adapter (must be the same architecture).")
    question: str | None = doc(None, "Ask this instruction instead of the predefined questions.")
    context: str = doc("", "Optional context (input) for --question.")
    quantization: Literal["4bit", "8bit", "none"] | None = doc(
        None,
        "Base weights at inference; default: what the adapter was trained with.",
    )
    max_new_tokens: int = doc(256, "Longest answer, in tokens.")
    batch_size: int | None = doc(
        None,
        "Questions generated together (longest first; halved automatically on out-of-memory). Default: sized from free GPU "
        "memory (KV cache + prefill per row), 64 on a CPU.",
    )
    engine: Literal["auto", "padded", "evict", "static", "compiled", "flash", "compiled_flash", "triton", "compiled_triton",
                    "continuous"] = doc(
        "auto",
        "How answers are decoded. auto (greedy): on a GPU of sm80+ triton, or compiled_triton when a call asks for at least "
        "131,072 prompts x --max-new-tokens (eval.py on dolly's validation split does), the base a 16-bit copy (see "
        "--dequantize) or in 4 bits; flash where Triton is missing; static on older cards; evict on a CPU; padded when "
        "sampling (auto falls back to evict if its engine fails). static = a static KV cache, the prompt run in groups of "
        "rows of similar length, the decode step replayed from a CUDA graph; compiled = static with the decoder layers "
        "compiled for the decode steps (fused element-wise kernels); flash / triton = static with each row attending only "
        "to its own cache positions, read in place by FlashAttention's variable-length kernel / by this project's "
        "one-query Triton kernel (decode_kernel.py); compiled_flash / compiled_triton = both options. On an H200, 256 "
        "dolly-like prompts x 256 tokens (session 10): compiled_triton 9,109 new tokens/s (47% of the card's bandwidth "
        "limit), triton 7,675, compiled_flash 6,713, flash 5,986; compiling costs ~2-4 s per process. evict = greedy, a "
        "finished answer leaves its batch at once; padded = model.generate; continuous = transformers' generate_batch "
        "(paged KV cache; measured 3.6x slower than static).",
    )
    threads: int | None = doc(None, "CPU threads for torch; default: the cores not already busy (load average), at least 1.")
    dequantize: Literal["auto", "yes", "no"] = doc(
        "auto",
        "Generate from a 16-bit copy of the 4-bit base (the same weight values, dequantized once): faster, at the memory of a "
        "16-bit copy (13 GB for 7B). auto = on a GPU with room for it.",
    )
    temperature: float = doc(0.0, "0 = greedy (reproducible); above 0 samples.")
    top_p: float = doc(1.0, "Nucleus sampling threshold when temperature > 0.")
    seed: int = doc(42, "Seed for sampling and the bootstrap.")
    split: Literal["validation", "all"] | None = doc(
        None,
        "Score answers on a dataset: validation = the held-out split main.py made (seed and fraction from the adapter's "
        "config); all = every record.",
    )
    dataset: str | None = doc(
        None,
        "Dataset to score on (hub id or local file); default: the one the adapter was trained on. Implies --split all unless "
        "--split is given.",
    )
    skip_bad_records: bool = doc(
        False,
        "Skip and count bad records in --dataset instead of stopping at the first (on by itself when scoring the adapter's own "
        "dataset and main.py skipped them).",
    )
    limit: int | None = doc(None, "Score a sample of N records (after --categories): seeded (--seed), stratified by category.")
    allow_train_overlap: bool = doc(
        False, "Score records the adapter was trained on (refused by default: they flatter the fine-tuned model; the report says so)."
    )
    stop_strings: bool = doc(
        True,
        "End both models' answers at the template's next section marker (### Instruction: / ### Input: / ### Response:) as well as at "
        "EOS, so no score rests on stopping behaviour alone. Off: EOS or --max-new-tokens only.",
    )
    categories: list[str] | None = doc(None, "Only these dolly categories, e.g. closed_qa open_qa.")
    out: str | None = doc(None, "Where report.json/.md/.html and metrics.png go; default ADAPTER/eval.")
    bootstrap_samples: int = doc(2000, "Paired bootstrap resamples for the 95% confidence intervals.")
    interactive: bool = doc(False, "A small REPL: type a question (and optional context), see both answers side by side.")

    def __post_init__(self) -> None:
        _check_literals(self)
        checks = [
            ("limit", self.limit is None or self.limit > 0, "must be positive"),
            ("bootstrap_samples", self.bootstrap_samples > 0, "must be positive"),
            ("max_new_tokens", self.max_new_tokens > 0, "must be positive"),
            ("batch_size", self.batch_size is None or self.batch_size > 0, "must be positive"),
            ("threads", self.threads is None or self.threads > 0, "must be positive"),
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
        ]
        _raise_first_failed(self, checks)


def _raise_first_failed(cfg: Any, checks: list[tuple[str, bool, str]]) -> None:
    """checks: (field, holds, rule); the first that does not hold is a one-line ConfigError naming the field and its value."""
    for name, holds, rule in checks:
        if not holds:
            raise ConfigError(f"{name} {rule} (got {getattr(cfg, name)})")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """The fields' annotations as types (`from __future__ import annotations` stores them as strings)."""
    return typing.get_type_hints(cls)


def _check_literals(cfg: Any) -> None:
    for f in dataclasses.fields(cfg):
        choices = _choices(_hints(type(cfg))[f.name])
        value = getattr(cfg, f.name)
        if choices and value is not None and value not in choices:
            raise ConfigError(f"{f.name} must be one of {', '.join(map(str, choices))} (got {value!r})")


def _choices(annotation: Any) -> tuple | None:
    tp = annotation
    for arg in (tp, *typing.get_args(tp)):
        if typing.get_origin(arg) is Literal:
            return typing.get_args(arg)
    return None


def _is_list(annotation: Any) -> bool:
    tp = annotation
    return any(typing.get_origin(a) is list for a in (tp, *typing.get_args(tp)))


def _scalar_type(annotation: Any) -> type:
    tp = annotation
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is Literal:
        return type(typing.get_args(tp)[0])
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0]
    return tp


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field: `--lora-r 8`, `--no-gradient-checkpointing`, `--lora-target-modules q_proj v_proj`."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata['help']} (default: {default})".replace("%", "%%")
        hint = _hints(cls)[f.name]
        kind = _scalar_type(hint)
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if _is_list(hint):
            kwargs["nargs"] = "+"
        parser.add_argument(flag, type=kind, choices=_choices(hint), metavar=f.name.upper(), **kwargs)


def read_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
    return data


def preset_path(name: str) -> str:
    return os.path.join(CONFIG_DIR, f"{name}.yaml")


def build_config(cls: type, layers: list[tuple[str, dict[str, Any]]]) -> Any:
    """Merge (source, values) layers in order, rejecting unknown keys with the source named."""
    names = {f.name for f in dataclasses.fields(cls)}
    merged: dict[str, Any] = {}
    for source, values in layers:
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"{source}: unknown setting(s) {', '.join(unknown)} for {cls.__name__}")
        merged.update(values)
    try:
        return cls(**merged)
    except TypeError as err:
        raise ConfigError(str(err)) from None


def split_preset(data: dict[str, Any], section: str | None) -> dict[str, Any]:
    """A preset file holds TrainConfig fields at top level and EvalConfig fields under `eval:`."""
    if section is None:
        return {k: v for k, v in data.items() if k != "eval"}
    values = dict(data.get(section) or {})
    if "output_dir" in data:  # eval.py --preset X compares the adapter that main.py --preset X wrote
        values.setdefault("adapter", data["output_dir"])
    return values


def parse_config(cls: type, argv: list[str] | None, description: str, extra: Any = None) -> tuple[Any, argparse.Namespace]:
    """Parse flags for `cls`. Returns (config, namespace with the non-config flags: preset, config, debug..., and `explicit`:
    the names of the fields set by a preset, a file or a flag rather than by their default)."""
    parser = OneLineErrorParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default=None,
                        help="Named preset from configs/: smoke = tiny random Llama, seconds on a CPU; "
                             "demo = SmolLM2-135M-Instruct, minutes on a CPU.")
    parser.add_argument("--config", default=None, help="YAML file of config fields (see configs/); flags given on the command line win.")
    parser.add_argument("--debug", action="store_true", help="Show full tracebacks instead of one-line errors.")
    if extra is not None:
        extra(parser)
    add_dataclass_flags(parser, cls)
    args = parser.parse_args(argv)
    section = "eval" if cls is EvalConfig else None
    layers: list[tuple[str, dict[str, Any]]] = []
    if args.preset:
        layers.append((preset_path(args.preset), split_preset(read_yaml(preset_path(args.preset)), section)))
    if args.config:
        layers.append((args.config, split_preset(read_yaml(args.config), section)))
    names = {f.name for f in dataclasses.fields(cls)}
    layers.append(("command line", {k: v for k, v in vars(args).items() if k in names}))
    args.explicit = {k for _, values in layers for k in values}  # set by a preset, file or flag (memory_plan keeps these)
    return build_config(cls, layers), args


def save_config(cfg: Any, path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(dataclasses.asdict(cfg), fh, sort_keys=False)


def load_train_config(path: str) -> TrainConfig:
    return build_config(TrainConfig, [(path, read_yaml(path))])
