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

import hashlib
import json
import math
import os
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import datasets
import numpy as np
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from cli import UserError

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


class DataError(UserError, ValueError):
    """A problem with the user's data, reported as one line naming the file."""


def load_template(path: str = TEMPLATE_PATH) -> dict[str, str]:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


TEMPLATE = load_template()


def section_markers(template: dict[str, str] = TEMPLATE) -> list[str]:
    """The template's section headers ("### Instruction:", "### Input:", "### Response:"): where an answer must end.

    A model that runs on into a new instruction/response block has finished its answer; eval.py cuts every answer,
    base and fine-tuned alike, at the first of these (or at EOS), so that no score rests on stopping behaviour alone.
    """
    found = re.findall(r"^### [^\n]*:", template["prompt_input"] + "\n" + template["prompt_no_input"], flags=re.M)
    markers = list(dict.fromkeys([template["response_split"], *found]))
    return sorted(markers, key=lambda m: m != "### Instruction:")


def create_question(sample: dict[str, Any], template: dict[str, str] = TEMPLATE) -> str:
    """The prompt for one record: the template with instruction and, when non-empty, context."""
    instruction = (sample.get("instruction") or "").strip()
    context = (sample.get("context") or "").strip()
    if context:
        return template["prompt_input"].format(instruction=instruction, context=context)
    return template["prompt_no_input"].format(instruction=instruction)


# --- loading -------------------------------------------------------------------------


class BadRecord(DataError):
    """One record's problem; the caller names the file and line (or record), then raises it or skips the record."""


def load_records(name_or_path: str, max_records: int | None = None, skip_bad_records: bool = False) -> datasets.Dataset:
    """A hub dataset id or a local .jsonl/.json/.parquet/.csv file, as checked dolly records (see load_records_with_summary)."""
    return load_records_with_summary(name_or_path, max_records, skip_bad_records)[0]


def load_records_with_summary(
    name_or_path: str, max_records: int | None = None, skip_bad_records: bool = False
) -> tuple[datasets.Dataset, dict[str, Any]]:
    """The records (the four dolly columns, as text) and what loading did: bad records skipped, duplicates dropped, unknown categories.

    A bad record (malformed JSON, bytes that are not UTF-8, a missing column, a number, list or
    object in a text column) is an error naming the file and line (record for non-JSONL data);
    with skip_bad_records it is skipped and counted instead. Nulls are empty text (a null category
    is "unknown"). Records repeating an earlier one's stripped instruction, context and response
    are dropped before the split, so one record cannot land in both training and validation.
    """
    ext = os.path.splitext(name_or_path)[1].lower()
    if not os.path.exists(name_or_path) and os.path.exists(os.path.join(ROOT, name_or_path)):
        name_or_path = os.path.join(ROOT, name_or_path)  # presets name the shipped sample relative to the repo
    if os.path.exists(name_or_path) or ext in LOCAL_FORMATS:
        rows, bad = _load_local(name_or_path, ext, skip_bad_records)
    else:
        rows, bad = check_rows(name_or_path, "record", _table_rows(_load_hub(name_or_path), name_or_path), dict, skip_bad_records)
    if not rows and bad:
        raise DataError(f"{name_or_path}: no records left after skipping {len(bad)} bad record(s) (first: {bad[0]}); fix the file")
    if not rows:
        if not os.path.isfile(name_or_path):
            what = "the dataset is empty"
        else:
            what = "the file has only blank lines" if os.path.getsize(name_or_path) else "the file is empty"
        raise DataError(f"{name_or_path}: no records ({what}); expected records with columns {', '.join(REQUIRED_COLUMNS)}")
    unique = drop_duplicates(rows)
    used = unique[:max_records] if max_records is not None else unique
    summary = {
        "records": len(used),
        "read": len(rows) + len(bad),
        "skipped_bad_records": len(bad),
        "bad_records": bad[:20],  # the first few, with their line and reason
        "duplicates_dropped": len(rows) - len(unique),
        "beyond_max_records": len(unique) - len(used),
        "unknown_categories": dict(sorted(Counter(r["category"] for r in used if r["category"] not in CATEGORIES).items())),
    }
    return datasets.Dataset.from_list(used), summary


def _load_local(path: str, ext: str, skip_bad_records: bool) -> tuple[list[dict[str, str]], list[str]]:
    if not os.path.isfile(path):
        raise DataError(f"dataset file not found: {path}")
    if ext not in LOCAL_FORMATS:
        raise DataError(f"{path}: unsupported file type {ext!r}; use one of {', '.join(LOCAL_FORMATS)}")
    if ext == ".jsonl":
        return check_rows(path, "line", _jsonl_lines(path), parse_jsonl_line, skip_bad_records)
    if os.path.getsize(path) == 0:
        return [], []
    try:
        ds = datasets.load_dataset(LOCAL_FORMATS[ext], data_files=path, split="train")
    except Exception as err:  # datasets wraps parser errors in many types
        raise DataError(f"{path}: could not be read as {ext[1:]}: {_first_line(err)}") from err
    return check_rows(path, "record", _table_rows(ds, path), dict, skip_bad_records)


def _jsonl_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes): our own reader, so that every error can name its line."""
    with open(path, "rb") as fh:  # bytes: each line is decoded alone, so a bad byte names its line
        yield from enumerate(fh, 1)


def _table_rows(ds: datasets.Dataset, source: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(record number from 1, record) for a table that datasets read; the table must have the dolly columns."""
    check_columns(ds, source)
    yield from enumerate(ds.select_columns(list(REQUIRED_COLUMNS)).to_list(), 1)


def parse_jsonl_line(raw: bytes) -> dict[str, Any] | None:
    """One JSON Lines line as a dict, None for a blank line; a BOM (Windows editors write one) is ignored."""
    try:
        text = raw.decode("utf-8-sig").rstrip("\r\n")  # without its line break: an error at the line's end names its column
    except UnicodeDecodeError as err:
        raise BadRecord(
            f"not valid UTF-8 (byte 0x{err.object[err.start]:02x} at byte {err.start + 1} of the line; save the file as UTF-8)"
        ) from None
    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadRecord(f"malformed JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(value, dict):
        raise BadRecord(f"expected a JSON object, got {_kind(value)}")
    return value


def check_rows(
    source: str, unit: str, items: Iterable[tuple[int, Any]], parse: Callable[[Any], dict[str, Any] | None], skip_bad_records: bool
) -> tuple[list[dict[str, str]], list[str]]:
    """(clean records, skipped ones as "line N: reason"); a bad record raises a DataError naming the file and line, unless skipped."""
    clean, bad = [], []
    for number, item in items:
        try:
            row = parse(item)
            if row is not None:
                clean.append(clean_record(row))
        except BadRecord as err:
            if not skip_bad_records:
                where = f"{source}:{number}" if unit == "line" else f"{source}: record {number}"
                raise DataError(f"{where}: {err}; fix the {unit}, or pass --skip-bad-records to skip bad {unit}s and count them") from None
            bad.append(f"{unit} {number}: {err}")
    return clean, bad


def clean_record(row: dict[str, Any]) -> dict[str, str]:
    """The four dolly columns as text: null (or an empty CSV cell) is "", a null or blank category is "unknown"."""
    missing = [c for c in REQUIRED_COLUMNS if c not in row]
    if missing:
        raise BadRecord(
            f"missing column(s) {', '.join(missing)}; found {', '.join(row) or 'none'} (expected {', '.join(REQUIRED_COLUMNS)})"
        )
    clean = {}
    for column in REQUIRED_COLUMNS:
        value = row[column]
        if value is None or isinstance(value, float) and math.isnan(value):
            value = ""
        if not isinstance(value, str):
            raise BadRecord(f"column {column!r} must be text, got {_kind(value)} ({_preview(value)})")
        clean[column] = value
    clean["category"] = clean["category"].strip() or "unknown"
    return clean


def _kind(value: Any) -> str:
    kinds = {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object", str: "a string"}
    return kinds.get(type(value), f"a {type(value).__name__}")


def _preview(value: Any, width: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def fingerprint(record: dict[str, Any]) -> str:
    """A content hash of a record (stripped instruction, context and response; category aside): the same text, the same hash.

    main.py stores the hashes of its training and validation records beside the adapter; eval.py compares what it is
    about to score against them, whatever the file is called or however it was reordered.
    """
    text = "\x1f".join((record.get(c) or "").strip() for c in ("instruction", "context", "response"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def drop_duplicates(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The first of each group of records with the same stripped instruction, context and response (category aside)."""
    seen: set[tuple[str, str, str]] = set()
    unique = []
    for row in rows:
        key = (row["instruction"].strip(), row["context"].strip(), row["response"].strip())
        if key not in seen:
            seen.add(key)
            unique.append(row)
    return unique


def format_load_summary(source: str, summary: dict[str, Any]) -> str:
    """One line: how many records were read and used, what was skipped or dropped, which categories are unknown."""
    changes = []
    if summary["skipped_bad_records"]:
        changes.append(f"skipped bad records {summary['skipped_bad_records']} (first: {summary['bad_records'][0]})")
    if summary["duplicates_dropped"]:
        changes.append(f"duplicates dropped {summary['duplicates_dropped']}")
    if summary["beyond_max_records"]:
        changes.append(f"{summary['beyond_max_records']} beyond --max-records unused")
    line = f"{source}: {summary['records']}/{summary['read']} records used ({', '.join(changes) or 'no bad records or duplicates'})"
    unknown = ", ".join(f"{name} ({n})" for name, n in summary["unknown_categories"].items())
    return line + (f"; unknown categories: {unknown}" if unknown else "")


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
    by_category = _indices_by_category(ds["category"])
    quotas = {c: len(idx) * val_fraction for c, idx in by_category.items()}
    val = _pick(by_category, _allocate(quotas, max(1, round(len(ds) * val_fraction))), seed)
    val_set = set(val)
    train = [i for i in range(len(ds)) if i not in val_set]
    return ds.select(train), ds.select(sorted(val))


def stratified_sample(categories: list[str], n: int, seed: int) -> list[int]:
    """Indices of a seeded sample of n items, stratified by category, every category in it when n allows; sorted."""
    if n >= len(categories):
        return list(range(len(categories)))
    by_category = _indices_by_category(categories)
    floor = 1 if n >= len(by_category) else 0  # every category at least once, when there are enough places
    quotas = {c: floor + (len(idx) - floor) * (n - floor * len(by_category)) / (len(categories) - floor * len(by_category))
              for c, idx in by_category.items()}
    # Its own random stream: with the split's (same seed, same per-category shuffles) it would pick the held-out records first.
    return sorted(_pick(by_category, _allocate(quotas, n), f"sample:{seed}"))


def _indices_by_category(categories: Iterable[Any]) -> dict[str, list[int]]:
    by_category: dict[str, list[int]] = defaultdict(list)
    for i, category in enumerate(categories):
        by_category[str(category)].append(i)
    return by_category


def _allocate(quotas: dict[str, float], total: int) -> dict[str, int]:
    """Whole counts per category summing to `total`: the floors of the quotas, the rest to the largest remainders."""
    counts = {c: math.floor(q) for c, q in quotas.items()}
    by_remainder = sorted(quotas, key=lambda c: (-(quotas[c] - counts[c]), c))
    for c in by_remainder[: max(0, total - sum(counts.values()))]:
        counts[c] += 1
    return counts


def _pick(by_category: dict[str, list[int]], counts: dict[str, int], seed: int | str) -> list[int]:
    rng = random.Random(seed)
    picked: list[int] = []
    for category in sorted(by_category):
        idx = list(by_category[category])
        rng.shuffle(idx)
        picked.extend(idx[: counts[category]])
    return picked


# --- tokenization ---------------------------------------------------------------------


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
    context = _ids(tokenizer, (sample.get("context") or "").strip(), False)
    if len(context) > max_length:  # cannot fit whole: render its first max_length tokens, so a 1 MB context is tokenized once
        sample["context"], status = tokenizer.decode(context[:max_length]), "truncated_context"
    prompt_ids, response_ids = encode_pair(tokenizer, create_question(sample), response)
    keep, floor = min(len(context), max_length), min(len(context), CONTEXT_FLOOR)

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


def tokenize_records(
    ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, source: str = "dataset"
) -> tuple[datasets.Dataset, dict[str, Any]]:
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


# --- padding-free batches ----------------------------------------------------------------


OPEN_ROWS = 1  # pack_groups' rows kept open by default: 1 = greedy filling. First fit over 4 open rows fills the bench's
# dolly-like records (Llama-2 tokens) into 4,096-token rows 99.35% full instead of 95.1% (8,192: 98.7% vs 97.5%); main.py
# takes it where every row is padded to the budget (TrainConfig.open_rows), greedy elsewhere (BENCHMARKS.md, session 16).


def pack_examples(ds: datasets.Dataset, max_tokens: int, seed: int, open_rows: int = OPEN_ROWS) -> datasets.Dataset:
    """Tokenized examples packed in a seeded random order (greedy filling, or first fit over `open_rows` open rows:
    pack_groups) into rows of at most max_tokens tokens.

    Records stay apart: position_ids restart at 0 for each record, from which transformers builds a
    block-diagonal causal mask (SDPA, flex attention), so no token attends across records. Every
    record starts with prompt tokens labelled -100, so no token learns to predict across a boundary.
    """
    input_ids, labels = ds["input_ids"], ds["labels"]  # whole columns once: row access is slow
    lengths = [len(ids) for ids in input_ids]
    packs = pack_groups(lengths, max_tokens, seed, open_rows)
    rows = [
        {
            "input_ids": [t for i in pack for t in input_ids[i]],
            "labels": [t for i in pack for t in labels[i]],
            "position_ids": [p for i in pack for p in range(lengths[i])],
        }
        for pack in packs
    ]
    empty = {"input_ids": [], "labels": [], "position_ids": []}
    return datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict(empty)


def pack_groups(lengths: list[int], max_tokens: int, seed: int, open_rows: int = OPEN_ROWS) -> list[list[int]]:
    """Which records (indices) make up each packed row of pack_examples: a seeded shuffle, then first fit over the
    `open_rows` newest rows (a record goes into the oldest of them it fits in, else starts a new row; the oldest row
    is closed when more are open). Rows come out in the order they are closed, the still-open ones last; a row's
    records keep the shuffled order. open_rows=1 is plain greedy filling (one row at a time)."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    rows: list[list[int]] = []  # closed
    open_: list[list] = []  # [tokens used, records] of the rows still open, oldest first
    for i in order:
        row = next((r for r in open_ if r[0] + lengths[i] <= max_tokens), None)
        if row is None:
            row = [0, []]
            open_.append(row)
            if len(open_) > open_rows:
                rows.append(open_.pop(0)[1])
        row[0] += lengths[i]
        row[1].append(i)
    return rows + [r[1] for r in open_]


def collate_packed(features: list[dict[str, list[int]]]) -> dict[str, Any]:
    """A batch of packed rows as ONE row of shape [1, tokens]: no padding, no attention mask."""
    import torch

    return {key: torch.tensor([[v for f in features for v in f[key]]]) for key in ("input_ids", "labels", "position_ids")}


class PaddedPackedCollator:
    """collate_packed, padded to exactly `budget` tokens: one shape for every micro-batch (torch.compile, CUDA graphs).

    The padding is a record of its own: pad ids, labels -100 and positions restarting at 0, so no real token attends
    to it and nothing is learnt from it. `num_tokens` (a Python int: the real tokens) lets the Trainer count tokens
    without reading the GPU; training.ProjectTrainer drops it before the model sees the batch.
    """

    def __init__(self, budget: int, pad_id: int, chunk: int | None = None):
        """chunk: the padding is cut into records of at most `chunk` tokens (positions restarting at each), so that no
        record of the row is longer than the real ones may be (DocumentBounds' fixed longest record)."""
        self.budget, self.pad_id, self.chunk = budget, pad_id, chunk

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        batch = collate_packed(features)
        real = batch["input_ids"].shape[1]
        pad = self.budget - real
        if pad < 0:
            raise ValueError(f"a packed row of {real} tokens is longer than its budget of {self.budget}")
        positions = torch.arange(pad) % self.chunk if self.chunk else torch.arange(pad)
        fill = {"input_ids": torch.full((1, pad), self.pad_id), "labels": torch.full((1, pad), IGNORE_INDEX),
                "position_ids": positions[None]}
        padded = {key: torch.cat([batch[key], fill[key].to(batch[key].dtype)], dim=1) for key in fill}
        return padded | {"num_tokens": real}


class DocumentBounds:
    """A packed collator's batch plus where each record lies in its one row, for --attention varlen: cu_seq_lens_q/k
    (int32: each record's first token, then the row's end) and max_length_q/k (the longest record), from the position_ids
    that restart at 0 at every record. transformers hands them to the attention function (runtime.varlen_attention).

    longest (--max-length): max_length is that bound whatever the row holds (an upper bound: the kernel only sizes its
    grid by it), so the compiled layers never recompile for it (a Python int: each new value is a new guard). slots
    (with longest; --pad-to-budget): one shape for every micro-batch, as CUDA graphs need: cu_seq_lens gets exactly
    slots + 1 entries, the row's end repeated (empty records, which the kernel skips). A row with more records than
    slots, or a longer one, is a ValueError naming both."""

    def __init__(self, collate: Any, slots: int | None = None, longest: int | None = None):
        if slots is not None and longest is None:
            raise ValueError("DocumentBounds: slots needs longest")
        self.collate, self.slots, self.longest = collate, slots, longest

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        batch = self.collate(features)
        positions = batch["position_ids"][0]
        starts = (positions == 0).nonzero().flatten().tolist() + [len(positions)]
        longest = max(b - a for a, b in zip(starts, starts[1:], strict=False))
        if (self.longest is not None and longest > self.longest) or (self.slots is not None and len(starts) - 1 > self.slots):
            slots = f"{self.slots} records " if self.slots is not None else "records "
            raise ValueError(f"a packed row of {len(starts) - 1} records (the longest {longest} tokens) does not fit the fixed "
                             f"bounds of {slots}of at most {self.longest} tokens")
        if self.slots is not None:
            starts += [starts[-1]] * (self.slots + 1 - len(starts))
        cu = torch.tensor(starts, dtype=torch.int32)
        longest = self.longest if self.longest is not None else longest
        return batch | {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def max_records_per_row(*rows: Any) -> int:
    """The most records any packed row holds (position ids restart at 0 at each), over datasets of packed rows."""
    return max((sum(1 for p in positions if p == 0) for ds in rows if len(ds) for positions in ds["position_ids"]), default=1)
