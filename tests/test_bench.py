"""bench/train_speed.py's arithmetic: the fixed overhead per micro-batch fitted from two token budgets of one setting, the
order of the runs, and the plain-HF baseline's timed window (one length-grouped megabatch)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import train_speed  # noqa: E402


def row(name: str, seconds: float, real_tokens: int, budget: int, padded: bool) -> dict:
    plan = {"gradient_checkpointing": False, "compile": "on", "compile_mode": "reduce-overhead", "pad_to_budget": padded,
            "attention": "varlen", "dense_base": "fp8_backward", "pack_open_rows": 1, "pack_tokens": budget}
    return {"variant": name, "seconds_per_micro_batch": seconds, "tokens_per_micro_batch": real_tokens, "plan": plan}


def test_fixed_overhead_is_the_intercept_over_real_tokens_and_over_computed_ones_when_padded():
    """0.15 s for 2,000 real tokens, 0.45 s for 8,000: 5e-5 s per token and 0.05 s at zero. Padded to 2,560 and 8,192
    tokens, the tokens computed give 0.3 / 5,632 s per token and 0.15 - 2,560 x that at zero (the padding is not overhead)."""
    small, large = row("small", 0.15, 2000, 2560, True), row("large", 0.45, 8000, 8192, True)
    fit = train_speed.fixed_overhead_s(large, small)
    assert fit["pair"] == ["large", "small"] and fit["fixed_overhead_s"] == pytest.approx(0.05)
    assert fit["seconds_per_token"] == pytest.approx(5e-5) and fit["marginal_tokens_per_s"] == 20000
    assert fit["fixed_overhead_computed_s"] == pytest.approx(round(0.15 - 2560 * 0.3 / 5632, 4))
    unpadded = train_speed.fixed_overhead_s(row("a", 0.15, 2000, 2048, False), row("b", 0.45, 8000, 8192, False))
    assert "fixed_overhead_computed_s" not in unpadded


def test_overheads_pair_only_one_setting_at_two_budgets():
    rows = {"small": row("small", 0.15, 2000, 2560, True), "large": row("large", 0.45, 8000, 8192, True),
            "other": row("other", 0.40, 8000, 8192, False), "capped": row("capped", 0.1, 1000, 2048, True) | {"cap_gib": 24}}
    fits = train_speed.overheads(rows)
    assert [f["pair"] for f in fits] == [["small", "large"]]  # unpadded "other" has no partner; a capped run is left out


def test_the_baselines_further_runs_come_after_every_other_variant():
    """--baseline-runs 2: each plain-HF variant runs where it is listed and once more at the end (its fastest kept), so
    its best run sees both ends of the command; the project's variants run once."""
    names = ["hf_tuned", "default_cap24", "nf4_cap24", "hf_tuned_nogc"]
    assert train_speed.schedule(names, 2) == names + ["hf_tuned", "hf_tuned_nogc"]
    assert train_speed.schedule(names, 1) == names
    assert train_speed.schedule(["default_cap24", "hf_tuned"], 3) == ["default_cap24", "hf_tuned", "hf_tuned", "hf_tuned"]
    # --variant-runs 2: the project's variants alternate (A, B, A, B) between the baseline's first run and its last
    assert train_speed.schedule(["hf_tuned", "default_cap24", "cap24_firstfit"], 2, 2) == [
        "hf_tuned", "default_cap24", "cap24_firstfit", "default_cap24", "cap24_firstfit", "hf_tuned"]


@pytest.mark.parametrize(("records", "batch", "window"), [(3000, 16, (46, 92)), (3000, 8, (50, 100)), (40, 16, (1, 2))])
def test_the_megabatch_window_times_exactly_the_second_length_grouped_megabatch(records, batch, window):
    """--baseline-window megabatch against transformers' own group_by_length sampler: the timed batches (steps warmup+1 ..
    steps) are exactly one megabatch, sorted longest first, that starts and ends where the sampler cut it; issue 12's
    window (steps 4-8) sits among the longest batches of the first one."""
    import random

    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    assert train_speed.megabatch_window(records, batch) == window
    warmup, steps = window
    rng = random.Random(0)
    lengths = [rng.randint(20, 1024) for _ in range(records)]
    order = list(LengthGroupedSampler(batch, lengths=lengths, generator=torch.Generator().manual_seed(0)))
    size = warmup * batch  # one megabatch, in records
    timed = [lengths[i] for i in order[warmup * batch: steps * batch]]
    # one sorted megabatch: its first record may be the one swapped out of the first megabatch for the longest of all
    assert len(timed) == size and timed[1:] == sorted(timed[1:], reverse=True)
    # the sampler's second megabatch: the records of that slice of its random permutation, but for that one swap
    perm = torch.randperm(records, generator=torch.Generator().manual_seed(0)).tolist()
    assert len(set(order[warmup * batch: steps * batch]) ^ set(perm[size: 2 * size])) <= 2
    if warmup >= 8:  # issue 12's steps 4-8 hold longer records than the mean of a megabatch
        assert sum(lengths[i] for i in order[3 * batch: 8 * batch]) / (5 * batch) > 1.5 * sum(timed) / len(timed)


def test_only_the_length_grouped_baselines_get_the_megabatch_window():
    """baseline_window: hf_tuned / hf_tuned_nogc under --baseline-window megabatch; the randomly sampled plain-HF setup, the
    project's variants and --baseline-window steps keep --warmup / --steps (None)."""
    args = type("Args", (), {"baseline_window": "megabatch"})()
    assert train_speed.baseline_window(args, "hf_tuned", 3000) == (46, 92)
    assert train_speed.baseline_window(args, "hf_tuned_nogc", 3000) == (50, 100)
    assert train_speed.baseline_window(args, "baseline", 3000) is None  # hf_common: random sampling
    assert train_speed.baseline_window(args, "default", 3000) is None
    args.baseline_window = "steps"
    assert train_speed.baseline_window(args, "hf_tuned", 3000) is None
