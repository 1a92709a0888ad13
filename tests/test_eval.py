"""eval.py's quantitative path: NLL equals the training loss, generation bookkeeping, and the report on the smoke preset."""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch

import report as rp
from config import TrainConfig
from conftest import ROOT, record, run
from dataset import CATEGORIES, create_question, tokenize_record
from hub import TINY_MODEL
from loading import load_for_training
from model import Llama


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    model, tokenizer, _ = load_for_training(TrainConfig(base_model=TINY_MODEL, quantization="4bit"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # a non-zero adapter, so adapter on != off
    return Llama(model, tokenizer, TINY_MODEL)


def test_nll_equals_the_training_loss_on_the_same_example(tiny_llama):
    tok = tiny_llama.tokenizer
    examples = [tokenize_record(record(), tok, 256)[0], tokenize_record(record(response="A much longer answer than that."), tok, 256)[0]]
    nll = tiny_llama.nll(examples, use_adapter=True, batch_size=2)  # batched, right-padded
    for ex, value in zip(examples, nll, strict=True):
        batch = {k: torch.tensor([v]) for k, v in ex.items()}
        with torch.no_grad():
            loss = tiny_llama.model(**batch).loss.item()  # what Trainer minimises
        assert value == pytest.approx(loss, rel=1e-5)
    off = tiny_llama.nll(examples, use_adapter=False)
    assert off != pytest.approx(nll, rel=1e-3)  # the adapter changes the likelihood


def test_generate_reports_tokens_and_how_each_answer_ended(tiny_llama):
    prompt = "### Instruction:\nSay hi.\n\n### Response:\n"
    [g] = tiny_llama.generate([prompt], max_new_tokens=7)
    assert set(g) == {"answer", "raw", "answer_tokens", "stop", "ended_with_eos"}
    assert 0 <= g["answer_tokens"] <= 7
    assert g["stop"] == ("eos" if g["answer_tokens"] < 7 else "length") and g["ended_with_eos"] == (g["stop"] == "eos")


def test_an_answer_that_runs_into_a_new_section_is_cut_at_its_marker(tiny_tokenizer):
    from generation import end_answer

    rambling = "Paris is the capital.\n\n### Instruction:\nName a river.\n\n### Response:\nThe Seine."
    tokens = tiny_tokenizer(rambling, add_special_tokens=False)["input_ids"]
    ended = end_answer(tokens, tiny_tokenizer, ["### Instruction:", "### Response:"])
    assert (ended["answer"], ended["stop"], ended["raw"]) == ("Paris is the capital.", "stop_string", rambling)
    assert tiny_tokenizer.decode(tokens[: ended["answer_tokens"]]).strip() == "Paris is the capital."  # the tokens before the cut
    untouched = end_answer([*tokens, tiny_tokenizer.eos_token_id], tiny_tokenizer, [])
    assert (untouched["answer"], untouched["stop"]) == (rambling, "eos")


def test_generation_stops_at_a_stop_string_for_base_and_adapter_alike(tiny_llama):
    """The same stop rule on both sides: each run ends where its text first contains the stop string, and is cut there."""
    prompt = create_question({"instruction": "Say something about rivers.", "context": ""})
    for use_adapter in (False, True):
        [free] = tiny_llama.generate([prompt], max_new_tokens=24, use_adapter=use_adapter)
        words = free["raw"].split()
        assert len(words) >= 4, free  # the tiny random model rambles: something to stop in
        stop = " ".join(words[2:4])
        [cut] = tiny_llama.generate([prompt], max_new_tokens=24, use_adapter=use_adapter, stop_strings=[stop])
        assert cut["stop"] == "stop_string" and cut["answer"] == free["raw"][: free["raw"].index(stop)].strip()
        assert cut["raw"].endswith(stop) or stop in cut["raw"]  # generation itself ended there, not only the text
        assert cut["answer_tokens"] < free["answer_tokens"]


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("eval") / "adapter")
    assert run("main.py", "--preset", "smoke", "--output-dir", out).returncode == 0
    proc = run("eval.py", "--preset", "smoke", "--adapter", out, "--split", "validation", "--bootstrap-samples", "200")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_report_files_are_written_and_parse(smoke_report):
    out, proc = smoke_report
    folder = os.path.join(out, "eval")
    assert sorted(os.listdir(folder)) == ["metrics.png", "report.html", "report.json", "report.md"]
    with open(os.path.join(folder, "report.json")) as fh:
        report = json.load(fh)
    assert report["split"] == "validation" and len(report["items"]) == 8  # the 10% the smoke run held out
    with open(os.path.join(out, "train_config.yaml")) as fh:
        assert "val_fraction: 0.1" in fh.read()
    for item in report["items"]:
        for side in ("base", "tuned"):
            assert set(item[side]) == {"answer", "raw", "stop", "rougeL", "f1", "em", "nll", "answer_tokens", "eos_rate"}
            assert 0 <= item[side]["rougeL"] <= 1 and item[side]["nll"] > 0
    assert rp.to_markdown(report) in proc.stdout  # the console shows the report itself
    assert re.search(r"^\| overall \| 8 \| ", proc.stdout, flags=re.M)


def test_token_never_in_eval_output_or_reports(smoke_report):
    from conftest import FAKE_TOKEN

    out, proc = smoke_report  # eval.py ran with HF_TOKEN set to FAKE_TOKEN
    assert FAKE_TOKEN not in proc.stdout + proc.stderr
    for name in os.listdir(os.path.join(out, "eval")):
        with open(os.path.join(out, "eval", name), "rb") as fh:
            assert FAKE_TOKEN.encode() not in fh.read(), name


def test_overall_is_the_weighted_mean_of_the_categories(smoke_report):
    with open(os.path.join(smoke_report[0], "eval", "report.json")) as fh:
        report = json.load(fh)
    overall = report["aggregates"]["overall"]
    cats = report["aggregates"]["by_category"]
    assert sum(c["n"] for c in cats.values()) == overall["n"] == len(report["items"])
    tokens = sum(i["nll_tokens"] for i in report["items"])
    token_weighted = sum(i["tuned"]["nll"] * i["nll_tokens"] for i in report["items"]) / tokens
    assert overall["perplexity"]["tuned"] == pytest.approx(math.exp(token_weighted))
    for metric in ("rougeL", "f1", "em", "nll", "answer_tokens", "eos_rate"):
        for side in ("base", "tuned"):
            weighted = sum(c["n"] * c["scores"][metric][side] for c in cats.values()) / overall["n"]
            assert overall["scores"][metric][side] == pytest.approx(weighted)
            items_mean = sum(i[side][metric] for i in report["items"]) / len(report["items"])
            assert overall["scores"][metric][side] == pytest.approx(items_mean)
        s = overall["scores"][metric]
        assert s["diff"] == pytest.approx(s["tuned"] - s["base"])
        assert s["ci_low"] <= s["diff"] <= s["ci_high"] or math.isclose(s["ci_low"], s["ci_high"])


def test_interactive_repl_answers_side_by_side(smoke_report):
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "eval.py"), "--preset", "smoke", "--adapter", smoke_report[0], "--interactive"],
        input="Who wrote Hamlet?\nA play by an English writer.\n\n", capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "question> " in proc.stdout and "context>  " in proc.stdout
    assert proc.stdout.count("BASE MODEL") == 1 and "Who wrote Hamlet?" in proc.stdout
    assert "context: A play by an English writer." in proc.stdout


def test_the_reports_perplexity_is_the_trainings(smoke_report):
    """One definition (token-weighted) in metrics.json and the report: on the same held-out records, one number."""
    out, _ = smoke_report
    with open(os.path.join(out, "metrics.json")) as fh:
        metrics = json.load(fh)
    with open(os.path.join(out, "eval", "report.json")) as fh:
        report = json.load(fh)
    assert report["aggregates"]["overall"]["perplexity"]["tuned"] == pytest.approx(metrics["eval_perplexity"], rel=1e-4)
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))


def test_the_report_says_what_was_compared_and_how(smoke_report):
    with open(os.path.join(smoke_report[0], "eval", "report.json")) as fh:
        report = json.load(fh)
    header = report["header"]
    assert header["base"].endswith("4-bit NF4 base with the adapter switched off (the same weights)")
    assert header["stop rules"].startswith("EOS, or the first of '### Instruction:', '### Response:', '### Input:'")
    assert header["training records scored"] == "none (checked by content hash)" and header["card"].startswith("CPU")
    stops = report["aggregates"]["overall"]["stops"]
    assert sum(stops["base"].values()) == sum(stops["tuned"].values()) == len(report["items"])
    assert all(i[side]["stop"] in ("eos", "stop_string", "length") for i in report["items"] for side in ("base", "tuned"))


def test_scoring_training_records_is_refused(smoke_report):
    out, _ = smoke_report
    proc = run("eval.py", "--preset", "smoke", "--adapter", out, "--split", "all", "--limit", "12")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: 11 of the 12 records to score were in the adapter's training data, which would flatter the fine-tuned model; "
        "score --split validation, another --dataset, or pass --allow-train-overlap to score them anyway")


def test_validation_split_is_found_by_content_even_in_a_reordered_copy(smoke_report, tmp_path):
    """--split validation selects the held-out records by content hash: a shuffled copy of the file gives the same records."""
    import random

    from comparison import read_fingerprints, select_records
    from config import EvalConfig, load_train_config
    from dataset import fingerprint

    out, _ = smoke_report
    with open(os.path.join(ROOT, "data", "dolly_sample.jsonl")) as fh:
        lines = fh.readlines()
    random.Random(1).shuffle(lines)
    (tmp_path / "moved.jsonl").write_text("".join(lines))
    train, prints = load_train_config(os.path.join(out, "train_config.yaml")), read_fingerprints(out)
    rows, _ = select_records(train, prints, EvalConfig(adapter=out, split="validation", dataset=str(tmp_path / "moved.jsonl")))
    assert {fingerprint(r) for r in rows} == prints["validation"] and len(rows) == 8


def test_limit_is_a_seeded_sample_of_every_category():
    from comparison import select_records
    from config import EvalConfig

    cfg = EvalConfig(dataset="data/dolly_sample.jsonl", split="all", limit=8, seed=3)
    rows, _ = select_records(None, None, cfg)
    assert sorted(r["category"] for r in rows) == sorted(CATEGORIES)  # 80 records, 10 per category: one of each
    again, _ = select_records(None, None, cfg)
    other, _ = select_records(None, None, EvalConfig(dataset="data/dolly_sample.jsonl", split="all", limit=8, seed=4))
    assert [r["id"] for r in again] == [r["id"] for r in rows] != [r["id"] for r in other]
