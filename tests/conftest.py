"""Shared fixtures: a tiny random Llama built in code (cached once per session), tokenizers, data files."""

from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
LLAMA2_TOKENIZER = os.path.join(ROOT, "..", "shared", "llama2-tokenizer")
# Built once per machine: the tiny model is deterministic (seeded weights, BPE trained on the shipped sample).
os.environ.setdefault("LLAMA_DOLLY_CACHE", os.path.join(ROOT, ".pytest_cache", "llama-dolly"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from model import ensure_tiny_llama, load_tokenizer

    return load_tokenizer(ensure_tiny_llama())


@pytest.fixture(scope="session")
def llama2_tokenizer():
    if not os.path.isfile(os.path.join(LLAMA2_TOKENIZER, "tokenizer.model")):
        pytest.skip("the real Llama 2 tokenizer (../shared/llama2-tokenizer) is not on this machine")
    from model import load_tokenizer

    return load_tokenizer(LLAMA2_TOKENIZER)


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    return str(path)


def record(instruction="Who wrote Hamlet?", context="", response="William Shakespeare.", category="open_qa"):
    return {"instruction": instruction, "context": context, "response": response, "category": category}
