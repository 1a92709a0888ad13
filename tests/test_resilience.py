"""Interruptions: kill -9 and --resume (bitwise), SIGTERM/Ctrl-C, a kill in the middle of a save, --overwrite, NaN losses.

The kill tests run main.py as a real subprocess and send real signals. Test-only environment variables
(read by tests/hooked_main.py, which runs main.py with test-only hooks patched in) slow training down so a signal lands where intended:
LLAMA_DOLLY_TEST_STEP_SLEEP (after each step), LLAMA_DOLLY_TEST_SAVE_SLEEP (inside a save, before the
COMPLETE marker), LLAMA_DOLLY_TEST_NAN_STEP (NaN LoRA weights before step K).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import FAKE_TOKEN, ROOT, THREADS, inherited_env, run

# Checkpoints every 2 steps, evaluation only at the end (a mid-run eval moves later CPU losses by ~1e-6: test_cli.py).
# dropout: RNG state matters
ARGS = ["--preset", "smoke", "--save-steps", "2", "--max-steps", "8", "--eval-steps", "8", "--lora-dropout", "0.1"]


def history(output_dir: str) -> list[tuple[float, float, float]]:
    """(loss, learning rate, grad norm) per step, from the final checkpoint's trainer_state.json."""
    with open(os.path.join(output_dir, "checkpoints", "checkpoint-8", "trainer_state.json")) as fh:
        return [(h["loss"], h["learning_rate"], h["grad_norm"]) for h in json.load(fh)["log_history"] if "loss" in h]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[tuple[float, float, float]]:
    out = str(tmp_path_factory.mktemp("full") / "run")
    proc = run("main.py", *ARGS, "--output-dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return history(out)


def start(out: str, tmp_path, **env: str) -> tuple[subprocess.Popen, str]:
    """main.py in the background (output to a file: a full pipe would block it); returns (process, log path)."""
    log = str(tmp_path / "log.txt")
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tests", "hooked_main.py"), *ARGS, "--output-dir", out],
            cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
            env={**inherited_env(), "HF_TOKEN": FAKE_TOKEN, **THREADS, **env},
        )
    return proc, log


def wait_for(path: str, proc: subprocess.Popen, log: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            with open(log) as fh:
                pytest.fail(f"{path} never appeared (exit code {proc.poll()}):\n{fh.read()[-3000:]}")
        time.sleep(0.02)


def resume(out: str) -> subprocess.CompletedProcess:
    proc = run("main.py", *ARGS, "--output-dir", out, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_kill_9_mid_training_then_resume_equals_the_uninterrupted_run(uninterrupted, tmp_path):
    out = str(tmp_path / "run")
    proc, log = start(out, tmp_path, LLAMA_DOLLY_TEST_STEP_SLEEP="0.5")
    wait_for(os.path.join(out, "checkpoints", "checkpoint-4", "COMPLETE"), proc, log)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not os.path.exists(os.path.join(out, "adapter_config.json"))
    resumed = resume(out)
    assert "resuming from" in resumed.stdout
    # Mid-epoch (epoch 0.24 at step 4): the same data order, learning rates, dropout masks and losses, to the bit.
    assert history(out) == uninterrupted
    assert os.path.isfile(os.path.join(out, "adapter_config.json"))


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_save_a_checkpoint_and_exit_with_their_code(sig, code, uninterrupted, tmp_path):
    out = str(tmp_path / "run")
    proc, log = start(out, tmp_path, LLAMA_DOLLY_TEST_STEP_SLEEP="0.5")
    wait_for(os.path.join(out, "checkpoints", "checkpoint-2", "COMPLETE"), proc, log)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == code
    with open(log) as fh:
        text = fh.read()
    assert f"stopped by {sig.name}: checkpoint saved: " in text and "--resume to continue" in text and "Traceback" not in text
    saved = text.split("checkpoint saved: ")[1].split(";")[0]
    assert os.path.isfile(os.path.join(saved, "COMPLETE")) and int(saved.rsplit("-", 1)[1]) in (3, 4, 5, 6, 7)
    assert not os.path.exists(os.path.join(out, "adapter_config.json"))  # stopped early: no final adapter
    if sig == signal.SIGTERM:
        assert f"resuming from {saved}" in resume(out).stdout
        assert history(out) == uninterrupted  # a checkpoint at an odd step (off --save-steps) resumes bitwise too


def test_a_kill_in_the_middle_of_a_save_is_never_resumed(uninterrupted, tmp_path):
    out = str(tmp_path / "run")
    proc, log = start(out, tmp_path, LLAMA_DOLLY_TEST_SAVE_SLEEP="3")
    checkpoint_4 = os.path.join(out, "checkpoints", "checkpoint-4")
    wait_for(os.path.join(checkpoint_4, "trainer_state.json"), proc, log)  # Trainer's last file: all there, no marker yet
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(checkpoint_4, "COMPLETE"))
    resumed = resume(out)
    assert f"skipping {checkpoint_4}: incomplete" in resumed.stdout
    assert "resuming from " + os.path.join(out, "checkpoints", "checkpoint-2") in resumed.stdout
    assert history(out) == uninterrupted


def test_resume_with_only_incomplete_checkpoints_says_so(tmp_path):
    os.makedirs(tmp_path / "run" / "checkpoints" / "checkpoint-2")
    proc = run("main.py", "--preset", "smoke", "--output-dir", str(tmp_path / "run"), "--resume")
    assert proc.returncode == 2
    assert "no checkpoint in" in proc.stderr and "was completed" in proc.stderr and "--overwrite" in proc.stderr


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    # NaN weights from step 4: the step-4 checkpoint is written but never marked complete; the loss logged at step 6 stops the run.
    proc = run("tests/hooked_main.py", *ARGS, "--output-dir", out, "--logging-steps", "3", env={"LLAMA_DOLLY_TEST_NAN_STEP": "4"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: the training loss became nan at step 6") and "Traceback" not in proc.stderr
    assert "last good checkpoint is " + os.path.join(out, "checkpoints", "checkpoint-2") in last_line and "--learning-rate" in last_line
    assert "checkpoint-4 has NaN/inf LoRA weights: not marked complete" in proc.stderr
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["checkpoint-2", "checkpoint-4"]  # no checkpoint-6
    assert not os.path.exists(os.path.join(out, "checkpoints", "checkpoint-4", "COMPLETE"))
    assert not os.path.exists(os.path.join(out, "adapter_config.json"))


def fake_previous_run(out) -> None:
    for folder in ("checkpoints/checkpoint-2", "eval", "tensorboard"):
        os.makedirs(out / folder)
    for name in ("checkpoints/checkpoint-2/COMPLETE", "adapter_config.json", "adapter_model.safetensors", "metrics.json",
                 "eval/report.json", "tensorboard/events.out.tfevents.old", "notes.txt"):
        (out / name).write_text("old run\n")


def test_overwrite_removes_the_previous_run_before_training(tmp_path):
    out = tmp_path / "run"
    fake_previous_run(out)
    proc = run("main.py", "--preset", "smoke", "--output-dir", str(out), "--overwrite", "--eval-steps", "8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[main] --overwrite: removed the previous run" in proc.stdout
    assert sorted(os.listdir(out / "checkpoints")) == ["checkpoint-4", "checkpoint-8"]  # no checkpoint-2 of the old run
    assert not (out / "eval").exists()  # the old adapter's eval report would describe another model
    assert not (out / "tensorboard" / "events.out.tfevents.old").exists()
    assert (out / "adapter_config.json").read_text() != "old run\n"
    assert (out / "notes.txt").read_text() == "old run\n"  # not the run's: left alone


def test_overwrite_keeps_the_previous_run_when_the_new_one_cannot_start(tmp_path):
    out = tmp_path / "run"
    fake_previous_run(out)
    proc = run("main.py", "--preset", "smoke", "--output-dir", str(out), "--overwrite", "--dataset", "missing.jsonl")
    assert proc.returncode == 2 and "dataset file not found" in proc.stderr
    assert (out / "checkpoints" / "checkpoint-2").is_dir() and (out / "adapter_config.json").is_file()
    proc = run("main.py", "--preset", "smoke", "--output-dir", str(out), "--overwrite", "--resume")
    assert proc.returncode == 2 and "pass one of them" in proc.stderr


# --- the pieces, as functions ------------------------------------------------------------------


def make_checkpoints(folder, complete: list[int], incomplete: list[int]) -> None:
    for step in complete + incomplete:
        os.makedirs(folder / f"checkpoint-{step}")
        (folder / f"checkpoint-{step}" / "adapter_model.safetensors").write_text("x")
    for step in complete:
        (folder / f"checkpoint-{step}" / "COMPLETE").write_text("")


def test_pick_checkpoint_takes_the_newest_complete_one_and_removes_newer_incomplete_ones(tmp_path, capsys):
    from resilience import pick_checkpoint

    make_checkpoints(tmp_path, complete=[2, 10], incomplete=[4, 12, 14])
    assert pick_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")  # numeric order: 10 > 4
    out = capsys.readouterr().out
    assert "skipping" in out and "checkpoint-12: incomplete" in out and "checkpoint-14" in out and "checkpoint-4" not in out
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-10", "checkpoint-2", "checkpoint-4"]
    assert pick_checkpoint(str(tmp_path / "nothing")) is None


def test_rotation_counts_only_complete_checkpoints(tmp_path):
    from resilience import rotate_checkpoints

    make_checkpoints(tmp_path, complete=[2, 4, 8], incomplete=[6])
    rotate_checkpoints(str(tmp_path), keep=1)
    assert os.listdir(tmp_path) == ["checkpoint-8"]


def test_mark_complete_writes_the_marker_last(tmp_path):
    from resilience import COMPLETE, is_complete, mark_complete

    (tmp_path / "adapter_model.safetensors").write_bytes(b"weights")
    assert not is_complete(str(tmp_path))
    mark_complete(str(tmp_path))
    assert is_complete(str(tmp_path)) and sorted(os.listdir(tmp_path)) == [COMPLETE, "adapter_model.safetensors"]


def test_final_outputs_are_staged_then_moved_in_place(tmp_path):
    from resilience import STAGING, staged

    (tmp_path / "metrics.json").write_text("old")
    with pytest.raises(RuntimeError), staged(str(tmp_path)) as tmp:  # a crash while writing: nothing changes
        (tmp_path / STAGING / "metrics.json").write_text("half")
        raise RuntimeError("disk full")
    assert sorted(os.listdir(tmp_path)) == ["metrics.json"] and (tmp_path / "metrics.json").read_text() == "old"
    with staged(str(tmp_path)) as tmp:
        for name in ("adapter_config.json", "metrics.json", "loss_curve.png"):
            with open(os.path.join(tmp, name), "w") as fh:
                fh.write("new")
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "loss_curve.png", "metrics.json"]
    assert (tmp_path / "metrics.json").read_text() == "new"


def test_remove_previous_run_leaves_other_files_alone(tmp_path):
    from resilience import remove_previous_run

    fake_previous_run(tmp_path)
    removed = remove_previous_run(str(tmp_path))
    assert set(removed) == {"adapter_config.json", "adapter_model.safetensors", "metrics.json", "checkpoints", "eval", "tensorboard"}
    assert os.listdir(tmp_path) == ["notes.txt"]


@pytest.mark.parametrize("packing", [True, False])
def test_out_of_memory_message_names_the_settings_to_lower(packing):
    from config import TrainConfig
    from resilience import out_of_memory_message

    message = out_of_memory_message(TrainConfig(packing=packing, gradient_checkpointing=False))
    assert message.startswith("error: CUDA out of memory") and "\n" not in message
    assert ("--pack-tokens 4096" in message) == packing and ("--batch-size 4" in message) != packing
    assert "--max-length 1024" in message and "turn --gradient-checkpointing on" in message and "--resume" in message


def test_out_of_memory_in_training_is_one_line_and_exit_code_1(monkeypatch, capsys):
    from unittest import mock

    import torch

    import main
    import training
    from config import TrainConfig

    trainer = mock.MagicMock()  # a Trainer whose train() runs out of GPU memory
    trainer.train.side_effect = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(training.TrainingStopped) as stopped:
        training.train(trainer, TrainConfig(), has_val=False)
    assert stopped.value.code == 1 and "lower --pack-tokens 4096" in stopped.value.message
    monkeypatch.setattr(main, "run", lambda argv: training.train(trainer, TrainConfig(), has_val=False))
    assert main.main([]) == 1
    assert capsys.readouterr().err.startswith("error: CUDA out of memory while training: lower --pack-tokens")


def test_signal_handlers_are_restored_after_training():
    from resilience import StopOnSignal

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    stop = StopOnSignal()
    with stop.handling_signals():
        os.kill(os.getpid(), signal.SIGTERM)  # handled: a flag, no exit
        time.sleep(0.05)
    assert stop.signum == signal.SIGTERM
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


@pytest.mark.parametrize("caught, checks", [(None, [3, 4, 6]), (signal.SIGTERM, [3])])
def test_every_process_joins_the_signal_check_at_the_same_steps_whatever_it_caught(caught, checks, monkeypatch):
    """The check is a collective: whether a process joins may depend only on values equal on every process.

    every=3 and a scheduled save at step 4: the checks are at steps 3, 4, 6, ... A process that caught SIGTERM before
    step 1 still waits for the check at step 3 (its peers only look then) and joins it (the old code skipped it);
    one that caught nothing stops when a peer reports SIGTERM (here at the third check, step 6).
    """
    from types import SimpleNamespace

    import resilience

    joined: list[tuple[int, int]] = []

    def all_reduce(value, group=None):
        joined.append((step, value))
        return signal.SIGTERM if len(joined) == 3 else value  # a peer caught SIGTERM before the third check

    monkeypatch.setattr(resilience, "_distributed", lambda: True)
    monkeypatch.setattr(resilience, "_largest_across_processes", all_reduce)
    stop = resilience.StopOnSignal(every=3)
    stop.signum = caught
    for step in range(1, 12):
        control = SimpleNamespace(should_save=step == 4, should_training_stop=False)
        stop.on_step_end(None, SimpleNamespace(global_step=step), control)
        if control.should_training_stop:
            break
    assert joined == [(s, int(caught or 0)) for s in checks]
    assert step == checks[-1] and control.should_save and stop.agreed() == signal.SIGTERM


def test_steady_throughput_skips_the_first_steps():
    from types import SimpleNamespace

    from training import SteadyThroughput

    speed = SteadyThroughput(skip=1)
    assert speed.tokens_per_second() is None
    for t, tokens in ((0.0, 100), (10.0, 1100), (12.0, 2100), (14.0, 3100)):  # a slow first step, then 500 tokens/s
        speed.on_step_end(None, SimpleNamespace(num_input_tokens_seen=tokens), None)
        speed.marks[-1] = (t, tokens)  # the callback's own clock replaced by a scripted one
    assert speed.tokens_per_second() == pytest.approx(500.0)
