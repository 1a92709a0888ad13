"""Where the GPU memory of each process goes: after load, after LoRA, after the FSDP wrap, at steps 1-3, on OOM.

    LLAMA_DOLLY_MEMORY_PROBE=DIR accelerate launch --config_file configs/accelerate/fsdp_qlora.yaml main.py ...
    LLAMA_DOLLY_MEMORY_SNAPSHOT=1 ...   # also record allocations: DIR/{step2,oom}_rank{R}.pickle (view at pytorch.org/memory_viz)

Off unless LLAMA_DOLLY_MEMORY_PROBE is set. Each process prints `[memory] rank R LABEL: allocated A GiB, reserved B,
peak C` and writes DIR/rank{R}.json: those marks, the parameter bytes it holds on its GPU once wrapped (about 1/N of
the one-process figure when FSDP shards, the whole base when it does not), the peak while loading, the steady peak
(training only: the peak is reset when training begins) and torch.cuda.memory_summary() after step 2.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from transformers import TrainerCallback

PROBE = "LLAMA_DOLLY_MEMORY_PROBE"  # a folder: enables the probe
SNAPSHOT = "LLAMA_DOLLY_MEMORY_SNAPSHOT"  # 1: record allocation history too (slower; for reading who holds what)
GIB = 2**30


def _rank() -> str:
    return os.environ.get("RANK", "0")


def _folder() -> str | None:
    return os.environ.get(PROBE) or None


class MemoryProbe(TrainerCallback):
    """Per-process GPU memory marks (class-level, so loading code can add marks before the Trainer exists)."""

    marks: dict[str, dict[str, float]] = {}
    report: dict[str, Any] = {}

    @classmethod
    def mark(cls, label: str) -> None:
        if not (_folder() and torch.cuda.is_available()):
            return
        now = {"allocated_gib": torch.cuda.memory_allocated() / GIB, "reserved_gib": torch.cuda.memory_reserved() / GIB,
               "peak_gib": torch.cuda.max_memory_allocated() / GIB}
        cls.marks[label] = {k: round(v, 3) for k, v in now.items()}
        print(f"[memory] rank {_rank()} {label}: allocated {now['allocated_gib']:.2f} GiB, reserved {now['reserved_gib']:.2f}, "
              f"peak {now['peak_gib']:.2f}", flush=True)
        cls.write()

    @classmethod
    def write(cls) -> None:
        folder = _folder()
        if folder:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, f"rank{_rank()}.json"), "w", encoding="utf-8") as fh:
                json.dump({"rank": int(_rank()), "marks": cls.marks} | cls.report, fh, indent=2)

    def on_train_begin(self, args, state, control, model=None, **kwargs: Any) -> None:
        if not (_folder() and torch.cuda.is_available()):
            return
        self.mark("after wrap")
        if model is not None:
            on_gpu = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "cuda")
            MemoryProbe.report["parameters_on_gpu_gib"] = round(on_gpu / GIB, 3)
            print(f"[memory] rank {_rank()} parameters on its GPU after the wrap: {on_gpu / GIB:.2f} GiB", flush=True)
        MemoryProbe.report["load_peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
        torch.cuda.reset_peak_memory_stats()  # from here on: the steady (training) peak

    def on_step_end(self, args, state, control, **kwargs: Any) -> None:
        if not (_folder() and torch.cuda.is_available()):
            return
        if state.global_step <= 3:
            self.mark(f"step {state.global_step}")
        if state.global_step == 2:
            MemoryProbe.report["memory_summary_step2"] = torch.cuda.memory_summary()
            dump_snapshot("step2")
        MemoryProbe.report["steady_peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
        self.write()


def start_recording() -> None:
    """With LLAMA_DOLLY_MEMORY_SNAPSHOT=1, record every allocation (with its Python stack) from here on."""
    if _folder() and os.environ.get(SNAPSHOT) == "1" and torch.cuda.is_available():
        torch.cuda.memory._record_memory_history(max_entries=100_000, stacks="python")


def dump_snapshot(tag: str) -> None:
    """DIR/{tag}_rank{R}.pickle, if recording; called after step 2 and on CUDA out of memory."""
    folder = _folder()
    if folder and os.environ.get(SNAPSHOT) == "1" and torch.cuda.is_available():
        os.makedirs(folder, exist_ok=True)
        torch.cuda.memory._dump_snapshot(os.path.join(folder, f"{tag}_rank{_rank()}.pickle"))
