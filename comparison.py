"""What eval.py scores, and how it compares the fine-tuned model with its base so that a reviewer can trust each claim.

- **Which records**: `--split validation` selects the adapter's held-out records by the content fingerprints main.py
  stored (data_fingerprints.json), whatever the file is called now; any record the adapter was trained on is refused
  (`--allow-train-overlap` overrides, and says so in the report). `--limit N` is a seeded sample, stratified by category.
- **Equal stopping**: both models' answers end at EOS or at the template's next section marker, whichever comes first
  (dataset.section_markers); the report counts how each rule ended each side and keeps the raw text.
- **One perplexity**: token-weighted, exp(sum of NLL over supervised tokens / their count), as in training.
- **Verdicts**: one pre-declared primary test (overall ROUGE-L, 95% paired-bootstrap CI); every other verdict
  (each metric, overall and per category) is Holm–Bonferroni-corrected across the report, family-wise α = 0.05.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import scores
from config import FINGERPRINTS_NAME, ConfigError, EvalConfig, TrainConfig
from dataset import DataError, create_question, fingerprint, load_records, split_records, stratified_sample, tokenize_record
from model import Llama

METRICS: dict[str, dict[str, Any]] = {
    "rougeL": {"label": "ROUGE-L F", "higher_is_better": True},
    "f1": {"label": "token F1", "higher_is_better": True},
    "em": {"label": "exact match", "higher_is_better": True},
    "nll": {"label": "reference NLL", "higher_is_better": False},
    "answer_tokens": {"label": "answer tokens", "higher_is_better": None},
    "eos_rate": {"label": "ended with EOS", "higher_is_better": None},
}
NLL_BATCH = 8  # teacher-forced rows of up to max_length tokens: full-vocabulary float logits, so fewer than generation's
MIN_ITEMS_FOR_VERDICT = 10  # a bootstrap over fewer paired items says little; report the numbers, judge nothing
ALPHA = 0.05
# SQuAD-style F1 is the primary score where answers are short spans; ROUGE-L elsewhere.
PRIMARY = {"closed_qa": "f1", "information_extraction": "f1", "classification": "f1", "default": "rougeL"}
PRIMARY_TEST = ("overall", "rougeL")  # declared before any result: the one test the headline verdict rests on
STOPS = ("eos", "stop_string", "length")


Fingerprints = dict[str, set[str]]  # {"train": hashes, "validation": hashes} (dataset.fingerprint)


class LeakError(ConfigError):
    """Records about to be scored were in the adapter's training data."""


def read_fingerprints(adapter: str) -> Fingerprints | None:
    """The content hashes of the records main.py trained and validated on (None for an adapter without them)."""
    path = os.path.join(adapter, FINGERPRINTS_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    return {"train": set(data["train"]), "validation": set(data["validation"])}


def select_records(train: TrainConfig | None, prints: Fingerprints | None, cfg: EvalConfig) -> tuple[list[dict[str, Any]], str]:
    """The records to score (each with its index as id): the adapter's held-out records, or --dataset; filtered and sampled."""
    dataset = cfg.dataset or (train.dataset if train else None)
    if dataset is None:
        raise ConfigError("this adapter has no train_config.yaml naming its dataset; pass --dataset")
    same = train is not None and dataset == train.dataset
    records = load_records(dataset, train.max_records if same else None, cfg.skip_bad_records or (same and train.skip_bad_records))
    rows = [dict(r, id=i) for i, r in enumerate(records)]
    if (cfg.split or "all") == "validation":
        rows = held_out(rows, records, train, prints, dataset)
    rows = [r for r in rows if not cfg.categories or r["category"] in cfg.categories]
    if not rows:
        raise DataError(f"{dataset}: no records to evaluate in split {cfg.split or 'all'!r} for categories {cfg.categories}")
    if cfg.limit and cfg.limit < len(rows):
        rows = [rows[i] for i in stratified_sample([r["category"] for r in rows], cfg.limit, cfg.seed)]
    return rows, dataset


def held_out(
    rows: list[dict[str, Any]], records: Any, train: TrainConfig | None, prints: Fingerprints | None, dataset: str
) -> list[dict[str, Any]]:
    """The rows main.py held out: by stored fingerprint; for an adapter without fingerprints, by redoing the seeded split."""
    if prints is not None:
        kept = [r for r in rows if fingerprint(r) in prints["validation"]]
        print(f"[eval] {len(kept)} of the adapter's {len(prints['validation'])} held-out records found in {dataset} (by content hash)")
        return kept
    if train is None:
        raise ConfigError("--split validation needs the adapter's train_config.yaml or data_fingerprints.json")
    print(f"[eval] warning: the adapter has no {FINGERPRINTS_NAME} (trained before it existed): the held-out split is rebuilt "
          "from the dataset, seed and fraction, which is only right if the file is unchanged")
    _, val = split_records(records, train.val_fraction, train.seed)
    wanted = {fingerprint(r) for r in val}
    return [r for r in rows if fingerprint(r) in wanted]


def check_no_training_records(rows: list[dict[str, Any]], prints: Fingerprints | None, cfg: EvalConfig) -> int:
    """How many rows the adapter was trained on; a LeakError unless that is 0 or --allow-train-overlap was passed."""
    if prints is None:
        print(f"[eval] warning: the adapter has no {FINGERPRINTS_NAME}: overlap with its training data cannot be checked")
        return 0
    overlap = sum(fingerprint(r) in prints["train"] for r in rows)
    if overlap and not cfg.allow_train_overlap:
        raise LeakError(f"{overlap} of the {len(rows)} records to score were in the adapter's training data, which would flatter the "
                        "fine-tuned model; score --split validation, another --dataset, or pass --allow-train-overlap to score them anyway")
    return overlap


def score_items(
    llama: Llama, rows: list[dict[str, Any]], cfg: EvalConfig, max_length: int, stop_strings: list[str]
) -> list[dict[str, Any]]:
    """Generate with the adapter off and on (same stop rules), score each answer, and the reference NLL under each."""
    prompts = [create_question(r) for r in rows]
    examples = [tokenize_record(r, llama.tokenizer, max_length)[0] for r in rows]
    kept = [e for e in examples if e is not None]
    items = [{k: r[k] for k in ("id", "category", "instruction", "context")} | {"reference": r["response"].strip()} for r in rows]
    for item, example in zip(items, examples, strict=True):  # supervised tokens the reference NLL averages over
        item["nll_tokens"] = sum(label != -100 for label in example["labels"][1:]) if example is not None else 0
    for side, use_adapter in (("base", False), ("tuned", True)):
        generated = llama.generate(prompts, cfg.batch_size, use_adapter, progress=True, stop_strings=stop_strings,
                                   **generation(cfg))
        nll = iter(llama.nll(kept, use_adapter, NLL_BATCH))
        for item, gen, example in zip(items, generated, examples, strict=True):
            ref, answer = item["reference"], gen["answer"]
            item[side] = {
                "answer": answer, "rougeL": scores.rouge_l(answer, ref), "f1": scores.token_f1(answer, ref),
                "em": scores.exact_match(answer, ref), "nll": next(nll) if example is not None else float("nan"),
                "answer_tokens": gen["answer_tokens"], "eos_rate": float(gen["stop"] == "eos"), "stop": gen["stop"], "raw": gen["raw"],
            }
    return items


def generation(cfg: EvalConfig) -> dict[str, Any]:
    return {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p}


def aggregate(items: list[dict[str, Any]], cfg: EvalConfig) -> dict[str, Any]:
    """Per metric: base and tuned means, the paired-bootstrap 95% CI of the difference and its p-value (verdicts: assign_verdicts).

    Also the token-weighted perplexity of each side and how each side's answers ended (EOS, a stop string, the length limit).
    """
    out: dict[str, Any] = {"n": len(items), "scores": {}}
    for metric in METRICS:
        pairs = [(i["base"][metric], i["tuned"][metric]) for i in items]
        pairs = [(b, t) for b, t in pairs if b == b and t == t]  # NLL is NaN for records the length policy drops
        out["scores"][metric] = scores.paired_bootstrap([b for b, _ in pairs], [t for _, t in pairs], cfg.bootstrap_samples, cfg.seed)
    out["perplexity"] = {side: token_weighted_perplexity(items, side) for side in ("base", "tuned")}
    out["stops"] = {side: {s: sum(i[side]["stop"] == s for i in items) for s in STOPS} for side in ("base", "tuned")}
    return out


def token_weighted_perplexity(items: list[dict[str, Any]], side: str) -> float:
    """exp(sum over items of mean NLL x supervised tokens / all supervised tokens): the training loss's definition."""
    pairs = [(i[side]["nll"], i["nll_tokens"]) for i in items if i[side]["nll"] == i[side]["nll"] and i["nll_tokens"]]
    tokens = sum(n for _, n in pairs)
    return math.exp(sum(nll * n for nll, n in pairs) / tokens) if tokens else float("nan")


def assign_verdicts(aggregates: dict[str, Any]) -> dict[str, Any]:
    """Verdicts for every directional metric of every group: the primary test at 95%, all others Holm-corrected together.

    Returns the policy: the primary test, the number of corrected tests and the family-wise level.
    """
    groups = {"overall": aggregates["overall"], **aggregates["by_category"]}
    family = []
    for group, agg in groups.items():
        for metric, score in agg["scores"].items():
            higher = METRICS[metric]["higher_is_better"]
            if higher is None:
                score["verdict"] = None
            elif score["n"] < MIN_ITEMS_FOR_VERDICT:
                score["verdict"] = f"too few items (n<{MIN_ITEMS_FOR_VERDICT})"
            elif (group, metric) == PRIMARY_TEST:
                score["verdict"], score["test"] = scores.verdict(score, higher), "primary"
            else:
                family.append((score, higher))
    for (score, higher), p in zip(family, scores.holm([s["p"] for s, _ in family]), strict=True):
        score["p_holm"], score["test"] = p, "Holm-corrected"
        score["verdict"] = scores.verdict(score, higher) if p < ALPHA else "no significant difference"
    group, metric = PRIMARY_TEST
    return {"primary": {"group": group, "metric": metric, "level": 1 - ALPHA}, "corrected_tests": len(family), "family_alpha": ALPHA}
