"""Why CUDA graphs in training re-record with gradient accumulation: a diagnosis on a GPU, not a benchmark.

    python bench/cudagraph_accumulation.py --preset smoke --max-steps 10 --val-fraction 0 --save-steps 10 --pad-to-budget \
        --compile on --compile-mode reduce-overhead --memory-plan off --no-gradient-checkpointing --pack-tokens 512 \
        --gradient-accumulation-steps 2 --output-dir /tmp/cg [--mark-every-micro-batch]       # TORCH_LOGS=+cudagraphs: why

main.py refuses --compile-mode reduce-overhead with more than one micro-batch per optimizer step (compile_layers.
check_compile_mode: 13-19 s per step on an H200). This script lifts that refusal and runs main.py's own training with
its flags, printing after every optimizer step the CUDA graphs recorded so far, the calls that skipped them and the
step's wall time (GPU synchronized). Session 7, tiny model, one H200: 4 more graphs at every step (cudagraph trees
checkpoint the allocator and record the second micro-batch again). --mark-every-micro-batch also starts a new
CUDA-graph generation before every micro-batch (TrainerCallback.on_substep_end), not only before each optimizer step,
and gives the trainable parameters zeroed .grad buffers before each step's first micro-batch, allocated outside the
graphs: the backward's gradient outputs are then added into them and die, so nothing of the previous micro-batch's graphs
should be needed after its backward (an access to it would raise, not read stale memory). Not yet run on a GPU. (The
zeroed buffers alone, with one generation per optimizer step, did not stop the re-recording: session 7.)
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
    def __init__(self, every_micro_batch: bool):
        self.every_micro_batch, self.last = every_micro_batch, None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.every_micro_batch:  # allocated outside any graph, at each step's start (Trainer sets them to None)
            for p in model.parameters():
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)

    def on_substep_end(self, args, state, control, **kwargs):
        if self.every_micro_batch:
            torch.compiler.cudagraph_mark_step_begin()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        step_s = f"{now - self.last:.3f} s" if self.last else "-"
        print(f"[cudagraphs] step {state.global_step}: {compile_layers.cudagraph_report()}, {step_s}", flush=True)
        self.last = now


def run(argv: list[str]) -> None:
    every = "--mark-every-micro-batch" in argv
    argv = [a for a in argv if a != "--mark-every-micro-batch"]
    main.check_compile_mode = training.check_compile_mode = lambda mode, accumulation: None  # the refusal, lifted here only
    build = training.build_trainer

    def build_with_report(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.add_callback(GraphsPerStep(every))
        return trainer

    main.build_trainer = build_with_report
    main.run(argv)


if __name__ == "__main__":
    run(sys.argv[1:])
