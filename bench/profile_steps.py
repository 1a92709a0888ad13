"""ProfileSteps: a TrainerCallback that profiles optimizer steps [start, start + active) with torch.profiler.

    trainer.add_callback(ProfileSteps(out_dir="OUT/profile-default", start=10, active=3))

Writes trace.json.gz (chrome://tracing or ui.perfetto.dev: CPU and CUDA timelines, record_shapes off), summary.json
(per step: wall time, GPU busy time = union of kernel intervals, GPU idle = wall - busy, kernels, host syncs, top
ops by self CPU and self CUDA time) and tables.txt. Reading it: idle close to the fixed cost with many thousand kernels
per step = dispatch-bound (compile); idle right after aten::_local_scalar_dense / cudaStreamSynchronize = sync bubbles.
"""

from __future__ import annotations

import json
import os
import time

import torch
from transformers import TrainerCallback

SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def busy_us(prof) -> float:
    """GPU busy time: the union of the device events' intervals (overlapping streams counted once)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type != torch.autograd.DeviceType.CPU and e.time_range.end > e.time_range.start)
    busy, start, end = 0.0, None, None
    for s, e in spans:
        if end is None or s > end:
            busy += 0 if end is None else end - start
            start, end = s, e
        else:
            end = max(end, e)
    return busy + (0 if end is None else end - start)


class ProfileSteps(TrainerCallback):
    def __init__(self, out_dir: str, start: int = 5, active: int = 3, row_limit: int = 40):
        self.out_dir, self.start, self.active, self.row_limit = out_dir, start, active, row_limit
        self.prof, self._t = None, None
        self.walls: list[float] = []
        self.summary: dict | None = None

    def on_step_begin(self, args, state, control, **kwargs):  # global_step = optimizer steps finished so far
        if state.global_step == self.start and self.prof is None and self.summary is None:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=activities, record_shapes=False, with_stack=False, profile_memory=False)
            _sync()
            self.prof.__enter__()
        if self.prof is not None:
            _sync()  # only inside the window: the other steps' timing is untouched
            self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.prof is None or self._t is None:
            return
        _sync()
        self.walls.append(time.perf_counter() - self._t)
        if len(self.walls) == self.active:
            self.prof.__exit__(None, None, None)
            self.summary = self.write()
            self.prof = None

    def write(self) -> dict:
        os.makedirs(self.out_dir, exist_ok=True)
        self.prof.export_chrome_trace(os.path.join(self.out_dir, "trace.json.gz"))
        table = self.prof.key_averages()
        rows = [{"name": e.key, "count": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
                 "self_cuda_ms": getattr(e, "self_device_time_total", 0) / 1e3, "cpu_total_ms": e.cpu_time_total / 1e3} for e in table]
        wall, busy = sum(self.walls), busy_us(self.prof) / 1e6
        kernels = sum(r["count"] for r in rows if r["self_cuda_ms"] > 0 and not r["name"].startswith(("aten::", "autograd::", "Optimizer")))
        summary = {"steps": self.active, "wall_s_per_step": [round(w, 4) for w in self.walls],
                   "gpu_busy_s_per_step": round(busy / self.active, 4), "gpu_idle_s_per_step": round((wall - busy) / self.active, 4),
                   "kernels_per_step": kernels // self.active,
                   "host_syncs": {r["name"]: r["count"] for r in rows if r["name"] in SYNC_OPS},
                   "top_self_cpu": sorted(rows, key=lambda r: -r["self_cpu_ms"])[: self.row_limit],
                   "top_self_cuda": sorted(rows, key=lambda r: -r["self_cuda_ms"])[: self.row_limit]}
        with open(os.path.join(self.out_dir, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=1)
        with open(os.path.join(self.out_dir, "tables.txt"), "w") as fh:
            fh.write(table.table(sort_by="self_cpu_time_total", row_limit=self.row_limit) + "\n\n")
            if torch.cuda.is_available():
                fh.write(table.table(sort_by="self_cuda_time_total", row_limit=self.row_limit) + "\n")
        print(f"[profile] steps {self.start + 1}-{self.start + self.active}: wall {wall / self.active:.3f} s/step, GPU busy "
              f"{summary['gpu_busy_s_per_step']:.3f}, idle {summary['gpu_idle_s_per_step']:.3f}, {summary['kernels_per_step']} "
              f"kernels/step, syncs {summary['host_syncs']} -> {self.out_dir}", flush=True)
        return summary
