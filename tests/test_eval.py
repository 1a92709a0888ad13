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
from conftest import record, run
from dataset import tokenize_record
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
    return Llama(model, tokenizer, TrainConfig(base_model=TINY_MODEL))


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


def test_generate_reports_tokens_and_eos(tiny_llama):
    prompt = "### Instruction:\nSay hi.\n\n### Response:\n"
    [g] = tiny_llama.generate([prompt], max_new_tokens=7)
    assert set(g) == {"answer", "answer_tokens", "ended_with_eos"}
    assert 0 <= g["answer_tokens"] <= 7
    assert g["ended_with_eos"] == (g["answer_tokens"] < 7)


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
            assert set(item[side]) == {"answer", "rougeL", "f1", "em", "nll", "answer_tokens", "eos_rate"}
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
    assert overall["perplexity"]["tuned"] == pytest.approx(math.exp(overall["scores"]["nll"]["tuned"]))
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
