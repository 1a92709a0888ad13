"""dataset.py: exact prompts, exact label masks, the length policy, the split, loading errors."""

from __future__ import annotations

import datasets
import pytest

from conftest import record, write_jsonl
from dataset import (
    CATEGORIES,
    CONTEXT_FLOOR,
    IGNORE_INDEX,
    SAMPLE_PATH,
    DataError,
    create_question,
    load_records,
    make_collator,
    split_records,
    tokenize_record,
    tokenize_records,
)

PROMPT_NO_CONTEXT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nWho wrote Hamlet?\n\n### Response:\n"
)
PROMPT_WITH_CONTEXT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nWhen was it built?\n\n### Input:\nThe tower was built in 1889.\n\n### Response:\n"
)


def test_prompt_without_context_is_exact():
    assert create_question(record()) == PROMPT_NO_CONTEXT
    assert create_question(record(context="   ")) == PROMPT_NO_CONTEXT  # blank context = no input block


def test_prompt_with_context_is_exact():
    sample = record("When was it built?", "The tower was built in 1889.", "In 1889.", "closed_qa")
    assert create_question(sample) == PROMPT_WITH_CONTEXT


def test_llama2_label_mask_is_exact(llama2_tokenizer):
    tok = llama2_tokenizer
    assert tok.pad_token_id == 0 and tok.eos_token_id == 2  # pad = <unk>, never EOS
    ex, status = tokenize_record(record(), tok, 1024)
    assert status == "kept"
    prompt_ids = tok(PROMPT_NO_CONTEXT)["input_ids"]
    assert prompt_ids[0] == 1 and len(prompt_ids) == 41
    # "William Shakespeare." after "### Response:\n", then EOS.
    assert ex["input_ids"] == prompt_ids + [12984, 2829, 23688, 29889, 2]
    assert ex["labels"] == [IGNORE_INDEX] * 41 + [12984, 2829, 23688, 29889, 2]


def test_llama2_label_mask_with_context(llama2_tokenizer):
    tok = llama2_tokenizer
    ex, _ = tokenize_record(record("When was it built?", "The tower was built in 1889.", "In 1889.", "closed_qa"), tok, 1024)
    assert ex["input_ids"][:69] == tok(PROMPT_WITH_CONTEXT)["input_ids"]
    assert ex["labels"] == [IGNORE_INDEX] * 69 + [797, 29871, 29896, 29947, 29947, 29929, 29889, 2]
    assert tok.decode(ex["labels"][69:]) == "In 1889.</s>"


def test_supervised_tokens_decode_to_response_plus_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    ex, _ = tokenize_record(record(response="Paris is the capital of France."), tok, 256)
    supervised = [t for t in ex["labels"] if t != IGNORE_INDEX]
    assert supervised[-1] == tok.eos_token_id
    assert tok.decode(supervised) == "Paris is the capital of France.</s>"
    n_prompt = ex["labels"].count(IGNORE_INDEX)
    assert ex["input_ids"][:n_prompt] == tok(PROMPT_NO_CONTEXT)["input_ids"]
    assert ex["attention_mask"] == [1] * len(ex["input_ids"])


def test_collator_pads_with_pad_not_eos_and_labels_with_ignore(tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    short, _ = tokenize_record(record(response="Yes."), tok, 256)
    long, _ = tokenize_record(record(response="A considerably longer answer than the other one."), tok, 256)
    batch = make_collator(tok)([short, long])
    pad = len(long["input_ids"]) - len(short["input_ids"])
    assert pad > 0
    assert batch["input_ids"][0, -pad:].tolist() == [tok.pad_token_id] * pad
    assert batch["labels"][0, -pad:].tolist() == [IGNORE_INDEX] * pad
    assert batch["attention_mask"][0, -pad:].tolist() == [0] * pad
    # EOS is still supervised in the padded row.
    assert batch["labels"][0, len(short["input_ids"]) - 1].item() == tok.eos_token_id


def test_long_context_is_shortened_first(llama2_tokenizer):
    tok = llama2_tokenizer
    context = " ".join(f"Sentence number {i} of a very long passage." for i in range(200))
    sample = record("Summarize the passage.", context, "It is a long passage about numbers.", "summarization")
    ex, status = tokenize_record(sample, tok, 256)
    assert status == "truncated_context"
    assert len(ex["input_ids"]) <= 256
    supervised = [t for t in ex["labels"] if t != IGNORE_INDEX]
    assert tok.decode(supervised) == "It is a long passage about numbers.</s>"  # the whole response and EOS survive
    prompt = tok.decode(ex["input_ids"][: ex["labels"].count(IGNORE_INDEX)], skip_special_tokens=True)
    assert prompt.startswith(create_question(sample)[:300]) and "### Response:" in prompt


def context_tokens_kept(example, tokenizer) -> int:
    """How many tokens of context the prompt part of a tokenized example still holds."""
    prompt = tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label == IGNORE_INDEX],
                              skip_special_tokens=True)
    context = prompt.split("### Input:\n", 1)[1].split("\n\n### Response:", 1)[0]
    return len(tokenizer(context, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize(("response", "max_length", "status", "context", "supervised", "eos"), [
    ("Yes.", 300, "truncated_context", 203, 4, True),  # the context loses only what does not fit; the answer stays whole
    ("Yes, it is. " * 20, 200, "truncated_response", CONTEXT_FLOOR, 43, False),  # the floor holds: the answer's end goes
    ("Yes.", 100, "truncated_response", 6, 1, False),  # below the floor only to leave room for one answer token
])
def test_context_is_cut_to_its_floor_before_the_response(tiny_tokenizer, response, max_length, status, context, supervised, eos):
    sample = record(context="Some context. " * 100, response=response, category="closed_qa")
    ex, got = tokenize_record(sample, tiny_tokenizer, max_length)
    labels = [t for t in ex["labels"] if t != IGNORE_INDEX]
    assert (got, len(ex["input_ids"]), context_tokens_kept(ex, tiny_tokenizer)) == (status, max_length, context)
    assert len(labels) == supervised and (tiny_tokenizer.eos_token_id in labels) is eos


def test_long_response_keeps_its_beginning_and_gets_no_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    response = "The first words stay. " + " ".join(f"filler {i}" for i in range(400))
    ex, status = tokenize_record(record(response=response), tok, 128)
    assert status == "truncated_response"
    assert len(ex["input_ids"]) == 128
    supervised = [t for t in ex["labels"] if t != IGNORE_INDEX]
    assert tok.eos_token_id not in supervised  # a cut answer must not teach the model to stop there
    assert tok.decode(supervised).startswith("The first words stay.")


def test_drops_are_counted_and_no_example_is_all_masked(tiny_tokenizer):
    rows = [
        record(),
        record(instruction="  "),
        record(response=""),
        record(instruction="word " * 400),  # the prompt alone exceeds max_length
        record(context="Some context. " * 100, category="closed_qa"),
    ]
    ds, summary = tokenize_records(datasets.Dataset.from_list(rows), tiny_tokenizer, 200)
    assert summary["records"] == 5 and summary["kept"] == 2 and len(ds) == 2
    assert summary["dropped_empty_instruction"] == 1
    assert summary["dropped_empty_response"] == 1
    assert summary["dropped_prompt_too_long"] == 1
    assert summary["truncated_context"] == 1
    assert summary["length_max"] <= 200
    for labels in ds["labels"]:
        assert any(t != IGNORE_INDEX for t in labels)


def test_split_is_seeded_stratified_and_disjoint():
    ds = load_records(SAMPLE_PATH)
    train, val = split_records(ds, 0.2, seed=42)
    train2, val2 = split_records(ds, 0.2, seed=42)
    _, val3 = split_records(ds, 0.2, seed=7)
    assert val["instruction"] == val2["instruction"] and train["instruction"] == train2["instruction"]
    assert val["instruction"] != val3["instruction"]
    assert len(val) == 16 and len(train) == 64
    assert sorted(val["category"]) == sorted(list(CATEGORIES) * 2)  # 10 per category x 0.2 = 2 each
    assert not set(train["instruction"]) & set(val["instruction"])


def test_split_default_fraction_rounds_to_the_overall_share():
    ds = load_records(SAMPLE_PATH)
    _, val = split_records(ds, 0.05, seed=42)
    assert len(val) == 4  # 5% of 80, allocated to the categories with the largest remainders


def test_missing_column_lists_the_columns_found(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "response": "b", "context": ""}])
    with pytest.raises(DataError, match=r"missing column\(s\) category; found instruction, response, context"):
        load_records(path)


@pytest.mark.parametrize("ext", ["jsonl", "json", "csv", "parquet"])
def test_local_formats_load(tmp_path, ext):
    rows = [record(), record("Name a colour.", "", "Blue.", "brainstorming")]
    path = str(tmp_path / f"d.{ext}")
    if ext == "jsonl":
        write_jsonl(path, rows)
    else:
        getattr(datasets.Dataset.from_list(rows), {"json": "to_json", "csv": "to_csv", "parquet": "to_parquet"}[ext])(path)
    ds = load_records(path)
    assert ds["instruction"] == ["Who wrote Hamlet?", "Name a colour."]


def test_missing_file_and_unknown_type_are_clear(tmp_path):
    with pytest.raises(DataError, match="dataset file not found"):
        load_records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_records(str(tmp_path / "d.txt"))


def test_shipped_sample_covers_all_categories():
    ds = load_records(SAMPLE_PATH)
    assert len(ds) == 80
    assert {c: ds["category"].count(c) for c in CATEGORIES} == {c: 10 for c in CATEGORIES}
    assert sum(bool(c) for c in ds["context"]) >= 20
