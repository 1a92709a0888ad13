"""Device, dtype, quantization and attention kernel: the one place they are chosen.

On CUDA: NF4 + double quantization with bf16 compute (fp16 on cards without bf16), one process per
GPU under accelerate/torchrun (LOCAL_RANK). On the CPU (the documented fallback): float32 compute;
4-bit still works through bitsandbytes' CPU backend, slowly, which the smoke preset and the tests use.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from transformers import BitsAndBytesConfig

from cli import UserError


@dataclass(frozen=True)
class Runtime:
    device: str  # "cuda:N" or "cpu"
    dtype: torch.dtype  # compute dtype: bf16 / fp16 on CUDA, fp32 on CPU

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


def runtime() -> Runtime:
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))  # one process per GPU under accelerate/torchrun
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return Runtime(f"cuda:{local_rank}", dtype)
    return Runtime("cpu", torch.float32)


VARLEN = "varlen"  # --attention varlen: packed rows through PyTorch's variable-length FlashAttention kernel


def attention_kernel(choice: str, packing: bool, rt: Runtime) -> str:
    """attention_choice's kernel, made ready: varlen is registered with transformers here (register_varlen); the packed
    collator then passes each row's record bounds (training.collator)."""
    name = attention_choice(choice, packing, rt)
    if name == VARLEN:
        register_varlen()
    return name


def attention_choice(choice: str, packing: bool, rt: Runtime) -> str:
    """The attention --attention names. auto, packed rows on CUDA: varlen in one process where PyTorch has it (torch >=
    2.10, compute capability 8.0+): on one H200 1.04x flex attention's tokens/s, its compile 16 s instead of 75 s, the
    same losses within 0.002 over 20 steps (BENCHMARKS.md); else flex_attention (several processes: measured with flex).
    Unpacked batches and the CPU: sdpa."""
    if choice != "auto":
        return choice
    if not (packing and rt.cuda):
        return "sdpa"
    return VARLEN if launched_processes() == 1 and varlen_available() else "flex_attention"


def varlen_available() -> bool:
    """PyTorch's varlen FlashAttention can run here: torch >= 2.10 and a CUDA GPU of compute capability 8.0+."""
    return varlen_problem() is None


def varlen_problem() -> str | None:
    """Why PyTorch's varlen FlashAttention cannot run here (a one-line error), or None."""
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return f"--attention varlen needs torch >= 2.10 (torch.nn.attention.varlen); this is torch {torch.__version__}"
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        return "--attention varlen needs a CUDA GPU of compute capability 8.0 or later (FlashAttention); use --attention auto"
    return None


def register_varlen(kernel: Any = None) -> None:
    """Make attn_implementation="varlen" known to transformers: each packed record attends causally to itself only,
    through torch.nn.attention.varlen (FlashAttention over cu_seq_lens: no mask built, no block skipped by a mask).

    kernel(q, k, v, cu_seq_lens, max_length, scale) -> output, all (tokens, heads, head_dim): the tests pass a reference
    on the CPU; None: PyTorch's kernel, which needs CUDA (compute capability 8.0+) and torch >= 2.10.
    """
    from transformers import AttentionInterface

    global _varlen_kernel
    if kernel is None:
        problem = varlen_problem()
        if problem:
            raise UserError(problem)
        kernel = flash_varlen_kernel()
    _varlen_kernel = kernel
    AttentionInterface.register(VARLEN, varlen_attention)


_varlen_kernel: Any = None


def flash_varlen_kernel() -> Any:
    """PyTorch's varlen FlashAttention as register_varlen's kernel: causal attention within each [cu[i], cu[i+1]) span.
    varlen_attn is looked up here, once (nothing imported under torch.compile); torch 2.10 spells causal is_causal=True,
    later versions window_size=(-1, 0). The scale stays at its default, 1/sqrt(head_dim), which is Llama's."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    causal = {"is_causal": True} if "is_causal" in inspect.signature(varlen_attn).parameters else {"window_size": (-1, 0)}

    def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, longest: int, scale: float | None) -> torch.Tensor:
        return varlen_attn(q, k, v, cu, cu, longest, longest, **causal)

    return kernel


def varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention interface for attn_implementation="varlen": one packed row (batch 1) whose record bounds
    come from the collator (dataset.DocumentBounds: cu_seq_lens_q, max_length_q). Returns (batch, tokens, heads, dim).

    Rows without bounds are ordinary sequences (a forward pass of your own on the training model, a padded batch):
    they get SDPA with their padding mask, the same attention. Packed rows without bounds are refused: their position
    ids restart inside the row, and SDPA would let each record attend to the records before it."""
    cu, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None or longest is None:
        return unpacked_attention(module, query, key, value, attention_mask, scaling, dropout, kwargs.get("position_ids"))
    if query.shape[0] != 1:
        raise ValueError("--attention varlen needs packed rows (one row per micro-batch) with their record bounds "
                         f"(cu_seq_lens_q, max_length_q from dataset.DocumentBounds); got {query.shape[0]} rows. Use --packing.")
    if dropout or (scaling is not None and abs(scaling - query.shape[-1] ** -0.5) > 1e-6):
        raise ValueError("--attention varlen supports neither attention dropout nor a scale other than 1/sqrt(head_dim)")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (1, heads, tokens, dim) -> (tokens, heads, dim)
    return _varlen_kernel(q, k, v, cu, longest, scaling)[None], None


def unpacked_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float | None, dropout: float,
                       position_ids: torch.Tensor | None) -> tuple[torch.Tensor, None]:
    """varlen_attention for rows that are one sequence each (no record bounds): SDPA, causal, or with the 4-D mask that
    padding_mask_hook made from the padding mask. Packed rows (position ids that restart inside a row) are refused."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is None and position_ids is not None and q_len == kv_len and q_len > 1 \
            and bool((position_ids[..., 1:] <= position_ids[..., :-1]).any()):
        raise ValueError("--attention varlen needs packed rows (one row per micro-batch) with their record bounds "
                         "(cu_seq_lens_q, max_length_q from dataset.DocumentBounds); got packed rows without them. "
                         "Use training.collator's batches, or --attention sdpa.")
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling)


def padding_mask_hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    """Forward pre-hook on a varlen model's decoder (loading.load_base_model): transformers builds no mask for an
    attention it has no mask function for and drops a 2-D padding mask, so it is made 4-D here (causal AND a real key;
    a padding query with no real key sees every key, so nothing turns NaN), which reaches the attention as it is.
    The training batches carry no mask (packed rows, record bounds): nothing to do for them."""
    mask = kwargs.get("attention_mask")
    if mask is None or mask.ndim != 2:
        return None
    inputs = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    q_len, kv_len = inputs.shape[1], mask.shape[-1]
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=mask.device).tril(kv_len - q_len)
    full = causal[None, None] & mask.bool()[:, None, None, :]
    return args, kwargs | {"attention_mask": full | ~full.any(-1, keepdim=True)}


def quantization_config(quantization: str, rt: Runtime, quant_storage: str = "uint8") -> BitsAndBytesConfig | None:
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",  # NormalFloat4: information-theoretically optimal for normal weights (QLoRA)
            bnb_4bit_use_double_quant=True,  # quantize the quantization constants too: ~0.4 bit/param saved
            bnb_4bit_compute_dtype=rt.dtype,
            bnb_4bit_quant_storage=quant_storage,  # bfloat16 for FSDP, which shards float tensors only
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def launched_processes() -> int:
    """How many processes this job was launched as (accelerate launch, torchrun set WORLD_SIZE); 1 when run directly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def fsdp_active() -> bool:
    """Launched by `accelerate launch` with an FSDP config (configs/accelerate/fsdp_qlora.yaml)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


class _DropMessages(logging.Filter):
    """Drops the log records whose format string starts with one of `prefixes` and whose arguments name one of `about`."""

    def __init__(self, prefixes: tuple[str, ...], about: tuple[str, ...] = ("",)):
        super().__init__()
        self.prefixes, self.about = prefixes, about

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefixes):
            return True
        return not any(word in str(arg) for arg in (record.args or ()) for word in self.about)


HARMLESS_LOGS = {
    # bitsandbytes tries to download faster CPU kernels from the hub and falls back to its own.
    "bitsandbytes.backends.cpu.ops": _DropMessages(("Failed to load CPU gemm_4bit_forward from kernels-community",)),
    # liger-kernel imports its kernels for other hardware (CuTe DSL, Ascend NPUs, cuTile) and uses Triton's.
    "liger_kernel.backends.registry": _DropMessages(("Backend impl ",), about=("_cutedsl", "_ascend", "_cutile")),
}


def silence_harmless_logs() -> None:
    """Drop the start-up messages that look like failures but are not, at their source (filters on their loggers).

    Only those exact messages go: every other warning or error of these libraries still shows. Call it
    before bitsandbytes is imported (it logs at import time).
    """
    for name, drop in HARMLESS_LOGS.items():
        logger = logging.getLogger(name)
        if drop not in logger.filters:
            logger.addFilter(drop)


def cpu_threads(requested: int | None = None) -> int:
    """torch's CPU threads: `requested`, else the cores not already busy (os.getloadavg), at least 1.

    On a shared machine, OpenMP threads that wait for a busy core spin: 2 threads on 1 free core measured 6.7x slower
    than 1 thread (BENCHMARKS.md). Set once per process; returns the number set.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = requested or max(1, min(cores, cores - int(os.getloadavg()[0] + 0.5)))
    torch.set_num_threads(threads)
    return threads
