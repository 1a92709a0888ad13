"""What keeps a training run safe to interrupt: complete-or-ignored checkpoints, signals, NaN losses, OOM.

- **Checkpoints**: Trainer writes `checkpoint-N/`; `CheckpointMarker` then fsyncs its files and writes
  `COMPLETE` as the very last step (only if the LoRA weights are finite). `--resume` takes the newest
  checkpoint with the marker (`pick_checkpoint`); a folder without it (a save cut short by a crash,
  kill -9 or power loss) is skipped, said so, and removed. Rotation (`--save-total-limit`) is done here,
  after the marker, and counts only complete checkpoints, so a crash mid-save never costs the last good one.
- **Signals**: `StopOnSignal` turns Ctrl-C (SIGINT) and SIGTERM (pre-emption, `kill`) into "finish this
  optimizer step, save a checkpoint, stop"; main.py then exits 130 (SIGINT) or 143 (SIGTERM). A second
  signal stops at once (the last complete checkpoint stays valid).
- **Non-finite loss**: `StopOnNonFiniteLoss` stops at the first logged NaN/inf loss without saving
  that step; the last good checkpoint is kept. Exit code 1.
- **Final outputs**: `staged(out)` writes into `OUTPUT_DIR/.saving/` and moves each file in place with
  os.replace, adapter_config.json (what marks a finished run) last.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import signal
import sys
from collections.abc import Iterator
from typing import Any

import torch
from transformers import TrainerCallback

import atomic
from config import TrainConfig

COMPLETE = "COMPLETE"  # the last file written into a checkpoint: without it, --resume ignores the folder
STAGING = ".saving"  # final outputs are written here first, then moved into OUTPUT_DIR
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, as shells report them
EXIT_TRAINING_FAILED = 1  # a NaN/inf loss, CUDA out of memory
# What a run writes into OUTPUT_DIR; --overwrite removes exactly these (and nothing else a user keeps there).
RUN_OUTPUTS = (
    "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md", "tokenizer.json", "tokenizer.model",
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "vocab.json", "merges.txt",
    "train_config.yaml", "data_fingerprints.json", "metrics.json", "loss_curve.png", "checkpoints", "tensorboard", "eval", STAGING,
)


class TrainingStopped(Exception):
    """Training ended early: a message for stderr and the process exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.message, self.code = message, code


# --- checkpoints: complete (marked) or ignored ---------------------------------------------


def checkpoints(folder: str) -> list[str]:
    """The `checkpoint-N` folders in `folder`, oldest (lowest N) first."""
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(folder) if (m := re.fullmatch(r"checkpoint-(\d+)", name))]
    return [os.path.join(folder, name) for _, name in sorted(found) if os.path.isdir(os.path.join(folder, name))]


def is_complete(checkpoint: str) -> bool:
    return os.path.isfile(os.path.join(checkpoint, COMPLETE))


def mark_complete(checkpoint: str) -> None:
    """Flush every file of the checkpoint to disk, then write the marker atomically (tmp, fsync, rename)."""
    for folder, _, files in os.walk(checkpoint):
        for name in files:
            with open(os.path.join(folder, name), "rb") as fh:
                os.fsync(fh.fileno())
    atomic.write_text(
        os.path.join(checkpoint, COMPLETE), "every file of this checkpoint was written and flushed before this one\n", fsync=True
    )
    with contextlib.suppress(OSError):  # make the rename itself durable (not possible on every OS)
        fd = os.open(checkpoint, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def newest_complete(folder: str) -> str | None:
    complete = [c for c in checkpoints(folder) if is_complete(c)]
    return complete[-1] if complete else None


def pick_checkpoint(folder: str) -> str | None:
    """--resume: the newest complete checkpoint; newer incomplete ones are reported and removed (training redoes them)."""
    chosen = newest_complete(folder)
    for c in checkpoints(folder) if main_process() else []:
        if not is_complete(c) and (chosen is None or _step(c) > _step(chosen)):
            print(f"[main] skipping {c}: incomplete (its save was interrupted before the {COMPLETE} marker); removed it")
            shutil.rmtree(c, ignore_errors=True)
    return chosen


def rotate_checkpoints(folder: str, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop older ones and any incomplete one older than the newest."""
    found = checkpoints(folder)
    complete = [c for c in found if is_complete(c)]
    stale = complete[:-keep] + [c for c in found if not is_complete(c) and complete and _step(c) < _step(complete[-1])]
    for c in stale:
        shutil.rmtree(c, ignore_errors=True)


def checkpoint_dir(cfg: TrainConfig) -> str:
    return os.path.join(cfg.output_dir, "checkpoints")


def main_process() -> bool:
    """False in the other processes of a multi-process run (torchrun / accelerate launch): they leave files alone."""
    return int(os.environ.get("RANK", "0")) == 0


def _step(checkpoint: str) -> int:
    return int(checkpoint.rsplit("-", 1)[1])


def lora_weights_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)


class CheckpointMarker(TrainerCallback):
    """After Trainer saved checkpoint-N: mark it complete (if its weights are finite), then rotate."""

    def __init__(self, keep: int):
        self.keep = keep

    def on_save(self, args, state, control, model=None, **kwargs: Any) -> None:
        distributed = _distributed()
        if distributed:
            torch.distributed.barrier()  # every process has written its part (rng_state_K.pth, FSDP shards) before the marker
        try:
            if args.should_save:  # only the main process writes (multi-GPU)
                self._mark(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"), args.output_dir, model)
        finally:
            if distributed:
                torch.distributed.barrier()  # nobody stops (and exits) before the marker is written

    def _mark(self, checkpoint: str, folder: str, model: torch.nn.Module | None) -> None:
        if model is not None and not lora_weights_finite(model):
            print(f"[main] {checkpoint} has NaN/inf LoRA weights: not marked complete, --resume will skip it", file=sys.stderr)
            return
        mark_complete(checkpoint)
        rotate_checkpoints(folder, self.keep)


# --- stopping early: signals, non-finite losses -----------------------------------------------


class StopOnSignal(TrainerCallback):
    """Ctrl-C / SIGTERM while training: finish the optimizer step, save a checkpoint, stop; every process at the same step.

    Use `with stop.handling_signals(): trainer.train()`. `signum` is what this process caught; `stop_signum` is what
    all processes agreed on (the same everywhere), and the only one acted upon. Several processes agree through a MAX
    all-reduce of 8 bytes over a CPU (gloo) group: no GPU synchronization. Every process joins each check whatever its
    own flag says, at steps chosen only from values equal everywhere (every `every` steps, and at each scheduled save or
    stop), so a signal to one process never leaves the others waiting in a collective. Once the signal's checkpoint is
    complete on every process, later signals (the launcher stopping its other workers) are ignored until exit.
    """

    def __init__(self, every: int = 1) -> None:
        self.signum: int | None = None  # caught by this process
        self.stop_signum: int | None = None  # agreed by all processes
        self.saved = False  # the agreed stop's checkpoint is complete everywhere
        self.every = max(1, every)
        self._group = None

    @contextlib.contextmanager
    def handling_signals(self) -> Iterator[StopOnSignal]:
        previous = {s: signal.signal(s, self._handle) for s in EXIT_CODES}
        try:
            yield self
        finally:
            if not self.saved:  # else keep ignoring further signals: this process is on its way out with the agreed code
                for s, handler in previous.items():
                    signal.signal(s, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.saved:
            return  # the checkpoint is complete: exit with the first signal's code, not cut short by the launcher's SIGTERM
        if self.signum is not None:  # asked twice: stop now; the last complete checkpoint stays valid
            raise TrainingStopped(f"[main] {name} again: stopped at once without saving; "
                                  "--resume continues from the last complete checkpoint",
                                  EXIT_CODES[signum])
        self.signum = signum
        print(f"\n[main] {name}: saving a checkpoint at the end of this optimizer step, then stopping (send it again to stop at once)",
              file=sys.stderr, flush=True)

    def on_train_begin(self, args, state, control, **kwargs: Any) -> None:
        if _distributed() and self._group is None:
            self._group = torch.distributed.new_group(backend="gloo")  # collective: every process, once, in the same order

    def on_step_end(self, args, state, control, **kwargs: Any) -> None:
        if not _distributed():
            self.stop_signum = self.signum
        elif state.global_step % self.every == 0 or control.should_save or control.should_training_stop:
            # DefaultFlowCallback ran first: should_save/should_training_stop are the schedule's, equal on every process
            self.stop_signum = _largest_across_processes(self.signum or 0, self._group) or None
        if self.stop_signum is not None:
            control.should_save = True
            control.should_training_stop = True

    def agreed(self) -> int | None:
        """The signal to stop with: one process acts on what it caught; several only on what they all agreed on."""
        return self.stop_signum if _distributed() else self.signum

    def on_save(self, args, state, control, **kwargs: Any) -> None:
        # After CheckpointMarker.on_save (an earlier callback), whose trailing barrier means the marker is written.
        if self.stop_signum is not None:
            self.saved = True
            for s in EXIT_CODES:  # SIG_IGN, not a Python handler: it holds through interpreter shutdown too
                signal.signal(s, signal.SIG_IGN)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def _largest_across_processes(value: int, group: Any = None) -> int:
    """MAX of `value` over all processes, as a CPU tensor over a gloo group: no CUDA synchronization."""
    tensor = torch.tensor([value], dtype=torch.int64)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX, group=group)
    return int(tensor.item())


class StopOnNonFiniteLoss(TrainerCallback):
    """Stop at the first logged NaN/inf training loss, without saving that step. Needs logging_nan_inf_filter=False."""

    def __init__(self) -> None:
        self.bad: tuple[int, float] | None = None  # (step, loss)

    def on_log(self, args, state, control, logs=None, **kwargs: Any) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss) and self.bad is None:
            self.bad = (state.global_step, loss)
            control.should_save = False
            control.should_training_stop = True


def raise_if_stopped_early(signals: StopOnSignal, losses: StopOnNonFiniteLoss, checkpoint_folder: str, learning_rate: float) -> None:
    """After trainer.train(): a signal or a NaN loss ends the run here, naming the checkpoint to resume from."""
    last = newest_complete(checkpoint_folder)
    if last:
        resume = f"the last good checkpoint is {last}; rerun the same command with --resume to continue from it"
    else:
        resume = "no checkpoint was completed yet"
    if losses.bad is not None:
        step, loss = losses.bad
        raise TrainingStopped(f"error: the training loss became {loss} at step {step}, so training stopped without saving it; {resume}. "
                              f"A diverging run usually needs a lower --learning-rate (now {learning_rate:g}) or --max-grad-norm.",
                              EXIT_TRAINING_FAILED)
    signum = signals.agreed()  # several processes: a signal caught after their last check stops none of them
    if signum is not None:
        name = signal.Signals(signum).name
        code = EXIT_CODES[signum]
        saved = f"checkpoint saved: {last}; rerun the same command with --resume to continue" if last else "no checkpoint was completed"
        raise TrainingStopped(f"[main] stopped by {name}: {saved} (exit code {code})", code)


def out_of_memory_message(cfg: TrainConfig) -> str:
    """One line: what ran out, and which settings to lower (with their current values)."""
    if cfg.packing:
        size = f"--pack-tokens {cfg.pack_tokens} (tokens per micro-batch; e.g. {max(cfg.max_length, cfg.pack_tokens // 2)})"
    else:
        size = f"--batch-size {cfg.batch_size} (raise --gradient-accumulation-steps to keep the effective batch)"
    checkpointing = "keep --gradient-checkpointing on" if cfg.gradient_checkpointing else "turn --gradient-checkpointing on (it is off)"
    return (f"error: CUDA out of memory while training: lower {size} or --max-length {cfg.max_length}, and {checkpointing}; "
            "then rerun with --resume (or --overwrite if no checkpoint was completed)")


# --- outputs -------------------------------------------------------------------------------------


@contextlib.contextmanager
def staged(out: str) -> Iterator[str]:
    """Yield a fresh OUTPUT_DIR/.saving; on success move its files into `out` (os.replace, adapter_config.json last)."""
    tmp = os.path.join(out, STAGING)
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
    os.makedirs(tmp)
    try:
        yield tmp
        names = sorted(os.listdir(tmp), key=lambda n: n == "adapter_config.json")  # the "finished" marker goes last
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_previous_run(out: str) -> list[str]:
    """--overwrite: delete what an earlier run wrote into `out` (adapter, tokenizer, metrics, checkpoints, ...)."""
    removed = []
    for name in RUN_OUTPUTS:
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
        else:
            continue
        removed.append(name)
    return removed
