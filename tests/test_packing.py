"""Padding-free packed batches: records stay isolated, so packed losses equal per-record losses."""

from __future__ import annotations

import datasets
import pytest
import torch

from conftest import record
from dataset import IGNORE_INDEX, collate_packed, pack_examples, tokenize_record


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import AutoModelForCausalLM

    from tiny_llama import ensure_tiny_llama

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(ensure_tiny_llama(), dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False  # as in training (model.add_lora): a KV cache disables the packed-sequence mask
    return model.eval()


def examples(tokenizer, n=5):
    rows = [record(f"Question number {i}?" * (i + 1), "Some context. " * i, f"Answer {i} " * (2 * i + 1)) for i in range(n)]
    return [tokenize_record(r, tokenizer, 256)[0] for r in rows]


def test_packed_forward_equals_per_record_forward(tiny_model, tiny_tokenizer):
    exs = examples(tiny_tokenizer)
    packed = pack_examples(datasets.Dataset.from_list(exs), max_tokens=100_000, seed=0)
    assert len(packed) == 1
    batch = collate_packed([packed[0]])
    with torch.no_grad():
        packed_out = tiny_model(**batch)
        sums, count, offset = 0.0, 0, 0
        order = []  # pack order is seeded-random: find each record by its tokens
        for ex in exs:
            ids = torch.tensor([ex["input_ids"]])
            out = tiny_model(input_ids=ids, labels=torch.tensor([ex["labels"]]))
            n = sum(t != IGNORE_INDEX for t in ex["labels"][1:])
            sums, count = sums + out.loss.item() * n, count + n
            order.append((ex["input_ids"], out.logits[0]))
    flat = batch["input_ids"][0].tolist()
    for ids, logits in order:
        start = next(i for i in range(len(flat)) if flat[i : i + len(ids)] == ids)
        torch.testing.assert_close(packed_out.logits[0, start : start + len(ids)], logits, rtol=1e-4, atol=1e-4)
        offset += len(ids)
    assert offset == len(flat)
    # The packed loss is the token-weighted mean of the per-record losses: the same training signal.
    assert packed_out.loss.item() == pytest.approx(sums / count, rel=1e-5)


def test_without_position_ids_records_would_leak(tiny_model, tiny_tokenizer):
    packed = pack_examples(datasets.Dataset.from_list(examples(tiny_tokenizer)), max_tokens=100_000, seed=0)
    batch = collate_packed([packed[0]])
    with torch.no_grad():
        isolated = tiny_model(**batch).loss.item()
        leaking = tiny_model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.item()
    assert leaking != pytest.approx(isolated, rel=1e-4)  # plain concatenation attends across records


def test_pack_examples_respects_the_budget_and_keeps_every_record(tiny_tokenizer):
    exs = examples(tiny_tokenizer, 12)
    packed = pack_examples(datasets.Dataset.from_list(exs), max_tokens=300, seed=3)
    assert all(len(row) <= 300 for row in packed["input_ids"])
    assert sum(len(r) for r in packed["input_ids"]) == sum(len(e["input_ids"]) for e in exs)
    starts = sum(p.count(0) for p in packed["position_ids"])
    assert starts == 12  # every record once, its positions restarting at 0
    for ids, labels, pos in zip(packed["input_ids"], packed["labels"], packed["position_ids"], strict=True):
        assert len(ids) == len(labels) == len(pos)
        for i, p in enumerate(pos):
            if p == 0:
                assert labels[i] == IGNORE_INDEX  # nothing learns to predict across a record boundary
    again = pack_examples(datasets.Dataset.from_list(exs), max_tokens=300, seed=3)
    assert again["input_ids"] == packed["input_ids"]


def test_collate_packed_makes_one_unpadded_row():
    batch = collate_packed([{"input_ids": [1, 5], "labels": [-100, 5], "position_ids": [0, 1]},
                            {"input_ids": [1, 7, 8], "labels": [-100, 7, 8], "position_ids": [0, 1, 2]}])
    assert batch["input_ids"].tolist() == [[1, 5, 1, 7, 8]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2]]
    assert batch["labels"].tolist() == [[-100, 5, -100, 7, 8]]
    assert "attention_mask" not in batch


def test_the_training_model_keeps_packed_records_apart(tiny_tokenizer):
    """The real path: 4-bit base + LoRA from load_for_training, as main.py builds it."""
    from config import TrainConfig
    from hub import TINY_MODEL
    from loading import load_for_training

    model, tokenizer, _ = load_for_training(TrainConfig(base_model=TINY_MODEL))
    assert model.config.use_cache is False
    exs = examples(tokenizer, 3)
    batch = {k: v.to(model.device) for k, v in collate_packed([pack_examples(datasets.Dataset.from_list(exs), 100_000, 0)[0]]).items()}
    model.eval()  # no dropout, so both forwards see the same function
    as_batch = {"device": model.device}
    with torch.no_grad():
        packed = model(**batch).loss.item()
        per_record = [(model(input_ids=torch.tensor([e["input_ids"]], **as_batch),
                             labels=torch.tensor([e["labels"]], **as_batch)).loss.item(),
                       sum(t != IGNORE_INDEX for t in e["labels"][1:])) for e in exs]
    expected = sum(loss * n for loss, n in per_record) / sum(n for _, n in per_record)
    # fp32 compute on the CPU; bf16 on CUDA rounds differently for different sequence lengths.
    assert packed == pytest.approx(expected, rel=1e-4 if model.device.type == "cpu" else 1e-2)
