"""Dolly records -> instruction prompts -> input_ids/labels. Knows prompts and tokens, never models.

    from dataset import create_question
    create_question({"instruction": "What is the capital of France?", "context": ""})

The prompt template is data (templates/dolly.json) and `create_question` is the only place
that renders it, for training and for inference alike, so the two cannot drift.

Label masking: every prompt token is -100; the response tokens and one final EOS are
supervised, so the model learns to answer and to stop. Padding uses the tokenizer's UNK
token (id 0 for Llama 2), never EOS: a collator that masks pad positions would otherwise
mask the EOS labels too and the model would never learn to stop.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections import Counter, defaultdict
from typing import Any

import datasets
import numpy as np
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

ROOT = os.path.dirname(os.path.abspath(__file__))
TEMPLATE_PATH = os.path.join(ROOT, "templates", "dolly.json")
SAMPLE_PATH = os.path.join(ROOT, "data", "dolly_sample.jsonl")
REQUIRED_COLUMNS = ("instruction", "context", "response", "category")
CATEGORIES = ("open_qa", "closed_qa", "general_qa", "classification", "information_extraction",
              "summarization", "brainstorming", "creative_writing")
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
IGNORE_INDEX = -100  # label value ignored by the cross-entropy loss
CONTEXT_FLOOR = 64  # tokens of context kept (if it has that many) before the response's end is cut
STATUSES = ("kept", "truncated_context", "truncated_response", "dropped_empty_instruction",
            "dropped_empty_response", "dropped_prompt_too_long")


class DataError(ValueError):
    """A problem with the user's data, reported as one line naming the file."""


def load_template(path: str = TEMPLATE_PATH) -> dict[str, str]:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


TEMPLATE = load_template()


def create_question(sample: dict[str, Any], template: dict[str, str] = TEMPLATE) -> str:
    """The prompt for one record: the template with instruction and, when non-empty, context."""
    instruction = (sample.get("instruction") or "").strip()
    context = (sample.get("context") or "").strip()
    if context:
        return template["prompt_input"].format(instruction=instruction, context=context)
    return template["prompt_no_input"].format(instruction=instruction)


# --- loading -------------------------------------------------------------------------


def load_records(name_or_path: str, max_records: int | None = None) -> datasets.Dataset:
    """A hub dataset id or a local .jsonl/.json/.parquet/.csv file, checked for the dolly columns."""
    ext = os.path.splitext(name_or_path)[1].lower()
    if not os.path.exists(name_or_path) and os.path.exists(os.path.join(ROOT, name_or_path)):
        name_or_path = os.path.join(ROOT, name_or_path)  # presets name the shipped sample relative to the repo
    if os.path.exists(name_or_path) or ext in LOCAL_FORMATS:
        ds = _load_local(name_or_path, ext)
    else:
        ds = _load_hub(name_or_path)
    check_columns(ds, name_or_path)
    if max_records is not None:
        ds = ds.select(range(min(max_records, len(ds))))
    return ds


def _load_local(path: str, ext: str) -> datasets.Dataset:
    if not os.path.isfile(path):
        raise DataError(f"dataset file not found: {path}")
    if ext not in LOCAL_FORMATS:
        raise DataError(f"{path}: unsupported file type {ext!r}; use one of {', '.join(LOCAL_FORMATS)}")
    try:
        return datasets.load_dataset(LOCAL_FORMATS[ext], data_files=path, split="train")
    except Exception as err:  # datasets wraps parser errors in many types
        raise DataError(f"{path}: could not be read as {ext[1:]}: {_first_line(err)}") from err


def _load_hub(name: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(name, split="train")
    except (ConnectionError, OSError) as err:
        raise DataError(
            f"could not load dataset {name!r} from the Hugging Face hub ({_first_line(err)}). "
            f"Check the network, or pass a local file: --dataset {os.path.relpath(SAMPLE_PATH)}"
        ) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def check_columns(ds: datasets.Dataset, source: str) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {', '.join(missing)}; found {', '.join(ds.column_names) or 'none'}. "
            f"Expected {', '.join(REQUIRED_COLUMNS)}."
        )


# --- split -----------------------------------------------------------------------------


def split_records(ds: datasets.Dataset, val_fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Seeded train/validation split, stratified by category (largest-remainder allocation)."""
    if val_fraction == 0 or len(ds) < 2:
        return ds, ds.select([])
    by_category: dict[str, list[int]] = defaultdict(list)
    for i, category in enumerate(ds["category"]):
        by_category[str(category)].append(i)
    total = max(1, round(len(ds) * val_fraction))
    quotas = {c: len(idx) * val_fraction for c, idx in by_category.items()}
    counts = {c: math.floor(q) for c, q in quotas.items()}
    by_remainder = sorted(quotas, key=lambda c: (-(quotas[c] - counts[c]), c))
    for c in by_remainder[: max(0, total - sum(counts.values()))]:
        counts[c] += 1
    rng = random.Random(seed)
    val: list[int] = []
    for category in sorted(by_category):
        idx = list(by_category[category])
        rng.shuffle(idx)
        val.extend(idx[: counts[category]])
    val_set = set(val)
    train = [i for i in range(len(ds)) if i not in val_set]
    return ds.select(train), ds.select(sorted(val))


# --- tokenization ---------------------------------------------------------------------


def set_pad_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Give the tokenizer a pad token that is not EOS (Llama 2: <unk>, id 0). Returns its id."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token: the model could not learn to stop")
    if pad is not None and pad != eos:
        return pad
    if tokenizer.unk_token_id is None or tokenizer.unk_token_id == eos:
        raise DataError("the tokenizer has no pad or unk token distinct from EOS; add a pad token to it first")
    tokenizer.pad_token = tokenizer.unk_token
    return tokenizer.pad_token_id


def _ids(tokenizer: PreTrainedTokenizerBase, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def encode_pair(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Prompt ids exactly as inference sees them (with BOS), and the response ids that follow them.

    The response is cut out of the jointly tokenized text, so it is tokenized as it would be
    generated after the prompt; tokenizers whose boundary is not prefix-stable fall back to
    tokenizing the response alone.
    """
    prompt_ids = _ids(tokenizer, prompt, True)
    full = _ids(tokenizer, prompt + response, True)
    if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        return prompt_ids, full[len(prompt_ids):]
    return prompt_ids, _ids(tokenizer, response, False)


def tokenize_record(record: dict[str, Any], tokenizer: PreTrainedTokenizerBase, max_length: int) -> tuple[dict[str, list[int]] | None, str]:
    """(example, status): input_ids/labels within max_length, or None with the reason it was dropped.

    Too long: the context is cut from its end first, down to CONTEXT_FLOOR tokens; then the
    response's end (never its beginning). The context goes below the floor only if the prompt
    would otherwise leave no room for a single response token; if even that fails, drop.
    """
    response = record["response"].strip()
    if not record["instruction"].strip():
        return None, "dropped_empty_instruction"
    if not response:
        return None, "dropped_empty_response"
    sample, status = dict(record), "kept"
    prompt_ids, response_ids = encode_pair(tokenizer, create_question(sample), response)
    context = _ids(tokenizer, (sample.get("context") or "").strip(), False)
    keep, floor = len(context), min(len(context), CONTEXT_FLOOR)

    def overflow() -> int:
        return len(prompt_ids) + len(response_ids) + 1 - max_length

    while keep > 0 and (overflow() > 0 and keep > floor or len(prompt_ids) >= max_length):
        # Re-render and re-measure each time: detokenizing a cut context can shift a token.
        excess = overflow() if keep > floor else len(prompt_ids) - max_length + 1
        keep = max(floor if keep > floor else 0, keep - excess)
        sample["context"] = tokenizer.decode(context[:keep])
        prompt_ids, response_ids = encode_pair(tokenizer, create_question(sample), response)
        status = "truncated_context"
    eos = [tokenizer.eos_token_id]
    if overflow() > 0:
        room = max_length - len(prompt_ids)
        if room < 1:
            return None, "dropped_prompt_too_long"
        # The response keeps its beginning; it gets no EOS, since the model must not learn to stop mid-answer.
        response_ids, eos, status = response_ids[:room], [], "truncated_response"
    input_ids = prompt_ids + response_ids + eos
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids + eos
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}, status


def tokenize_records(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, source: str = "dataset") -> tuple[datasets.Dataset, dict[str, Any]]:
    """Tokenize every record under the length policy; returns the examples and a summary of what happened."""
    examples, statuses, prompt_lens = [], Counter(), []
    for row, record in enumerate(ds):
        for column in ("instruction", "response"):
            if not isinstance(record[column], str):
                raise DataError(f"{source}: record {row}: column {column!r} must be text, got {type(record[column]).__name__}")
        example, status = tokenize_record(record, tokenizer, max_length)
        statuses[status] += 1
        if example is not None:
            assert any(label != IGNORE_INDEX for label in example["labels"]), f"record {row} has no supervised token"
            examples.append(example)
            prompt_lens.append(example["labels"].count(IGNORE_INDEX))
    lengths = np.array([len(e["input_ids"]) for e in examples] or [0])
    summary = {
        "records": len(ds),
        "kept": len(examples),
        **{s: statuses[s] for s in STATUSES if s != "kept"},
        "tokens": int(lengths.sum()),
        "supervised_tokens": int(lengths.sum() - sum(prompt_lens)),
        "length_mean": round(float(lengths.mean()), 1),
        **{f"length_p{p}": int(np.percentile(lengths, p)) for p in (50, 90, 99)},
        "length_max": int(lengths.max()),
    }
    empty = {"input_ids": [], "attention_mask": [], "labels": []}
    return datasets.Dataset.from_list(examples) if examples else datasets.Dataset.from_dict(empty), summary


def format_summary(name: str, summary: dict[str, Any]) -> str:
    dropped = {k: v for k, v in summary.items() if k.startswith(("dropped", "truncated")) and v}
    changes = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in dropped.items()) or "none dropped or truncated"
    return (
        f"{name}: {summary['kept']}/{summary['records']} records kept ({changes}); "
        f"tokens per record mean {summary['length_mean']}, p50 {summary['length_p50']}, "
        f"p90 {summary['length_p90']}, p99 {summary['length_p99']}, max {summary['length_max']}; "
        f"{summary['tokens']:,} tokens, {summary['supervised_tokens']:,} supervised"
    )


def make_collator(tokenizer: PreTrainedTokenizerBase) -> DataCollatorForSeq2Seq:
    """Pads input_ids with the pad token (never EOS) and labels with -100, to the batch's longest record."""
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")
