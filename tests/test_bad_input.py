"""dataset.py on bad input: every case is an error naming the file and line, or a documented repair, and each is counted."""

from __future__ import annotations

import json

import datasets
import pytest

from config import EvalConfig, TrainConfig, parse_config
from conftest import record, run, write_jsonl
from dataset import (
    IGNORE_INDEX,
    SAMPLE_PATH,
    DataError,
    format_load_summary,
    load_records,
    load_records_with_summary,
    split_records,
    tokenize_record,
    tokenize_records,
)

GOOD = json.dumps(record())


def write_lines(path, *lines: str | bytes) -> str:
    """A JSONL file from raw lines (text or bytes), each ended by a newline."""
    with open(path, "wb") as fh:
        for line in lines:
            fh.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return str(path)


def rows(n: int) -> list[dict[str, str]]:
    return [record(f"Question {i}?", "", f"Answer {i}.") for i in range(n)]


# --- malformed lines -------------------------------------------------------------------


def test_malformed_json_names_the_file_the_line_and_the_column(tmp_path):
    cut = '{"instruction": "cut off", "context": '
    path = write_lines(tmp_path / "bad.jsonl", GOOD, json.dumps(record("Another?")), cut, json.dumps(record("After?")))
    column = len(cut) + 1  # the error is at the end of the line, not at "column 1" of the next
    with pytest.raises(DataError, match=rf"^{path}:3: malformed JSON \(Expecting value at column {column}\); .*--skip-bad-records") as err:
        load_records(path)
    assert "\n" not in str(err.value)


def test_skip_bad_records_skips_each_bad_line_and_counts_it(tmp_path):
    path = write_lines(
        tmp_path / "bad.jsonl",
        GOOD,
        "{not json",                                      # line 2: malformed
        b'{"instruction": "caf\xe9", "context": "", "response": "x", "category": "open_qa"}',  # line 3: Latin-1
        json.dumps(record(context=7)),                    # line 4: a number in a text column
        "[1, 2]",                                         # line 5: not an object
        json.dumps({"instruction": "no other columns"}),  # line 6: missing columns
        json.dumps(record("Second?")),
    )
    ds, summary = load_records_with_summary(path, skip_bad_records=True)
    assert ds["instruction"] == ["Who wrote Hamlet?", "Second?"]
    assert summary["skipped_bad_records"] == 5 and summary["read"] == 7 and summary["records"] == 2
    assert [b.split(":")[0] for b in summary["bad_records"]] == ["line 2", "line 3", "line 4", "line 5", "line 6"]
    line = format_load_summary("bad.jsonl", summary)
    assert line.startswith("bad.jsonl: 2/7 records used (skipped bad records 5 (first: line 2: malformed JSON (")
    assert "\n" not in line


def test_only_bad_lines_left_nothing_is_an_error(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", "{", "}")
    with pytest.raises(DataError, match=r"no records left after skipping 2 bad record\(s\) \(first: line 1: malformed JSON"):
        load_records(path, skip_bad_records=True)


def test_a_line_that_is_not_an_object(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", GOOD, '"just a string"')
    with pytest.raises(DataError, match=rf"^{path}:2: expected a JSON object, got a string"):
        load_records(path)


def test_main_reports_malformed_json_in_one_line_and_exits_2(tmp_path):
    bad = write_lines(tmp_path / "BAD.jsonl", GOOD, json.dumps(record("Another?")), "{oops")
    proc = run("main.py", "--preset", "smoke", "--dataset", bad, "--output-dir", str(tmp_path / "out"))
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {bad}:3: malformed JSON (")
    assert "--skip-bad-records" in last and "Traceback" not in proc.stderr


# --- columns and types -----------------------------------------------------------------


def test_missing_column_names_the_line_and_lists_what_was_found(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [record(), {"instruction": "a", "response": "b", "context": ""}])
    with pytest.raises(DataError, match=rf"^{path}:2: missing column\(s\) category; found instruction, response, context"):
        load_records(path)


def test_missing_column_in_a_table_names_the_file(tmp_path):
    path = str(tmp_path / "bad.csv")
    datasets.Dataset.from_list([{"instruction": "a", "response": "b"}]).to_csv(path)
    with pytest.raises(DataError, match=rf"^{path}: missing column\(s\) context, category; found instruction, response"):
        load_records(path)


@pytest.mark.parametrize("column", ["instruction", "context", "response", "category"])
@pytest.mark.parametrize(
    "value, kind", [(42, "a number"), (2.5, "a number"), (["a", "b"], "a list"), ({"a": 1}, "an object"), (True, "a boolean")]
)
def test_wrong_type_names_file_line_column_and_type(tmp_path, column, value, kind):
    path = write_jsonl(tmp_path / "bad.jsonl", [record(), record(**{column: value})])
    with pytest.raises(DataError, match=rf"^{path}:2: column '{column}' must be text, got {kind} \("):
        load_records(path)
    ds, summary = load_records_with_summary(path, skip_bad_records=True)
    assert len(ds) == 1 and summary["skipped_bad_records"] == 1


def test_wrong_type_in_a_table_names_the_record(tmp_path):
    path = str(tmp_path / "bad.parquet")
    datasets.Dataset.from_list([record(context=1), record(context=2)]).to_parquet(path)  # an int64 context column
    with pytest.raises(DataError, match=rf"^{path}: record 1: column 'context' must be text, got a number \(1\); fix the record"):
        load_records(path)


def test_nulls_become_empty_text_and_unknown_category(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "nulls.jsonl", [
        record(context=None),
        record("Name a colour.", "", "Blue.", None),
        record(instruction=None, response="Something."),
        record("Anything?", "", None),
    ])
    ds, summary = load_records_with_summary(path)
    assert ds["context"] == ["", "", "", ""] and ds[1]["category"] == "unknown"
    assert summary["unknown_categories"] == {"unknown": 1}
    _, tok_summary = tokenize_records(ds, tiny_tokenizer, 256)
    assert tok_summary["kept"] == 2  # a null instruction or response is empty: dropped and counted
    assert tok_summary["dropped_empty_instruction"] == 1 and tok_summary["dropped_empty_response"] == 1


def test_null_in_a_csv_is_an_empty_cell(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("instruction,context,response,category\nWho wrote Hamlet?,,Shakespeare.,open_qa\nName a colour.,,Blue.,\n")
    ds = load_records(str(path))  # the all-empty context column is read as float NaN
    assert ds["context"] == ["", ""] and ds["category"] == ["open_qa", "unknown"]


def test_empty_strings_are_dropped_and_counted_by_the_length_policy(tiny_tokenizer, tmp_path):
    data = [record(), record(instruction=""), record("Name a colour.", response="  \n"), record("Name a fruit.", "", "Apple.", "")]
    ds = load_records(write_jsonl(tmp_path / "empty.jsonl", data))
    assert len(ds) == 4 and ds[3]["category"] == "unknown"  # an empty category is "unknown", like a null one
    ex_ds, summary = tokenize_records(ds, tiny_tokenizer, 256)
    assert summary["kept"] == 2
    assert summary["dropped_empty_instruction"] == 1 and summary["dropped_empty_response"] == 1
    assert all(any(t != IGNORE_INDEX for t in labels) for labels in ex_ds["labels"])


# --- bytes -----------------------------------------------------------------------------


def test_non_utf8_bytes_name_the_line(tmp_path):
    latin1 = json.dumps(record("Où est le café?"), ensure_ascii=False).encode("latin-1")
    path = write_lines(tmp_path / "latin1.jsonl", GOOD, latin1)
    with pytest.raises(DataError, match=rf"^{path}:2: not valid UTF-8 \(byte 0xf9 at byte \d+ of the line; save the file as UTF-8\)"):
        load_records(path)


def test_bom_is_accepted(tmp_path):
    path = write_lines(
        tmp_path / "bom.jsonl",
        b"\xef\xbb\xbf" + GOOD.encode(),
        json.dumps(record("Second?")),
        b"\xef\xbb\xbf" + json.dumps(record("Third?")).encode(),
    )
    ds = load_records(path)  # a BOM at the start of the file, or of a line (`cat` of two BOM files)
    assert ds["instruction"] == ["Who wrote Hamlet?", "Second?", "Third?"]


def test_crlf_line_endings_and_blank_lines_are_accepted(tmp_path):
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(GOOD.encode() + b"\r\n\r\n   \r\n" + json.dumps(record("Second?")).encode() + b"\r\n")
    assert load_records(str(path))["instruction"] == ["Who wrote Hamlet?", "Second?"]


@pytest.mark.parametrize(("content", "what"), [(b"", "the file is empty"), (b"\n\n  \n", "the file has only blank lines"),
                                               (b"\xef\xbb\xbf\n", "the file has only blank lines")])
def test_empty_file_says_no_records(tmp_path, content, what):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"^{path}: no records \({what}\); expected records with columns instruction, context"):
        load_records(str(path))


@pytest.mark.parametrize("ext", ["json", "csv", "parquet"])
def test_empty_table_file_says_no_records(tmp_path, ext):
    path = tmp_path / f"empty.{ext}"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=rf"^{path}: no records"):
        load_records(str(path))


# --- size, duplicates, categories ---------------------------------------------------------


def test_a_1mb_context_is_loaded_and_tokenized_once(tiny_tokenizer, tmp_path, monkeypatch):
    """A 1 MB context is tokenized once, then cut to its first max_length tokens: no re-tokenizing of 1 MB per cut."""
    context = ("The quick brown fox jumps over the lazy dog. " * 25_000)[:1_000_000]
    path = write_jsonl(tmp_path / "big.jsonl", [record("Summarize the passage.", context, "A fox jumps.", "summarization")])
    ds = load_records(path)
    seen, real_call = [], type(tiny_tokenizer).__call__

    def counting_call(self, text, *args, **kwargs):
        seen.append(len(text))
        return real_call(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tiny_tokenizer), "__call__", counting_call)
    ex, status = tokenize_record(ds[0], tiny_tokenizer, 256)
    assert sum(n > 500_000 for n in seen) == 1 and sum(seen) < 1_000_000 + 50_000, seen  # once, and then only short texts
    assert len(ds[0]["context"]) == 1_000_000
    assert status == "truncated_context" and len(ex["input_ids"]) <= 256
    supervised = [t for t in ex["labels"] if t != IGNORE_INDEX]
    assert tiny_tokenizer.decode(supervised) == "A fox jumps." + tiny_tokenizer.eos_token


def test_duplicates_are_dropped_before_the_split(tmp_path):
    data = rows(20)
    dupes = [dict(data[0], instruction=data[0]["instruction"] + "  "), dict(data[3], category="brainstorming"), data[5]]
    same_question = record("Question 7?", "", "A different answer.")  # not a duplicate: the response differs
    path = write_jsonl(tmp_path / "dupes.jsonl", data + dupes + [same_question])
    ds, summary = load_records_with_summary(path)
    assert summary["duplicates_dropped"] == 3 and summary["records"] == 21 and len(ds) == 21
    assert "duplicates dropped 3" in format_load_summary(path, summary)
    assert ds["category"][3] == "open_qa"  # the first of a group is the one kept
    train, val = split_records(ds, 0.25, seed=1)
    key = ("instruction", "context", "response")
    assert not {tuple(r[k].strip() for k in key) for r in train} & {tuple(r[k].strip() for k in key) for r in val}


def test_max_records_counts_unique_records(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [record(), record(), record("Second?")])
    ds, summary = load_records_with_summary(path, max_records=2)
    assert ds["instruction"] == ["Who wrote Hamlet?", "Second?"] and summary["duplicates_dropped"] == 1


def test_unknown_categories_are_kept_and_listed_once(tmp_path):
    data = rows(4) + [record(f"Odd {i}?", "", "Yes.", "foo") for i in range(3)] + [record("Bar?", "", "Yes.", "bar")]
    path = write_jsonl(tmp_path / "cats.jsonl", data)
    ds, summary = load_records_with_summary(path)
    assert len(ds) == 8 and summary["unknown_categories"] == {"bar": 1, "foo": 3}
    line = format_load_summary("cats.jsonl", summary)
    assert line == "cats.jsonl: 8/8 records used (no bad records or duplicates); unknown categories: bar (1), foo (3)"
    train, val = split_records(ds, 0.5, seed=42)
    assert len(train) == 4 and sorted(val["category"]) == ["bar", "foo", "open_qa", "open_qa"]  # each unknown category is a stratum


# --- the flag ------------------------------------------------------------------------------


def test_skip_bad_records_flag_reaches_both_configs():
    assert TrainConfig().skip_bad_records is False and EvalConfig().skip_bad_records is False
    assert parse_config(TrainConfig, ["--skip-bad-records"], "")[0].skip_bad_records is True
    assert parse_config(EvalConfig, ["--skip-bad-records"], "")[0].skip_bad_records is True


def test_main_with_skip_bad_records_prints_the_counts(tmp_path):
    with open(SAMPLE_PATH, encoding="utf-8") as fh:
        sample = fh.read().splitlines()
    bad = write_lines(tmp_path / "BAD.jsonl", *sample[:24], "{oops", sample[0], *sample[24:40])
    proc = run("main.py", "--preset", "smoke", "--dataset", bad, "--output-dir", str(tmp_path / "out"), "--skip-bad-records",
               "--max-steps", "1", "--eval-steps", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"[data] {bad}: 40/42 records used (skipped bad records 1 (first: line 25: malformed JSON (" in proc.stdout
    assert "duplicates dropped 1" in proc.stdout
    with open(tmp_path / "out" / "metrics.json") as fh:
        assert json.load(fh)["data"]["load"]["skipped_bad_records"] == 1
