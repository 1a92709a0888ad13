"""Property-based tests (hypothesis) of the label mask and the length policy over random dolly-like records."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataset import IGNORE_INDEX, create_question, load_records_with_summary, tokenize_record

# Letters, digits, punctuation, spaces, tabs, newlines, accented letters, CJK and an emoji (several bytes in UTF-8).
ALPHABET = "abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 .,;:!?'\"()-\n\t éüßçñ中文字🙂"
TEXT = st.text(ALPHABET, max_size=300)
NONBLANK = st.text(ALPHABET, min_size=1, max_size=300).filter(lambda s: s.strip())
RECORD = st.fixed_dictionaries({
    "instruction": NONBLANK,
    "context": st.one_of(st.just(""), TEXT),
    "response": NONBLANK,
    "category": st.sampled_from(["open_qa", "closed_qa", "summarization", "brainstorming"]),
})
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
TOKENIZERS = ["tiny_tokenizer", "llama2_tokenizer"]  # the real one is skipped where ../shared/llama2-tokenizer is absent


@pytest.fixture(params=TOKENIZERS)
def tokenizer(request):
    return request.getfixturevalue(request.param)


def check_example(ex: dict[str, list[int]], max_length: int) -> None:
    """What holds for every example the length policy keeps, whatever its status."""
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels) == len(ex["attention_mask"]) and ex["attention_mask"] == [1] * len(ids)
    assert len(ids) <= max_length
    n_prompt = labels.count(IGNORE_INDEX)
    assert 0 < n_prompt < len(labels)  # a prompt, and at least one supervised token
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt  # the mask is one prefix: the prompt
    assert labels[n_prompt:] == ids[n_prompt:]  # supervised labels are the input tokens themselves


@SETTINGS
@given(rec=RECORD)
def test_prompt_is_masked_exactly_and_response_plus_eos_is_supervised(tokenizer, rec):
    ex, status = tokenize_record(rec, tokenizer, 100_000)
    assert status == "kept"
    check_example(ex, 100_000)
    prompt_ids = tokenizer(create_question(rec))["input_ids"]
    assert ex["input_ids"][: len(prompt_ids)] == prompt_ids  # exactly what inference feeds the model
    assert ex["labels"][: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert ex["labels"][len(prompt_ids)] != IGNORE_INDEX
    supervised = ex["labels"][len(prompt_ids):]
    assert supervised[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(supervised) == rec["response"].strip() + tokenizer.eos_token


@SETTINGS
@given(rec=RECORD, max_length=st.integers(32, 512))
def test_length_policy_keeps_every_invariant(tokenizer, rec, max_length):
    ex, status = tokenize_record(rec, tokenizer, max_length)
    if ex is None:
        assert status == "dropped_prompt_too_long"  # instruction and response are non-blank
        no_context = tokenizer(create_question(dict(rec, context="")))["input_ids"]
        assert len(no_context) >= max_length  # dropped only if even a context-free prompt leaves no room
        return
    check_example(ex, max_length)
    supervised = [t for t in ex["labels"] if t != IGNORE_INDEX]
    if status in ("kept", "truncated_context"):
        assert tokenizer.decode(supervised) == rec["response"].strip() + tokenizer.eos_token
    else:
        assert status == "truncated_response" and len(ex["input_ids"]) == max_length
        assert tokenizer.eos_token_id not in supervised  # a cut answer must not teach the model to stop there
        assert (rec["response"].strip()).startswith(tokenizer.decode(supervised).rstrip("\ufffd"))


@SETTINGS
@given(recs=st.lists(st.one_of(RECORD, RECORD.map(lambda r: dict(r, context=None))), min_size=1, max_size=20))
def test_jsonl_round_trip_keeps_every_unique_record_in_order(tmp_path, recs):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    ds, summary = load_records_with_summary(str(path))
    expected, seen = [], set()
    for r in recs:
        r = dict(r, context=r["context"] or "")
        key = (r["instruction"].strip(), r["context"].strip(), r["response"].strip())
        if key not in seen:
            seen.add(key)
            expected.append(r)
    assert ds.to_list() == expected
    assert summary["duplicates_dropped"] == len(recs) - len(expected) and summary["skipped_bad_records"] == 0
