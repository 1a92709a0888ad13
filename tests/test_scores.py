"""scores.py: golden values for SQuAD normalization, EM, token F1, ROUGE-L; the paired bootstrap and the verdict."""

from __future__ import annotations

import math

import numpy as np
import pytest

from scores import exact_match, normalize_answer, paired_bootstrap, rouge_l, token_f1, verdict


@pytest.mark.parametrize("text, expected", [
    # lower -> drop punctuation ("-" and "," vanish, no space added) -> drop "the" -> single spaces
    ("The  Eiffel-Tower, in PARIS!", "eiffeltower in paris"),
    ("A cat, an apple & the dog.", "cat apple dog"),
    ("  Theater  and anthem  ", "theater and anthem"),  # articles only as whole words
    ("It's 3.14", "its 314"),
    ("", ""),
    ("The. A, an!", ""),
])
def test_normalize_answer_golden(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match():
    assert exact_match("The Cat.", "cat") == 1.0
    assert exact_match("  PARIS!! ", "paris") == 1.0
    assert exact_match("a dog", "cat") == 0.0
    assert exact_match("cat sat", "cat") == 0.0
    assert exact_match("", "") == 1.0


def test_token_f1_equal_lengths():
    # pred [cat, sat, on, mat], ref [cat, sat, on, hat]: overlap 3, P = 3/4, R = 3/4, F1 = 0.75
    assert token_f1("the cat sat on the mat", "a cat sat on a hat") == pytest.approx(0.75)


def test_token_f1_unequal_lengths():
    # pred [cat, sat], ref [cat, sat, on, mat]: overlap 2, P = 2/2 = 1, R = 2/4 = 0.5, F1 = 2*1*0.5/1.5 = 2/3
    assert token_f1("The cat sat.", "a cat sat on the mat") == pytest.approx(2 / 3)
    # pred [paris, is, capital], ref [paris]: overlap 1, P = 1/3, R = 1, F1 = 2*(1/3)*1/(4/3) = 0.5
    assert token_f1("Paris is the capital", "Paris") == pytest.approx(0.5)


def test_token_f1_counts_repeats_once_per_match():
    # pred [cat, cat, cat], ref [cat]: overlap min(3, 1) = 1, P = 1/3, R = 1, F1 = 0.5
    assert token_f1("cat cat cat", "cat") == pytest.approx(0.5)


def test_token_f1_identical_disjoint_and_empty():
    assert token_f1("William Shakespeare", "william shakespeare.") == 1.0
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "") == 1.0
    assert token_f1("the", "a") == 1.0  # both normalize to no tokens
    assert token_f1("", "cat") == 0.0
    assert token_f1("cat", "") == 0.0


def test_rouge_l_golden():
    # tokens (words of <= 3 letters are never stemmed): pred [the, cat, sat, on, the, mat], ref [the, cat, is, on, the, mat]
    # LCS = [the, cat, on, the, mat] = 5; P = 5/6, R = 5/6, F = 5/6
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # pred [cat, on, mat] (3), ref [the, cat, sat, on, the, mat] (6): LCS = [cat, on, mat] = 3
    # P = 3/3 = 1, R = 3/6 = 0.5, F = 2*1*0.5/1.5 = 2/3
    assert rouge_l("cat on mat", "the cat sat on the mat") == pytest.approx(2 / 3)
    # same words, reversed order: LCS = 1 of 3 tokens each side, P = R = F = 1/3 (order matters, unlike token F1)
    assert rouge_l("mat on cat", "cat on mat") == pytest.approx(1 / 3)
    assert token_f1("mat on cat", "cat on mat") == 1.0


def test_rouge_l_stems_and_edges():
    assert rouge_l("Running dogs", "run dog") == pytest.approx(1.0)  # Porter: running -> run, dogs -> dog
    assert rouge_l("The cat sat on the mat.", "The cat sat on the mat.") == pytest.approx(1.0)
    assert rouge_l("", "the cat") == 0.0
    assert rouge_l("the cat", "") == 0.0
    assert rouge_l("   ", "the cat") == 0.0
    assert rouge_l("dog", "cat") == 0.0


def test_paired_bootstrap_recovers_a_known_difference():
    rng = np.random.default_rng(123)
    base = rng.normal(0.5, 0.1, size=400)
    tuned = base + 0.05 + rng.normal(0.0, 0.02, size=400)
    ci = paired_bootstrap(base.tolist(), tuned.tolist())
    assert ci["n"] == 400
    assert ci["base"] == pytest.approx(base.mean())
    assert ci["tuned"] == pytest.approx(tuned.mean())
    assert ci["diff"] == pytest.approx(tuned.mean() - base.mean())
    assert ci["ci_low"] < 0.05 < ci["ci_high"]
    assert ci["ci_low"] > 0
    assert ci["ci_low"] < ci["diff"] < ci["ci_high"]
    # standard error of the mean difference is ~0.02/sqrt(400) = 0.001, so the 95% CI is ~0.004 wide
    assert ci["ci_high"] - ci["ci_low"] < 0.01
    assert verdict(ci) == "better"


def test_paired_bootstrap_pairing_cancels_item_difficulty():
    # a big spread across items but the same +0.01 on every item: paired, the CI is exactly [0.01, 0.01]
    base = np.linspace(0.0, 0.9, 50)
    ci = paired_bootstrap(base.tolist(), (base + 0.01).tolist())
    assert ci["ci_low"] == pytest.approx(0.01)
    assert ci["ci_high"] == pytest.approx(0.01)


def test_paired_bootstrap_identical_sequences():
    scores = [0.0, 1.0, 0.25, 0.5, 0.75]
    ci = paired_bootstrap(scores, list(scores))
    assert ci["diff"] == 0.0
    assert ci["ci_low"] == 0.0
    assert ci["ci_high"] == 0.0
    assert verdict(ci) == "no significant difference"


def test_paired_bootstrap_is_seeded():
    rng = np.random.default_rng(7)
    base = rng.uniform(size=100).tolist()
    tuned = rng.uniform(size=100).tolist()
    assert paired_bootstrap(base, tuned, seed=1) == paired_bootstrap(base, tuned, seed=1)
    other = paired_bootstrap(base, tuned, seed=2)
    first = paired_bootstrap(base, tuned, seed=1)
    assert (other["ci_low"], other["ci_high"]) != (first["ci_low"], first["ci_high"])
    assert other["diff"] == first["diff"]  # the point estimate does not depend on the seed


def test_paired_bootstrap_confidence_widens_the_interval():
    rng = np.random.default_rng(11)
    base = rng.uniform(size=200).tolist()
    tuned = rng.uniform(size=200).tolist()
    narrow = paired_bootstrap(base, tuned, confidence=0.5)
    wide = paired_bootstrap(base, tuned, confidence=0.99)
    assert wide["ci_low"] < narrow["ci_low"] < narrow["ci_high"] < wide["ci_high"]


def test_paired_bootstrap_small_and_invalid_inputs():
    with pytest.raises(ValueError, match="100 and 99"):
        paired_bootstrap([0.0] * 100, [0.0] * 99)
    with pytest.raises(ValueError):
        paired_bootstrap([0.0], [1.0], n_resamples=0)
    with pytest.raises(ValueError):
        paired_bootstrap([0.0], [1.0], confidence=1.0)
    empty = paired_bootstrap([], [])
    assert empty["n"] == 0
    assert all(math.isnan(empty[k]) for k in ("base", "tuned", "diff", "ci_low", "ci_high"))
    assert verdict(empty) == "no significant difference"
    one = paired_bootstrap([0.25], [0.75])
    assert math.isnan(one.pop("p"))  # one item: no test
    assert one == {"base": 0.25, "tuned": 0.75, "diff": 0.5, "ci_low": 0.5, "ci_high": 0.5, "n": 1}


def test_bootstrap_p_value_is_small_for_a_clear_gain_and_large_for_none():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, 200)
    clear = paired_bootstrap(base, base + 0.2 + rng.normal(0, 0.05, 200), seed=1)
    none = paired_bootstrap(base, base + rng.normal(0, 0.05, 200), seed=1)
    assert clear["p"] == 0.0 and 0.05 < none["p"] <= 1.0
    assert (clear["ci_low"] > 0) == (clear["p"] < 0.05)


def test_holm_adjusts_in_steps_and_keeps_the_order():
    from scores import holm

    # m = 4: sorted p 0.01, 0.02, 0.03, 0.2 -> x4, x3, x2, x1 -> 0.04, 0.06, 0.06 (monotone), 0.2
    assert holm([0.03, 0.01, 0.2, 0.02]) == pytest.approx([0.06, 0.04, 0.2, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0]) and holm([]) == []  # 0.5 x 2 = 1, capped; monotone after
    assert holm([0.04] * 10) == pytest.approx([0.4] * 10)  # ten tests at p=0.04: none survives


@pytest.mark.parametrize("low, high, higher_is_better, expected", [
    (0.01, 0.05, True, "better"),
    (-0.05, -0.01, True, "worse"),
    (-0.01, 0.05, True, "no significant difference"),
    (0.0, 0.05, True, "no significant difference"),  # touching 0 is not excluding it
    (-0.05, -0.01, False, "better"),  # e.g. NLL went down
    (0.01, 0.05, False, "worse"),
    (-0.05, 0.01, False, "no significant difference"),
    (-0.05, 0.0, False, "no significant difference"),
])
def test_verdict(low, high, higher_is_better, expected):
    ci = {"base": 0.0, "tuned": 0.0, "diff": (low + high) / 2, "ci_low": low, "ci_high": high, "n": 10}
    assert verdict(ci, higher_is_better=higher_is_better) == expected
