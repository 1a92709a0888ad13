"""report.py: Markdown rows, a self-contained and escaped HTML page, atomic JSON/PNG/MD/HTML files, a headless-browser render."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

import report as rp

NAN = float("nan")
SCRIPT_ANSWER = "<script>alert(1)</script>\nsecond line & <b>bold</b>"


def score(base, tuned, diff, low, high, n, verdict):
    return {"base": base, "tuned": tuned, "diff": diff, "ci_low": low, "ci_high": high, "n": n, "verdict": verdict}


def side(answer, rouge, f1, em, nll, tokens, eos):
    return {"answer": answer, "rougeL": rouge, "f1": f1, "em": em, "nll": nll, "answer_tokens": tokens, "eos_rate": eos}


@pytest.fixture
def report():
    """3 items in 2 categories; one NLL is NaN (dropped record), one answer holds markup and a newline."""
    from comparison import METRICS

    metrics = copy.deepcopy(METRICS)  # what eval.py reports, in its display order
    items = [
        {"id": 0, "category": "closed_qa", "instruction": "When did the Wright brothers fly?",
         "context": "On December 17, 1903, near Kitty Hawk,\nthey made the first powered flight.", "reference": "December 17, 1903.",
         "base": side("They flew in the early 1900s, I think.", 0.2, 0.25, 0.0, 2.1, 37, 1.0),
         "tuned": side("December 17, 1903.", 1.0, 1.0, 1.0, 1.7, 8, 1.0)},
        {"id": 1, "category": "closed_qa", "instruction": "Where did they fly?", "context": "Near Kitty Hawk, North Carolina.",
         "reference": "Near Kitty Hawk.",
         "base": side("North Carolina", 0.0, 0.0, 0.0, NAN, 3, 0.0),
         "tuned": side(SCRIPT_ANSWER, 0.1, 0.2, 0.0, NAN, 12, 1.0)},
        {"id": 2, "category": "open_qa", "instruction": "Why is the sky blue?", "context": "",
         "reference": "Rayleigh scattering: air scatters blue light more than red.\nSee https://example.com/sky.",
         "base": side("Because of Rayleigh scattering.", 0.5, 0.4, 0.0, 2.5, 6, 1.0),
         "tuned": side("Light scattering.", 0.35, 0.3, 0.0, 2.0, 3, 1.0)},
    ]
    overall = {
        "rougeL": score(0.23333, 0.48333, 0.25, -0.1, 0.6, 3, "no significant difference"),
        "f1": score(0.21667, 0.5, 0.28333, 0.02, 0.7, 3, "better"),
        "em": score(0.0, 0.33333, 0.33333, 0.0, 1.0, 3, "no significant difference"),
        "nll": score(2.3, 1.85, -0.45, -0.5, -0.4, 2, "better"),
        "answer_tokens": score(15.33333, 7.66667, -7.66667, -29.0, 0.0, 3, None),
        "eos_rate": score(0.66667, 1.0, 0.33333, 0.0, 1.0, 3, None),
    }
    closed = copy.deepcopy(overall)
    closed["f1"] = score(0.41234, 0.6, 0.18766, 0.0499, 0.35, 2, "better")
    open_qa = copy.deepcopy(overall)
    open_qa["rougeL"] = score(0.5, 0.35, -0.15, -0.15, -0.15, 1, "worse")
    return {
        "title": "base vs fine-tuned: outputs/demo on validation", "adapter": "outputs/demo", "base_model": "meta-llama/Llama-2-7b-hf",
        "dataset": "data/dolly_sample.jsonl", "split": "validation",
        "generation": {"max_new_tokens": 128, "temperature": 0.0, "top_p": 1.0}, "seed": 42, "metrics": metrics, "items": items,
        "aggregates": {"overall": {"n": 3, "scores": overall},
                       "by_category": {"closed_qa": {"n": 2, "scores": closed}, "open_qa": {"n": 1, "scores": open_qa}}},
        "primary": {"closed_qa": "f1", "information_extraction": "f1", "classification": "f1", "default": "rougeL"},
    }


class Collector(HTMLParser):
    """Every start tag with its attributes, and the text inside each answer div."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.answers: list[tuple[str, str]] = []  # (class, text)
        self._answer: list[str] | None = None
        self._answer_class = ""
        self._depth = 0

    def handle_starttag(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        self.tags.append((tag, attrs))
        if self._answer is not None and tag == "div":
            self._depth += 1
        elif tag == "div" and "answer" in attrs.get("class", "").split():
            self._answer, self._answer_class, self._depth = [], attrs["class"], 0

    def handle_endtag(self, tag):
        if self._answer is not None and tag == "div":
            if self._depth == 0:
                self.answers.append((self._answer_class, "".join(self._answer)))
                self._answer = None
            else:
                self._depth -= 1

    def handle_data(self, data):
        if self._answer is not None:
            self._answer.append(data)

    def find(self, tag, id=None, cls=None):
        return [a for t, a in self.tags if t == tag and (id is None or a.get("id") == id)
                and (cls is None or cls in a.get("class", "").split())]


def parse(page: str) -> Collector:
    parser = Collector()
    parser.feed(page)
    parser.close()
    return parser


def no_nan(obj):
    """obj with every NaN replaced by a marker, so == can compare reports."""
    if isinstance(obj, float) and math.isnan(obj):
        return "<NaN>"
    if isinstance(obj, dict):
        return {k: no_nan(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [no_nan(v) for v in obj]
    return obj


def test_formatting():
    assert rp.fmt(0.41234) == "0.412"
    assert rp.fmt(NAN) == "n/a" and rp.fmt(None) == "n/a"
    assert rp.fmt_signed(0.11) == "+0.110" and rp.fmt_signed(-0.15) == "-0.150"
    assert rp.fmt_diff(score(0.31, 0.42, 0.11, 0.02, 0.2, 16, "better")) == "+0.110 [+0.020, +0.200]"
    assert rp.fmt_diff(score(NAN, NAN, NAN, NAN, NAN, 0, None)) == "n/a"
    assert rp.fmt_diff(score(1.0, 1.5, 0.5, NAN, NAN, 1, None)) == "+0.500 [n/a, n/a]"


def test_markdown_rows(report):
    md = rp.to_markdown(report)
    lines = md.splitlines()
    assert lines[0] == "# base vs fine-tuned: outputs/demo on validation"
    assert "- **adapter**: outputs/demo" in lines
    assert "- **dataset**: data/dolly_sample.jsonl (validation split)" in lines
    assert "- **n**: 3" in lines
    assert "- **generation**: max_new_tokens=128, temperature=0.0, top_p=1.0" in lines
    # closed_qa's primary score is token F1: 0.41234 -> 0.412, diff 0.18766 -> +0.188, CI [0.0499, 0.35] -> [+0.050, +0.350]
    assert "| closed_qa | 2 | token F1 | 0.412 | 0.600 | +0.188 [+0.050, +0.350] | better |" in lines
    # open_qa falls back to the default primary score, ROUGE-L; a negative difference keeps its sign
    assert "| open_qa | 1 | ROUGE-L F | 0.500 | 0.350 | -0.150 [-0.150, -0.150] | worse |" in lines
    assert "| overall | 3 | ROUGE-L F | 0.233 | 0.483 | +0.250 [-0.100, +0.600] | no significant difference |" in lines
    # overall first, then the categories in report order
    assert md.index("| overall |") < md.index("| closed_qa |") < md.index("| open_qa |")
    # all metrics, overall: direction arrows, NLL's smaller n, no verdict for descriptive metrics
    assert "| reference NLL (n=2) ↓ | 2.300 | 1.850 | -0.450 [-0.500, -0.400] | better |" in lines
    assert "| answer tokens | 15.333 | 7.667 | -7.667 [-29.000, +0.000] | — |" in lines
    assert "| ROUGE-L F ↑ | 0.233 | 0.483 | +0.250 [-0.100, +0.600] | no significant difference |" in lines


def test_markdown_nan_aggregate(report):
    report["aggregates"]["by_category"]["open_qa"]["scores"]["rougeL"] = score(NAN, NAN, NAN, NAN, NAN, 0, "no significant difference")
    md = rp.to_markdown(report)
    assert "| open_qa | 1 | ROUGE-L F | n/a | n/a | n/a | no significant difference |" in md.splitlines()
    assert not re.search(r"\bnan\b", md, re.IGNORECASE)
    assert not re.search(r"\bnan\b", rp.to_html(report), re.IGNORECASE)


def test_html_structure_and_escaping(report, tmp_path):
    page = rp.to_html(report)
    doc = parse(page)
    assert len(doc.find("table", id="summary")) == 1
    assert len(doc.find("table", id="all-metrics")) == 1
    sections = doc.find("section", cls="item")
    assert [s["id"] for s in sections] == ["item-0", "item-1", "item-2"]
    answer_classes = [a["class"] for a in doc.find("div", cls="answer")]
    assert answer_classes == ["answer reference", "answer base", "answer tuned"] * 3
    # the markup in the answer is text: escaped in the page, recovered verbatim (newline included) by a parser
    assert "<script>alert" not in page and "<b>bold" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert ("answer tuned", SCRIPT_ANSWER) in doc.answers
    assert ("answer reference", "December 17, 1903.") in doc.answers
    assert not [t for t, _ in doc.tags if t in ("script", "link", "iframe", "object", "embed")]
    # context only where there is one, NaN as n/a, verdicts coloured
    assert len(doc.find("div", cls="context")) == 2
    assert "<b>NLL</b> n/a" in page
    assert doc.find("span", cls="v-better") and doc.find("span", cls="v-worse") and doc.find("span", cls="v-ns")
    assert "white-space: pre-wrap" in page


def test_html_is_self_contained(report, tmp_path):
    png = tmp_path / "metrics.png"
    rp.plot_metrics(report, str(png))
    for page in (rp.to_html(report), rp.to_html(report, str(png))):
        doc = parse(page)
        refs = [v for _, attrs in doc.tags for k, v in attrs.items() if k in ("src", "href", "srcset", "action", "poster", "data")]
        assert not [r for r in refs if r.strip().lower().startswith(("http:", "https:", "//"))]
        assert "@import" not in page and "url(" not in page
    assert not parse(rp.to_html(report)).find("img")
    imgs = parse(rp.to_html(report, str(png))).find("img")
    assert len(imgs) == 1 and imgs[0]["src"].startswith("data:image/png;base64,iVBORw0KGgo")  # base64 of the PNG signature
    assert not parse(rp.to_html(report, str(tmp_path / "missing.png"))).find("img")


def test_write_all(report, tmp_path):
    out = tmp_path / "eval"
    paths = rp.write_all(report, str(out))
    assert sorted(os.path.basename(p) for p in paths.values()) == ["metrics.png", "report.html", "report.json", "report.md"]
    assert sorted(os.listdir(out)) == ["metrics.png", "report.html", "report.json", "report.md"]  # no temporary files left
    with open(paths["json"], encoding="utf-8") as fh:
        loaded = json.load(fh)
    assert math.isnan(loaded["items"][1]["base"]["nll"])
    assert no_nan(loaded) == no_nan(report)
    png = Path(paths["png"]).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert Path(paths["markdown"]).read_text(encoding="utf-8") == rp.to_markdown(report)
    assert "data:image/png;base64," in Path(paths["html"]).read_text(encoding="utf-8")
    # writing again replaces the files in place
    report["title"] = "second run"
    rp.write_all(report, str(out))
    assert json.loads(Path(paths["json"]).read_text(encoding="utf-8"))["title"] == "second run"
    assert sorted(os.listdir(out)) == ["metrics.png", "report.html", "report.json", "report.md"]


def test_json_is_utf8_and_indented(report, tmp_path):
    report["items"][0]["tuned"]["answer"] = "café — 日本"
    path = tmp_path / "r.json"
    rp.write_json(report, str(path))
    text = path.read_text(encoding="utf-8")
    assert "café — 日本" in text and '\n  "adapter": "outputs/demo"' in text
    assert not (tmp_path / "r.json.tmp").exists()


def test_plot_survives_nan_and_missing_categories(report, tmp_path):
    report["aggregates"]["by_category"]["open_qa"]["scores"]["rougeL"] = score(NAN, NAN, NAN, NAN, NAN, 0, "no significant difference")
    rp.plot_metrics(report, str(tmp_path / "a.png"))
    report["aggregates"]["by_category"] = {}
    rp.plot_metrics(report, str(tmp_path / "b.png"))
    for name in ("a.png", "b.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
    assert sorted(os.listdir(tmp_path)) == ["a.png", "b.png"]


def test_html_renders_in_headless_chromium(report, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium) - cannot render the page headless")
    paths = rp.write_all(report, str(tmp_path / "eval"))
    shot = tmp_path / "shot.png"
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,1600",
           Path(paths["html"]).resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert shot.is_file(), f"no screenshot (rc {proc.returncode}): {proc.stderr[-2000:]}"
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000
