"""Shared fixtures: a tiny random Llama built in code (cached once per session), tokenizers, data files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
LLAMA2_TOKENIZER = os.path.join(ROOT, "..", "shared", "llama2-tokenizer")
# Built once per machine: the tiny model is deterministic (seeded weights, BPE trained on the shipped sample).
os.environ.setdefault("LLAMA_DOLLY_CACHE", os.path.join(ROOT, ".pytest_cache", "llama-dolly"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run where CUDA is; elsewhere they are skipped, saying why. `slow` ones run only with -m slow."""
    import torch

    if "slow" not in (config.getoption("-m") or ""):
        skip_slow = pytest.mark.skip(reason="slow (torch.compile on the CPU, ~2-3 minutes): run with -m slow")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip_slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu); this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from loading import load_tokenizer
    from tiny_llama import ensure_tiny_llama

    return load_tokenizer(ensure_tiny_llama())


@pytest.fixture(scope="session")
def llama2_tokenizer():
    if not os.path.isfile(os.path.join(LLAMA2_TOKENIZER, "tokenizer.model")):
        pytest.skip("the real Llama 2 tokenizer (../shared/llama2-tokenizer) is not on this machine")
    from loading import load_tokenizer

    return load_tokenizer(LLAMA2_TOKENIZER)


def two_answers_batch(tokenizer):
    """Two short answers in the template's response format, padded, the padding labelled -100: what the --dense-base
    tests train on."""
    batch = tokenizer(["### Response:\nParis is the capital of France.", "### Response:\nBlue."], return_tensors="pt", padding=True)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def tiny_4bit_for_training(dense_base: str):
    """The tiny 4-bit base loaded for training as main.py does, with --dense-base `dense_base`, unpacked rows and the
    same LoRA init every call (seed 0)."""
    import torch

    from config import TrainConfig
    from hub import TINY_MODEL
    from loading import load_for_training

    torch.manual_seed(0)
    model, _, _ = load_for_training(TrainConfig(base_model=TINY_MODEL, quantization="4bit", dense_base=dense_base, packing=False, seed=0))
    return model


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    return str(path)


def record(instruction="Who wrote Hamlet?", context="", response="William Shakespeare.", category="open_qa"):
    return {"instruction": instruction, "context": context, "response": response, "category": category}


FAKE_TOKEN = "hf_FAKEtokenThatMustNeverAppear1234567890"
# One CPU thread: bitsandbytes' multi-threaded CPU kernels sum in a varying order (~1e-3 run to run),
# while one thread gives the same floats every run, which the resume test needs.
THREADS = {"OMP_NUM_THREADS": "1"}


def inherited_env() -> dict[str, str]:
    """This process's environment without what an in-process training test left in it: Trainer sets
    TENSORBOARD_LOGGING_DIR to its own run's folder, which a later main.py subprocess would write its logs to."""
    return {k: v for k, v in os.environ.items() if k != "TENSORBOARD_LOGGING_DIR"}


def run(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, capture_output=True, text=True,
        env={**inherited_env(), "HF_TOKEN": FAKE_TOKEN, **THREADS, **(env or {})}, timeout=600,
    )


def answers(llama, questions, **kwargs) -> list[str]:
    """The answer texts of Llama.generate, in input order."""
    return [g["answer"] for g in llama.generate(questions, **kwargs)]


def step_losses(output_dir: str) -> list[float]:
    checkpoints = os.path.join(output_dir, "checkpoints")
    last = max(os.listdir(checkpoints), key=lambda name: int(name.split("-")[1]))
    with open(os.path.join(checkpoints, last, "trainer_state.json")) as fh:
        return [h["loss"] for h in json.load(fh)["log_history"] if "loss" in h]
