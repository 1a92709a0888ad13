"""--memory-plan auto: gradient checkpointing on/off, tokens per micro-batch and gradient accumulation for this GPU.

    plan = plan_memory(total_bytes, free_bytes)             # pure arithmetic: tests feed it fake cards
    cfg = apply_memory_plan(cfg, explicit)                  # main.py: on CUDA, before the model is loaded

The recipe (`tokens_per_step` tokens per optimizer step) is the same on every card; only how it is split
into micro-batches x accumulation steps, and whether activations are recomputed, depends on the memory.
Flags given explicitly (or by a preset / --config file) win: the planner only fills in the others.

Calibration (H100, Llama-2-7B QLoRA: NF4 + double quant, bf16, LoRA r=16 on all 7 linears, Liger incl. fused
linear cross-entropy, flex attention, one packed row per micro-batch, torch.cuda.max_memory_allocated):
    no GC:  2048 tok 12.2 GiB, 4096 tok 20.3 GiB, 8192 tok 36.7 GiB;   GC: 4096 tok 5.8 GiB
Model: peak = static (weights + LoRA training state) + tokens x per_token, per_token scaled by the architecture:
    no GC: NOGC_BYTES_PER_LAYER_HIDDEN x layers x hidden
    GC:    (2 x layers + GC_EXTRA_PER_HIDDEN) x hidden  (one bf16 checkpoint per layer + one layer's recompute)
fitted with the static part computed from the architecture (4.20 GiB for 7B), taking the largest per-token value
over the points, so the model never under-predicts a measured point. --dense-base (a 16-bit copy of the 4-bit base
for training; fp8_backward: + its e4m3 transpose) adds the copy's size to the peak (dense_copy_gib, x1.5). Where no copy
fits on a Hopper card without checkpointing, auto takes fp8_backward_4bit (nothing held) and CUDA graphs (--pad-to-budget
--compile-mode reduce-overhead): the plan then sets those two fields as well.
"""

from __future__ import annotations

import dataclasses

from cli import UserError

GIB = 2**30
# Calibration points: (tokens per micro-batch, gradient checkpointing, peak GiB) for LLAMA2_7B.
CALIBRATION = [(2048, False, 12.2), (4096, False, 20.3), (8192, False, 36.7), (4096, True, 5.8)]
FIELDS = ("gradient_checkpointing", "pack_tokens", "gradient_accumulation_steps", "dense_base")  # what the plan sets


class PlanError(UserError, ValueError):
    """Nothing fits this GPU: one line saying what to do."""


@dataclasses.dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    kv_hidden: int | None = None  # num_key_value_heads x head_dim (GQA); None = hidden
    tied_embeddings: bool = False

    @property
    def linear_params(self) -> float:
        kv = self.kv_hidden or self.hidden
        return self.layers * (2 * self.hidden * self.hidden + 2 * self.hidden * kv + 3 * self.hidden * self.intermediate)

    @property
    def params(self) -> float:
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.linear_params + embeddings + (2 * self.layers + 1) * self.hidden

    @property
    def fp8_sizes(self) -> bool:
        """Every linear weight's sizes divisible by 16, as FP8 matmuls need (fp8.Fp8Linear)."""
        return all(n % 16 == 0 for n in (self.hidden, self.intermediate, self.kv_hidden or self.hidden))

    def lora_params(self, r: int) -> float:
        kv = self.kv_hidden or self.hidden
        h, i = self.hidden, self.intermediate
        return self.layers * r * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 2 + (i + h))  # q,o ; k,v ; gate,up ; down


LLAMA2_7B = ModelShape(layers=32, hidden=4096, intermediate=11008, vocab=32000)


def static_bytes(shape: ModelShape, quantization: str = "4bit", lora_r: int = 16) -> float:
    """Weights + LoRA parameters, gradients and AdamW state (fp32: 4 + 4 + 8 bytes per LoRA parameter)."""
    per_linear = {"4bit": 0.5 + 1 / 64 + 4 / (64 * 256), "8bit": 1.0 + 4 / 4096, "none": 2.0}[quantization]  # NF4 + double-quant absmax
    other = shape.params - shape.linear_params  # embeddings, lm_head, norms: bf16
    return shape.linear_params * per_linear + other * 2 + shape.lora_params(lora_r) * 16


def dense_copy_gib(shape: ModelShape) -> float:
    """--dense-base: the 16-bit copy of the linear weights, counted on top of the 4-bit peak. An upper bound: the 4-bit
    weights are freed once the copy is made (loading.dequantize_for_training), 3.1 GiB for 7B. Measured (H200, session 6,
    before that function collected them): 48.3 GiB peak with the copy vs 37.3 without, +11.0 (this bound: +12.1)."""
    return shape.linear_params * 2 / GIB


def _fit() -> tuple[float, float]:
    base = static_bytes(LLAMA2_7B)
    layers, hidden = LLAMA2_7B.layers, LLAMA2_7B.hidden
    nogc = max((gib * GIB - base) / t / (layers * hidden) for t, gc, gib in CALIBRATION if not gc)
    gc_extra = max((gib * GIB - base) / t / hidden - 2 * layers for t, gc, gib in CALIBRATION if gc)
    return nogc, gc_extra


NOGC_BYTES_PER_LAYER_HIDDEN, GC_EXTRA_PER_HIDDEN = _fit()  # ~32.5 bytes and ~38.5 (x hidden) for the 7B calibration


def per_token_bytes(shape: ModelShape, gradient_checkpointing: bool, fused_cross_entropy: bool = True) -> float:
    if gradient_checkpointing:
        b = (2 * shape.layers + GC_EXTRA_PER_HIDDEN) * shape.hidden
    else:
        b = NOGC_BYTES_PER_LAYER_HIDDEN * shape.layers * shape.hidden
    if not fused_cross_entropy:  # without Liger's fused linear CE: bf16 logits + fp32 upcast + fp32 grad
        b += shape.vocab * 10
    return b


def predict_peak_gib(shape: ModelShape, tokens: int, gradient_checkpointing: bool, quantization: str = "4bit", lora_r: int = 16,
                     fused_cross_entropy: bool = True) -> float:
    per_token = per_token_bytes(shape, gradient_checkpointing, fused_cross_entropy)
    return (static_bytes(shape, quantization, lora_r) + tokens * per_token) / GIB


@dataclasses.dataclass(frozen=True)
class TimeModel:
    """Seconds per micro-batch = (overhead + seconds_per_token x real tokens) x (gc_factor with GC).

    7B H100 figures before issue 12: 3,779 tok -> 0.42 s, 8,114 tok -> 0.60 s without GC; GC about 1.75x slower.
    Only the choice between plans that fit depends on it; re-fit from bench/gpu_train.sh's fixed_overhead_s.
    """

    overhead_s: float = 0.263
    seconds_per_token: float = 4.15e-5
    gc_factor: float = 1.75

    def tokens_per_s(self, tokens: int, gc: bool, fill: float = 0.93) -> float:
        real = tokens * fill  # packed rows are ~93% full
        return real / ((self.overhead_s + self.seconds_per_token * real) * (self.gc_factor if gc else 1.0))


@dataclasses.dataclass(frozen=True)
class Plan:
    gradient_checkpointing: bool
    pack_tokens: int
    gradient_accumulation_steps: int
    predicted_peak_gib: float
    budget_gib: float
    usable_gib: float
    fits: bool = True
    card: str = "GPU"
    explicit: tuple[str, ...] = ()
    dense_base: str = "no"  # "yes"/"fp8"/"fp8_backward": the 4-bit base copied once (--dense-base), in the peak
    cuda_graphs: bool = False  # with fp8_backward_4bit: --pad-to-budget --compile-mode reduce-overhead (CUDA graphs)

    def line(self) -> str:
        tokens = self.pack_tokens * self.gradient_accumulation_steps
        given = f" ({', '.join(self.explicit)} as given)" if self.explicit else ""
        warn = "" if self.fits else f"; WARNING: over the budget, expect out-of-memory (flags win over the plan{given})"
        return (f"[memory-plan] {self.card}, {self.usable_gib:.1f} GiB usable -> peak budget {self.budget_gib:.1f} GiB: "
                f"gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}, {self.pack_tokens} tokens per micro-batch "
                f"x {self.gradient_accumulation_steps} accumulation = {tokens} tokens per optimizer step, "
                f"{COPY_WORDS.get(self.dense_base, '16-bit copy of the base off')}"
                f"{', CUDA graphs over rows padded to the budget' if self.cuda_graphs else ''}{given if self.fits else ''}; "
                f"expected peak {self.predicted_peak_gib:.1f} GiB{warn}")


COPY_WORDS = {"yes": "16-bit copy of the base on", "fp8": "FP8 copy of the base on (FP8 matmuls)",
              "fp8_backward": "16-bit copy of the base + its FP8 transpose on (FP8 input gradients)",
              "fp8_backward_4bit": "no copy of the base, FP8 input gradients from the 4-bit base"}
COPY_BYTES = {"yes": 2, "fp8": 2, "fp8_backward": 3}  # per base weight: W in 16 bits; W and W^T in e4m3; W in 16 bits + W^T in e4m3


def micro_batches(tokens_per_step: int, max_length: int, pack_tokens: int | None, accumulation: int | None) -> list[tuple[int, int]]:
    """(tokens per micro-batch, accumulation steps) candidates: tokens_per_step / 2**k, each >= max_length; fixed values kept."""
    if pack_tokens and accumulation:
        return [(pack_tokens, accumulation)]
    if pack_tokens:
        return [(pack_tokens, max(1, tokens_per_step // pack_tokens))]
    if accumulation:
        return [(max(max_length, tokens_per_step // accumulation), accumulation)]
    out, micro = [], tokens_per_step
    while micro >= max_length:
        out.append((micro, tokens_per_step // micro))
        if micro % 2:
            break
        micro //= 2
    return out or [(max_length, 1)]


def plan_memory(total_bytes: int, free_bytes: int, shape: ModelShape = LLAMA2_7B, *, cap_bytes: int | None = None,
                quantization: str = "4bit", lora_r: int = 16, tokens_per_step: int = 8192, max_length: int = 1024,
                fused_cross_entropy: bool = True, fixed: dict | None = None, card: str = "GPU", fragmentation: float = 1.08,
                reserve_gib: float = 0.5, time_model: TimeModel = TimeModel(), dense_base: str = "no", fp8_ok: bool = False,
                cuda_graphs_ok: bool = True) -> Plan:
    """Pick (gradient checkpointing, tokens per micro-batch, accumulation) for one GPU; the fastest that fits wins.

    usable = min(free, cap): free from torch.cuda.mem_get_info() before the model is loaded, cap from the process's
    memory fraction (bench/capped_main.py), which mem_get_info does not show. Peak budget = usable / fragmentation -
    reserve (allocator fragmentation, cuBLAS/Triton workspaces). `fixed` holds the FIELDS given explicitly: kept as given,
    even over the budget (then `fits` is False and the line warns).

    dense_base (a 4-bit base only): "auto" adds a copy of the base to the plan chosen without it when that plan still
    fits with it. With fp8_ok (an FP8-capable card, compiled layers) and weight sizes FP8 takes, that is fp8_backward
    (the 16-bit copy + W^T in e4m3: 1.5x dense_copy_gib) where it fits, else the 16-bit copy (dense_copy_gib); it never
    buys a copy with a smaller micro-batch or with checkpointing. Where no copy fits, the plan has no checkpointing and
    cuda_graphs_ok (the compile mode and padding not given otherwise), auto takes fp8_backward_4bit with CUDA graphs
    (cuda_graphs): no copy, the 4-bit base's input gradients in FP8, the layers replayed from CUDA graphs. The two
    together measured 1.23x the 4-bit base under a 24 GiB cap; fp8_backward_4bit alone 0.95x (BENCHMARKS.md, session 13).
    "yes", "fp8" or "fp8_backward" (given) counts it in
    every option: 2, 2 and 3 bytes per base weight.
    """
    fixed = fixed or {}
    if quantization != "4bit":
        dense_base = "no"
    copy = dense_copy_gib(shape)
    extra = copy * COPY_BYTES[dense_base] / 2 if dense_base in COPY_BYTES else 0.0  # given: counted in every option
    usable = min(free_bytes, total_bytes, cap_bytes or total_bytes) / GIB
    budget = usable / fragmentation - reserve_gib
    gcs = [fixed["gradient_checkpointing"]] if "gradient_checkpointing" in fixed else [False, True]
    options = []
    splits = micro_batches(tokens_per_step, max_length, fixed.get("pack_tokens"), fixed.get("gradient_accumulation_steps"))
    for micro, accumulation in splits:
        for gc in gcs:
            peak = predict_peak_gib(shape, micro, gc, quantization, lora_r, fused_cross_entropy) + extra
            options.append((peak <= budget, time_model.tokens_per_s(micro, gc), micro, accumulation, gc, peak))
    fits, _, micro, accumulation, gc, peak = max(options)
    if not fits and not fixed:
        need = predict_peak_gib(shape, max_length, True, quantization, lora_r, fused_cross_entropy) + extra
        raise PlanError(f"--memory-plan auto: even gradient checkpointing with {max_length}-token micro-batches needs ~{need:.1f} GiB, "
                        f"but {card} leaves a budget of {budget:.1f} GiB ({usable:.1f} GiB usable); "
                        f"{f'drop --dense-base {dense_base} (the copy of the base), ' if dense_base in COPY_BYTES else ''}"
                        "free GPU memory, lower "
                        f"--max-length or --lora-r, or pass --memory-plan off with your own --pack-tokens")
    graphs = False
    if dense_base == "auto":
        choices = (["fp8_backward"] if fp8_ok and shape.fp8_sizes else []) + ["yes"]
        added = [(c, copy * COPY_BYTES[c] / 2) for c in choices if fits and peak + copy * COPY_BYTES[c] / 2 <= budget]
        # no copy fits: FP8 input gradients from the 4-bit base itself (nothing held; W^T cast per layer in the backward),
        # with CUDA graphs (without them it measured slower: the host launching kernels binds the shorter GPU step)
        graphs = not added and fp8_ok and shape.fp8_sizes and fits and not gc and cuda_graphs_ok
        dense_base, more = added[0] if added else ("fp8_backward_4bit" if graphs else "no", 0.0)
        peak += more
    return Plan(gc, micro, accumulation, round(peak, 2), round(budget, 2), round(usable, 2), fits, card, tuple(sorted(fixed)),
                dense_base, graphs)


def shape_from_config(config) -> ModelShape:
    """The architecture figures the planner needs, from a transformers config (Llama-like decoders)."""
    kv = getattr(config, "num_key_value_heads", None)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ModelShape(layers=config.num_hidden_layers, hidden=config.hidden_size, intermediate=config.intermediate_size,
                      vocab=config.vocab_size, kv_hidden=kv * head_dim if kv else None,
                      tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)))


def plan_from_cuda(shape: ModelShape, device: int = 0, **kw) -> Plan:
    """plan_memory with this GPU's free memory, total memory and per-process cap (the only torch-touching part)."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    fraction = torch.cuda.get_per_process_memory_fraction(device) if hasattr(torch.cuda, "get_per_process_memory_fraction") else 1.0
    cap = int(fraction * total) if fraction < 1.0 else None
    return plan_memory(total, free, shape, cap_bytes=cap, card=torch.cuda.get_device_name(device), **kw)


def fp8_backward_ok(cfg, rt) -> bool:
    """--dense-base auto may take fp8_backward: a card with FP8 matmuls (Hopper or newer) and compiled layers (the FP8
    casts of the gradients are fused there; measured only so: BENCHMARKS.md, session 11)."""
    import fp8
    from compile_layers import compile_enabled

    return fp8.check_fp8_device(rt.device) is None and compile_enabled(cfg.compile, rt, cfg.gradient_checkpointing, fp8_base=True)


def apply_memory_plan(cfg, explicit: set[str]):
    """cfg with the planned FIELDS on a CUDA GPU (--memory-plan auto, packed rows, not FSDP); unchanged elsewhere."""
    import torch

    from runtime import fsdp_active, runtime

    rt = runtime()
    if cfg.memory_plan == "off" or not rt.cuda or fsdp_active() or not cfg.packing:
        return dataclasses.replace(cfg, dense_base="no") if cfg.dense_base == "auto" else cfg
    from transformers import AutoConfig

    from compile_layers import CUDA_GRAPH_MODES
    from hub import resolve_base_model

    name = resolve_base_model(cfg.base_model, cfg.gguf_file)
    shape = shape_from_config(AutoConfig.from_pretrained(name, trust_remote_code=cfg.trust_remote_code))
    fixed = {f: getattr(cfg, f) for f in FIELDS if f in explicit and f != "dense_base"}
    graphs_ok = ((cfg.compile_mode in CUDA_GRAPH_MODES or "compile_mode" not in explicit)
                 and (cfg.pad_to_budget or "pad_to_budget" not in explicit))
    plan = plan_from_cuda(shape, torch.device(rt.device).index or 0, quantization=cfg.quantization, lora_r=cfg.lora_r,
                          tokens_per_step=cfg.tokens_per_step, max_length=cfg.max_length, fused_cross_entropy=cfg.liger, fixed=fixed,
                          dense_base=cfg.dense_base, fp8_ok=fp8_backward_ok(cfg, rt), cuda_graphs_ok=graphs_ok)
    print(plan.line(), flush=True)
    mode = cfg.compile_mode if "compile_mode" in explicit else "reduce-overhead"  # a graphs mode given (max-autotune) is kept
    graphs = {"compile_mode": mode, "pad_to_budget": True} if plan.cuda_graphs else {}
    return dataclasses.replace(cfg, **{f: getattr(plan, f) for f in FIELDS}, **graphs)
