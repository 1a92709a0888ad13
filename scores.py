"""Scores that compare a model's answers with dolly reference responses, and the base model with the fine-tuned one.

    from scores import token_f1, rouge_l, paired_bootstrap, verdict
    base = [token_f1(p, r) for p, r in zip(base_answers, references)]
    tuned = [token_f1(p, r) for p, r in zip(tuned_answers, references)]
    ci = paired_bootstrap(base, tuned)
    verdict(ci)                      # "better", "worse" or "no significant difference"

Per-answer scores, each in [0, 1], higher is better:

- exact_match: 1.0 when the answer equals the reference after SQuAD normalization (lowercase, no
  punctuation, no articles a/an/the, single spaces), else 0.0. Strict: only meaningful for short
  factual answers (closed_qa, classification); a correct answer phrased differently scores 0.
- token_f1: SQuAD's token-level F1, the harmonic mean of precision (share of the answer's tokens
  found in the reference) and recall (share of the reference's tokens found in the answer),
  counting repeated tokens at most as often as they occur on both sides. Rewards partial overlap,
  ignores word order.
- rouge_l: ROUGE-L F-measure from the rouge-score package (Porter stemming on): precision and
  recall of the longest common subsequence of tokens, so it rewards content in the same order
  without requiring it to be contiguous. The usual score for free-form answers (open_qa,
  summarization, creative_writing).

Comparing two models on the same items:

- paired_bootstrap: the mean score of each model, their difference (tuned - base) and a
  percentile confidence interval for that difference, from resampling the *items* with
  replacement (both models' scores for an item stay together, so the per-item difficulty cancels),
  and a two-sided bootstrap p-value for "no difference".
- holm: Holm–Bonferroni adjusted p-values, for the many verdicts of one report (overall and per
  category, several metrics): by chance alone some of 30 uncorrected 95% verdicts would flip.
- verdict: "better" when the whole interval lies on the good side of 0, "worse" when it lies on
  the bad side, otherwise "no significant difference" (an interval that contains 0). For scores
  where lower is better (NLL, perplexity) pass higher_is_better=False.
"""

from __future__ import annotations

import functools
import math
import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np
from rouge_score import rouge_scorer

PUNCTUATION = frozenset(string.punctuation)
ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
BOOTSTRAP_CHUNK = 10_000_000  # resampled indices held in memory at once (80 MB of int64)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalization: lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in PUNCTUATION)
    text = ARTICLES_RE.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when prediction and reference are equal after normalize_answer, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token-level F1 of the normalized tokens; 1.0 when both sides have no tokens, 0.0 when only one has none."""
    pred_tokens = normalize_answer(prediction).split()
    ref_tokens = normalize_answer(reference).split()
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    overlap = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


@functools.lru_cache(maxsize=1)
def _rouge_l_scorer() -> rouge_scorer.RougeScorer:
    """The one ROUGE-L scorer (with Porter stemming), built on first use."""
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (stemmed) of prediction against reference; 0.0 when either is empty."""
    if not prediction.strip() or not reference.strip():
        return 0.0
    return float(_rouge_l_scorer().score(reference, prediction)["rougeL"].fmeasure)


def paired_bootstrap(base: Sequence[float], tuned: Sequence[float], n_resamples: int = 2000, seed: int = 0,
                     confidence: float = 0.95) -> dict[str, float]:
    """Means, their difference (tuned - base) and a paired-bootstrap percentile CI for the difference."""
    if len(base) != len(tuned):
        raise ValueError(f"paired_bootstrap needs one base and one tuned score per item, got {len(base)} and {len(tuned)}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1 (exclusive), got {confidence}")
    n = len(base)
    if n == 0:
        return {"base": math.nan, "tuned": math.nan, "diff": math.nan, "ci_low": math.nan, "ci_high": math.nan, "p": math.nan, "n": 0}
    base_arr = np.asarray(base, dtype=np.float64)
    tuned_arr = np.asarray(tuned, dtype=np.float64)
    base_mean, tuned_mean = float(base_arr.mean()), float(tuned_arr.mean())
    diff = tuned_mean - base_mean
    if n == 1:
        return {"base": base_mean, "tuned": tuned_mean, "diff": diff, "ci_low": diff, "ci_high": diff, "p": math.nan, "n": 1}
    per_item = tuned_arr - base_arr
    rng = np.random.default_rng(seed)
    rows = max(1, BOOTSTRAP_CHUNK // n)  # resamples per chunk, so memory stays bounded for large n
    means = np.concatenate([per_item[rng.integers(0, n, size=(min(rows, n_resamples - start), n))].mean(axis=1)
                            for start in range(0, n_resamples, rows)])
    alpha = 1.0 - confidence
    ci_low, ci_high = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    # Two-sided bootstrap p-value: twice the share of resampled differences on the far side of 0 (at most 1).
    p = min(1.0, 2 * min(float((means <= 0).mean()), float((means >= 0).mean())))
    return {"base": base_mean, "tuned": tuned_mean, "diff": diff, "ci_low": float(ci_low), "ci_high": float(ci_high), "p": p, "n": n}


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the input order: reject test i at family-wise level a when adjusted[i] < a.

    Sorted ascending, the k-th smallest p (k from 0) is multiplied by (m - k), and the adjusted values are made
    non-decreasing along that order (Holm, 1979). Controls the chance of any false "better"/"worse" among m tests.
    """
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * p_values[i]))
        adjusted[i] = running
    return adjusted


def verdict(ci: dict[str, float], higher_is_better: bool = True) -> str:
    """Verdict on a paired_bootstrap CI: better/worse when it excludes 0 on the good/bad side, else no significant difference."""
    low, high = ci["ci_low"], ci["ci_high"]
    if low > 0:  # NaN compares False both ways: no data is no significant difference
        return "better" if higher_is_better else "worse"
    if high < 0:
        return "worse" if higher_is_better else "better"
    return "no significant difference"
