"""Test-only launcher: `python tests/hooked_main.py ARGS` runs `python main.py ARGS` with hooks that the tests steer
through environment variables, so that a signal or a fault lands exactly where a test wants it:

- LLAMA_DOLLY_TEST_STEP_SLEEP=S: sleep S seconds after every optimizer step (a kill lands mid-training);
- LLAMA_DOLLY_TEST_SAVE_SLEEP=S: sleep S seconds inside each checkpoint save, before its COMPLETE marker;
- LLAMA_DOLLY_TEST_NAN_STEP=K: set the LoRA weights to NaN before step K (a diverged run, on demand);
- LLAMA_DOLLY_TEST_PID_DIR=DIR: each process writes DIR/rank{RANK}.pid at start (a test signals ONE process of a
  multi-process run) and DIR/rank{RANK}.exit, main's exit code, just before it exits (the launcher reports only its own;
  a stopped run of several processes leaves through os._exit in main.stopped, so the code is written there first).

None of this ships in the project's modules: it is patched in here, from outside.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import main  # noqa: E402
import resilience  # noqa: E402


def pause(variable: str) -> None:
    seconds = float(os.environ.get(variable) or 0)
    if seconds > 0:
        time.sleep(seconds)


class TestHooks(TrainerCallback):
    __test__ = False  # not a pytest test class

    def on_step_begin(self, args, state, control, model=None, **kwargs) -> None:
        if model is not None and state.global_step + 1 == int(os.environ.get("LLAMA_DOLLY_TEST_NAN_STEP") or 0):
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.fill_(float("nan"))

    def on_step_end(self, args, state, control, **kwargs) -> None:
        pause("LLAMA_DOLLY_TEST_STEP_SLEEP")


def build_trainer_with_hooks(*args, _build=main.build_trainer, **kwargs):
    trainer = _build(*args, **kwargs)
    trainer.add_callback(TestHooks())
    return trainer


def mark_complete_slowly(checkpoint: str, _mark=resilience.mark_complete) -> None:
    pause("LLAMA_DOLLY_TEST_SAVE_SLEEP")
    _mark(checkpoint)


def stopped_with_exit_file(code: int, _stopped=main.stopped) -> int:
    write_rank_file("exit", str(code))  # main.stopped may leave through os._exit (several processes): record the code first
    return _stopped(code)


main.build_trainer = build_trainer_with_hooks
resilience.mark_complete = mark_complete_slowly
main.stopped = stopped_with_exit_file



def write_rank_file(suffix: str, text: str) -> None:
    folder = os.environ.get("LLAMA_DOLLY_TEST_PID_DIR")
    if folder:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"rank{os.environ.get('RANK', '0')}.{suffix}"), "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    write_rank_file("pid", str(os.getpid()))
    code = main.main()
    write_rank_file("exit", str(code))
    raise SystemExit(code)
