"""CUDA graphs in training with gradient accumulation: graphs recorded and wall time after every optimizer step (GPU).

    python bench/cudagraph_accumulation.py --preset smoke --max-steps 10 --val-fraction 0 --save-steps 10 --pad-to-budget \
        --compile on --compile-mode reduce-overhead --memory-plan off --no-gradient-checkpointing --pack-tokens 512 \
        --gradient-accumulation-steps 2 --output-dir /tmp/cg [--one-generation-per-step]     # TORCH_LOGS=+cudagraphs: why

Runs main.py's own training with its flags. main.py's CompileWatch starts a CUDA-graph generation before every
micro-batch and gives the trainable parameters zeroed .grad buffers (allocated outside the graphs) before each step's
first micro-batch, so every micro-batch replays one recorded path. --one-generation-per-step undoes both (session 7's
behaviour: one generation per optimizer step, the first micro-batch's gradients left in the graphs' pool): there, on an
H200, cudagraph trees checkpointed the allocator and recorded the second micro-batch again at every step (4 more graphs
per step on the tiny model; 13-19 s per step on the 7B).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import compile_layers  # noqa: E402
import main  # noqa: E402
import training  # noqa: E402


class GraphsPerStep(TrainerCallback):
    def __init__(self):
        self.last = None

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        step_s = f"{now - self.last:.3f} s" if self.last else "-"
        print(f"[cudagraphs] step {state.global_step}: {compile_layers.cudagraph_report()}, {step_s}", flush=True)
        self.last = now


def run(argv: list[str]) -> None:
    if "--one-generation-per-step" in argv:
        argv = [a for a in argv if a != "--one-generation-per-step"]
        compile_layers.CompileWatch.on_substep_end = lambda self, *a, **k: None
        compile_layers.zero_grads_outside_graphs = lambda model: None
    build = training.build_trainer

    def build_with_report(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.add_callback(GraphsPerStep())
        return trainer

    main.build_trainer = build_with_report
    main.run(argv)


if __name__ == "__main__":
    run(sys.argv[1:])
