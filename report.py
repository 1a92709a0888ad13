"""Write an eval report (base vs fine-tuned answers and their scores) as JSON, Markdown, one self-contained HTML page and a PNG chart.

    import report
    paths = report.write_all(report_dict, "outputs/demo/eval")   # report.json, metrics.png, report.md, report.html
    print(report.to_markdown(report_dict))

The report dict is the one eval.py builds: title, adapter, base_model, dataset, split, generation, seed,
metrics (name -> label and higher_is_better, in display order), items (per-item answers and scores),
aggregates (overall and by_category: per metric base/tuned means, the paired-bootstrap 95% CI of
tuned - base and a verdict) and primary (the primary metric per category, with a "default").
Every file is written atomically (to a temporary file in the same folder, then os.replace), and NaN
(e.g. an NLL for a record the length policy dropped) is shown as "n/a".
"""

from __future__ import annotations

import base64
import html
import json
import math
import numbers
import os
from typing import Any

import atomic

NA = "n/a"
NO_VERDICT = "—"  # descriptive metrics (higher_is_better null) get no verdict
VERDICT_CLASS = {"better": "v-better", "worse": "v-worse", "no significant difference": "v-ns"}
ITEM_SCORES = ("rougeL", "f1", "em", "nll")  # the per-item scores shown under each answer
SHORT_LABEL = {"rougeL": "ROUGE-L", "f1": "F1", "em": "EM", "nll": "NLL"}


def _json_default(obj: Any) -> Any:
    """JSON fallback for numpy scalars and arrays (anything with .item() or .tolist())."""
    for attr in ("item", "tolist"):
        if hasattr(obj, attr):
            return getattr(obj, attr)()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def write_json(report: dict[str, Any], path: str) -> None:
    """Write the report as indented UTF-8 JSON (NaN kept as NaN), atomically."""
    atomic.write_text(path, json.dumps(report, indent=2, ensure_ascii=False, default=_json_default) + "\n")


def _is_missing(x: Any) -> bool:
    """True for None, NaN and anything that is not a number (numpy scalars count as numbers)."""
    if x is None or isinstance(x, str | bytes):
        return True
    try:
        return math.isnan(float(x))
    except (TypeError, ValueError):
        return True


def fmt(x: Any) -> str:
    """A number with 3 decimals, or "n/a" for None/NaN."""
    return NA if _is_missing(x) else f"{float(x):.3f}"


def fmt_signed(x: Any) -> str:
    """A signed number with 3 decimals (+0.110), or "n/a" for None/NaN."""
    return NA if _is_missing(x) else f"{float(x):+.3f}"


def fmt_diff(score: dict[str, Any]) -> str:
    """The difference and its 95% CI: "+0.110 [+0.020, +0.200]" ("n/a" when there is no difference)."""
    diff = score.get("diff")
    if _is_missing(diff):
        return NA
    return f"{fmt_signed(diff)} [{fmt_signed(score.get('ci_low'))}, {fmt_signed(score.get('ci_high'))}]"


def fmt_item_score(x: Any) -> str:
    """A per-item score: ints as they are (token counts), floats with 3 decimals, "n/a" for None/NaN."""
    if isinstance(x, numbers.Integral) and not isinstance(x, bool):
        return str(x)
    return fmt(x)


def verdict_text(score: dict[str, Any]) -> str:
    """The verdict of an aggregate score, or an em dash for descriptive metrics."""
    return score.get("verdict") or NO_VERDICT


def metric_label(report: dict[str, Any], metric: str) -> str:
    """The display label of a metric (its name when the report does not describe it)."""
    return str((report.get("metrics") or {}).get(metric, {}).get("label") or metric)


def primary_metric(report: dict[str, Any], category: str) -> str:
    """The primary metric of a category ("overall" included): its own entry, else "default", else the first metric with a direction."""
    primary = report.get("primary") or {}
    if category in primary:
        return primary[category]
    if "default" in primary:
        return primary["default"]
    metrics = report.get("metrics") or {}
    return next((m for m, meta in metrics.items() if meta.get("higher_is_better") is not None), next(iter(metrics), "rougeL"))


def summary_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per group (overall first, then each category): category, n, primary metric, its aggregate score."""
    aggregates = report.get("aggregates") or {}
    groups = [("overall", aggregates["overall"])] if "overall" in aggregates else []
    groups += list((aggregates.get("by_category") or {}).items())
    rows = []
    for category, agg in groups:
        metric = primary_metric(report, category)
        rows.append({"category": category, "n": agg.get("n"), "metric": metric, "label": metric_label(report, metric),
                     "score": (agg.get("scores") or {}).get(metric, {})})
    return rows


def metric_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per metric (display order) of the overall aggregate: name, label, direction, score."""
    overall = (report.get("aggregates") or {}).get("overall") or {}
    scores = overall.get("scores") or {}
    names = list(report.get("metrics") or {}) + [m for m in scores if m not in (report.get("metrics") or {})]
    rows = []
    for name in names:
        score = scores.get(name, {})
        label = metric_label(report, name)
        if score.get("n") is not None and overall.get("n") is not None and score["n"] != overall["n"]:
            label += f" (n={score['n']})"  # e.g. NLL skips records the length policy dropped
        higher = (report.get("metrics") or {}).get(name, {}).get("higher_is_better")
        rows.append({"metric": name, "label": label, "higher_is_better": higher, "score": score})
    return rows


def header_fields(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The (name, value) pairs of the header block: adapter, base model, dataset/split, n, generation, seed."""
    overall = (report.get("aggregates") or {}).get("overall") or {}
    n = overall.get("n", len(report.get("items") or []))
    gen = report.get("generation") or {}
    fields = [("adapter", report.get("adapter")), ("base model", report.get("base_model")),
              ("dataset", f"{report.get('dataset', NA)} ({report.get('split', NA)} split)"), ("n", n),
              ("generation", ", ".join(f"{k}={v}" for k, v in gen.items()) or NA), ("seed", report.get("seed"))]
    fields += list((report.get("header") or {}).items())  # what eval.py says about the comparison itself
    return [(name, NA if value is None else str(value)) for name, value in fields]


DEFAULT_NOTE = "Difference = fine-tuned − base, with its 95% paired-bootstrap confidence interval."


def verdict_note(report: dict[str, Any]) -> str:
    """How the verdicts were reached, in one paragraph (the report's verdict_policy, when it has one)."""
    policy = report.get("verdict_policy")
    if not policy:
        return DEFAULT_NOTE + " The verdict is better/worse when the interval excludes 0."
    primary = policy["primary"]
    return (f"{DEFAULT_NOTE} Primary test, declared before the results: {primary['group']} "
            f"{metric_label(report, primary['metric'])}, better/worse when its interval excludes 0. Every other verdict is "
            f"Holm–Bonferroni-corrected across the {policy['corrected_tests']} tests of this report (family-wise "
            f"α = {policy['family_alpha']}): better/worse when its adjusted p-value is below α.")


STOP_LABELS = {"eos": "EOS", "stop_string": "a section marker (cut there)", "length": "the token limit"}


def stop_rows(report: dict[str, Any]) -> list[list[str]]:
    """How each side's answers ended, overall: one row per rule, counts for base and fine-tuned."""
    stops = ((report.get("aggregates") or {}).get("overall") or {}).get("stops") or {}
    return [[STOP_LABELS.get(rule, rule), str(stops["base"].get(rule, 0)), str(stops["tuned"].get(rule, 0))]
            for rule in STOP_LABELS if stops]


def _md_cell(text: Any) -> str:
    """Text made safe for one Markdown table cell (pipes escaped, line breaks flattened)."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    """A GitHub Markdown table, numeric-looking columns right-aligned."""
    align = ["---:" if h in ("n", "base", "fine-tuned") else "---" for h in head]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    return lines + ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]


def to_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: title, header block, the primary score per category, all metrics overall."""
    lines = [f"# {report.get('title', 'base vs fine-tuned')}", ""]
    lines += [f"- **{name}**: {value}" for name, value in header_fields(report)]
    lines += ["", verdict_note(report), ""]
    head = ["category", "n", "primary score", "base", "fine-tuned", "difference [95% CI]", "verdict"]
    rows = [[r["category"], NA if r["n"] is None else str(r["n"]), r["label"], fmt(r["score"].get("base")),
             fmt(r["score"].get("tuned")), fmt_diff(r["score"]), verdict_text(r["score"])] for r in summary_rows(report)]
    lines += ["## Overall and per category (primary score)", ""] + _md_table(head, rows) + [""]
    head = ["metric", "base", "fine-tuned", "difference [95% CI]", "verdict"]
    rows = [[r["label"] + {True: " ↑", False: " ↓"}.get(r["higher_is_better"], ""), fmt(r["score"].get("base")),
             fmt(r["score"].get("tuned")), fmt_diff(r["score"]), verdict_text(r["score"])] for r in metric_rows(report)]
    lines += ["## Overall, all metrics", "", "↑ higher is better, ↓ lower is better, no arrow: descriptive only.", ""]
    lines += _md_table(head, rows)
    if stop_rows(report):
        lines += ["", "## How the answers ended", ""] + _md_table(["ended at", "base", "fine-tuned"], stop_rows(report))
    return "\n".join(lines) + "\n"


def write_markdown(report: dict[str, Any], path: str) -> None:
    """Write to_markdown(report) to path, atomically."""
    atomic.write_text(path, to_markdown(report))


CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --soft: #f6f8fa; --accent: #0969da;
        --better: #1a7f37; --better-bg: #dafbe1; --worse: #cf222e; --worse-bg: #ffebe9; --ns: #59636e; --ns-bg: #eff2f5; }
* { box-sizing: border-box; }
body { margin: 0; background: #fff; color: var(--fg); line-height: 1.5; font-size: 15px;
       font-family: -apple-system, BlinkMacSystemFont, "Segoe UI", Roboto, "Helvetica Neue", Arial, "Noto Sans",
                    "Liberation Sans", sans-serif, "Apple Color Emoji", "Segoe UI Emoji"; }
main { max-width: 1200px; margin: 0 auto; padding: 28px 32px 64px; }
h1 { font-size: 1.6em; margin: 0 0 12px; overflow-wrap: anywhere; }
h2 { font-size: 1.25em; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0 0 8px;
        padding: 12px 16px; background: var(--soft); border: 1px solid var(--line); border-radius: 8px; }
.meta dt { color: var(--muted); }
.meta dd { margin: 0; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace;
           font-size: 0.9em; overflow-wrap: anywhere; }
.note { color: var(--muted); font-size: 0.9em; margin: 6px 0 10px; }
.table-wrap { overflow-x: auto; margin: 0 0 8px; }
table { border-collapse: collapse; width: 100%; font-size: 0.95em; }
th, td { padding: 6px 10px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { background: var(--soft); font-weight: 600; white-space: nowrap; }
th.num { text-align: right; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.overall td { font-weight: 600; background: #fbfcfd; }
.verdict { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 0.9em; white-space: nowrap; }
.v-better { color: var(--better); background: var(--better-bg); }
.v-worse { color: var(--worse); background: var(--worse-bg); }
.v-ns { color: var(--ns); background: var(--ns-bg); }
.v-none { color: var(--muted); }
figure { margin: 16px 0 0; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 8px; }
.item { border: 1px solid var(--line); border-radius: 10px; padding: 16px 18px; margin: 0 0 18px; }
.item-head { font-size: 0.85em; color: var(--muted); margin: 0 0 6px; font-weight: 600; letter-spacing: 0.02em; }
.item-head .cat { color: var(--accent); }
.instruction { font-size: 1.05em; font-weight: 600; white-space: pre-wrap; overflow-wrap: anywhere; margin: 0 0 10px; }
.context { white-space: pre-wrap; overflow-wrap: anywhere; color: var(--muted); background: var(--soft);
           border-left: 3px solid var(--line); border-radius: 4px; padding: 8px 12px; margin: 0 0 12px;
           font-size: 0.92em; max-height: 16em; overflow-y: auto; }
.answers { display: grid; grid-template-columns: repeat(3, minmax(0, 1fr)); gap: 12px; }
.col { display: flex; flex-direction: column; border: 1px solid var(--line); border-radius: 8px; overflow: hidden; }
.col h3 { margin: 0; padding: 6px 12px; font-size: 0.85em; font-weight: 600; background: var(--soft);
          border-bottom: 1px solid var(--line); }
.col.reference h3 { background: #eef6ff; }
.answer { flex: 1; padding: 10px 12px; white-space: pre-wrap; overflow-wrap: anywhere; font-size: 0.93em; }
.empty { color: var(--muted); font-style: italic; }
.scores { display: flex; flex-wrap: wrap; gap: 4px 6px; padding: 8px 12px; border-top: 1px dashed var(--line);
          font-size: 0.8em; font-variant-numeric: tabular-nums; }
.score { background: var(--soft); border-radius: 4px; padding: 1px 6px; white-space: nowrap; }
.score b { font-weight: 600; color: var(--muted); }
.score.primary { outline: 1px solid var(--accent); }
@media (max-width: 800px) { main { padding: 16px; } .answers { grid-template-columns: 1fr; } }
"""


def _esc(text: Any) -> str:
    """HTML-escaped text (quotes too, so it is safe in attributes)."""
    return html.escape("" if text is None else str(text), quote=True)


def _verdict_html(score: dict[str, Any]) -> str:
    """The verdict as a coloured pill (green better, red worse, grey no significant difference)."""
    v = score.get("verdict")
    return f'<span class="verdict {VERDICT_CLASS.get(v, "v-none")}">{_esc(verdict_text(score))}</span>'


def _summary_table_html(report: dict[str, Any]) -> str:
    """table#summary: the primary score per category, overall first."""
    out = ['<div class="table-wrap"><table id="summary">', ('<thead><tr><th>category</th><th class="num">n</th><th>primary score</th>'
           '<th class="num">base</th><th class="num">fine-tuned</th><th class="num">difference [95% CI]</th>'
           '<th>verdict</th></tr></thead>'), "<tbody>"]
    for r in summary_rows(report):
        s = r["score"]
        cls = ' class="overall"' if r["category"] == "overall" else ""
        out.append(f'<tr{cls}><td>{_esc(r["category"])}</td><td class="num">{_esc(NA if r["n"] is None else r["n"])}</td>'
                   f'<td>{_esc(r["label"])}</td><td class="num">{fmt(s.get("base"))}</td><td class="num">{fmt(s.get("tuned"))}</td>'
                   f'<td class="num">{_esc(fmt_diff(s))}</td><td>{_verdict_html(s)}</td></tr>')
    return "\n".join(out + ["</tbody>", "</table></div>"])


def _stops_table_html(report: dict[str, Any]) -> str:
    """table#stops: how each side's answers ended (empty when the report has no counts)."""
    rows = stop_rows(report)
    if not rows:
        return ""
    body = "".join(f'<tr><td>{_esc(a)}</td><td class="num">{_esc(b)}</td><td class="num">{_esc(t)}</td></tr>' for a, b, t in rows)
    return ('<h2>How the answers ended</h2><div class="table-wrap"><table id="stops"><thead><tr><th>ended at</th>'
            f'<th class="num">base</th><th class="num">fine-tuned</th></tr></thead><tbody>{body}</tbody></table></div>')


def _metrics_table_html(report: dict[str, Any]) -> str:
    """table#all-metrics: every metric of the overall aggregate."""
    out = ['<div class="table-wrap"><table id="all-metrics">', ('<thead><tr><th>metric</th><th class="num">base</th>'
           '<th class="num">fine-tuned</th><th class="num">difference [95% CI]</th><th>verdict</th></tr></thead>'), "<tbody>"]
    for r in metric_rows(report):
        s = r["score"]
        arrow = {True: " ↑", False: " ↓"}.get(r["higher_is_better"], "")
        out.append(f'<tr><td>{_esc(r["label"] + arrow)}</td><td class="num">{fmt(s.get("base"))}</td>'
                   f'<td class="num">{fmt(s.get("tuned"))}</td><td class="num">{_esc(fmt_diff(s))}</td>'
                   f'<td>{_verdict_html(s)}</td></tr>')
    return "\n".join(out + ["</tbody>", "</table></div>"])


def _answer_html(side: str, title: str, text: Any, scores: dict[str, Any] | None, primary: str) -> str:
    """One column of an item: a heading, the (escaped) answer, its per-item scores underneath."""
    body = _esc(text) if text else '<span class="empty">(empty answer)</span>'
    parts = [f'<div class="col {side}"><h3>{_esc(title)}</h3><div class="answer {side}">{body}</div>']
    if scores is not None:
        chips = []
        for metric in ITEM_SCORES:
            cls = "score primary" if metric == primary else "score"
            chips.append(f'<span class="{cls}" title="{_esc(metric)}"><b>{SHORT_LABEL[metric]}</b> '
                         f'{fmt_item_score(scores.get(metric))}</span>')
        parts.append(f'<div class="scores">{"".join(chips)}</div>')
    return "".join(parts) + "</div>"


def _item_html(report: dict[str, Any], item: dict[str, Any]) -> str:
    """section.item#item-{id}: header, instruction, context, then reference | base | fine-tuned."""
    item_id, category = item.get("id"), item.get("category", "")
    primary = primary_metric(report, category)
    out = [f'<section class="item" id="item-{_esc(item_id)}">',
           f'<div class="item-head">#{_esc(item_id)} · <span class="cat">{_esc(category)}</span></div>',
           f'<div class="instruction">{_esc(item.get("instruction", ""))}</div>']
    if item.get("context"):
        out.append(f'<div class="context">{_esc(item["context"])}</div>')
    base, tuned = item.get("base") or {}, item.get("tuned") or {}
    out += ['<div class="answers">', _answer_html("reference", "Reference", item.get("reference", ""), None, primary),
            _answer_html("base", "Base model", base.get("answer", ""), base, primary),
            _answer_html("tuned", "Fine-tuned", tuned.get("answer", ""), tuned, primary), "</div>", "</section>"]
    return "\n".join(out)


def to_html(report: dict[str, Any], png_path: str | None = None) -> str:
    """The report as one self-contained HTML page (inline CSS, the chart as a data URI when png_path exists)."""
    title = report.get("title", "base vs fine-tuned")
    meta = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in header_fields(report))
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">', f"<title>{_esc(title)}</title>",
           f"<style>{CSS}</style>", "</head>", "<body>", "<main>", f"<h1>{_esc(title)}</h1>", f'<dl class="meta">{meta}</dl>',
           "<h2>Primary score, overall and per category</h2>",
           f'<p class="note">{_esc(verdict_note(report))}</p>',
           _summary_table_html(report), "<h2>All metrics, overall</h2>",
           '<p class="note">↑ higher is better, ↓ lower is better, no arrow: descriptive only (no verdict).</p>',
           _metrics_table_html(report), _stops_table_html(report)]
    if png_path and os.path.isfile(png_path):
        with open(png_path, "rb") as fh:
            data = base64.b64encode(fh.read()).decode("ascii")
        out.append(f'<figure id="chart"><img alt="primary score per category, base vs fine-tuned, and the difference '
                   f'with its 95% CI" src="data:image/png;base64,{data}"></figure>')
    items = report.get("items") or []
    out.append(f"<h2>Answers ({len(items)} items)</h2>")
    out.append('<p class="note">Scores under each answer are against the reference; the outlined one is the category\'s primary score.</p>')
    out += [_item_html(report, item) for item in items]
    out += ["</main>", "</body>", "</html>"]
    return "\n".join(out) + "\n"


def write_html(report: dict[str, Any], path: str, png_path: str | None = None) -> None:
    """Write to_html(report, png_path) to path, atomically."""
    atomic.write_text(path, to_html(report, png_path))


def plot_metrics(report: dict[str, Any], path: str) -> None:
    """Two panels: base vs fine-tuned primary score per category (bars), and the difference with its 95% CI (points)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # the Agg backend, without touching pyplot's global one
    from matplotlib.figure import Figure

    rows = summary_rows(report)
    labels = [f"{r['category']}\n{r['label']}, n={NA if r['n'] is None else r['n']}" for r in rows]
    base = [_float(r["score"].get("base")) for r in rows]
    tuned = [_float(r["score"].get("tuned")) for r in rows]
    diff = [_float(r["score"].get("diff")) for r in rows]
    low = [_float(r["score"].get("ci_low")) for r in rows]
    high = [_float(r["score"].get("ci_high")) for r in rows]
    colours = {"better": "#1a7f37", "worse": "#cf222e"}

    height = 1.6 + 0.55 * max(1, len(rows))
    fig = Figure(figsize=(11, height), layout="constrained")
    FigureCanvasAgg(fig)
    ax_bar, ax_diff = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    y = list(range(len(rows)))
    h = 0.38
    bars_b = ax_bar.barh([v - h / 2 for v in y], base, height=h, color="#8c959f", label="base")
    bars_t = ax_bar.barh([v + h / 2 for v in y], tuned, height=h, color="#0969da", label="fine-tuned")
    for bars, values, offset in ((bars_b, base, -h / 2), (bars_t, tuned, h / 2)):
        ax_bar.bar_label(bars, labels=["" if math.isnan(v) else f"{v:.3f}" for v in values], padding=3, fontsize=8)
        for yi, v in zip(y, values, strict=True):
            if math.isnan(v):  # no bar to label: say so where it would start
                ax_bar.annotate(NA, (0.0, yi + offset), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8, color="#59636e")
    finite = [v for v in base + tuned if not math.isnan(v)]
    ax_bar.set_xlim(min(0.0, *finite) * 1.25 if finite else 0.0, max(0.0, *finite) * 1.18 if finite and max(finite) > 0 else 1.0)
    ax_bar.set_yticks(y, labels, fontsize=8)
    ax_bar.set_ylim(len(rows) - 0.5, -0.5)  # overall on top; explicit, so a row of NaN (drawn as "n/a") keeps its place
    ax_bar.set_xlabel("primary score (mean over items)")
    ax_bar.set_title("base vs fine-tuned", fontsize=10)
    fig.legend(handles=[bars_b, bars_t], loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    ax_bar.grid(axis="x", alpha=0.3)

    ax_diff.axvline(0.0, color="#59636e", linewidth=1, linestyle="--")
    for yi, d, lo, hi, r in zip(y, diff, low, high, rows, strict=True):
        if math.isnan(d):
            ax_diff.annotate(NA, (0.0, yi), ha="center", va="center", fontsize=8, color="#59636e",
                             bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none"})
            continue
        err = [[max(0.0, d - lo) if not math.isnan(lo) else 0.0], [max(0.0, hi - d) if not math.isnan(hi) else 0.0]]
        ax_diff.errorbar([d], [yi], xerr=err, fmt="o", color=colours.get(r["score"].get("verdict"), "#59636e"),
                         capsize=4, markersize=6, linewidth=1.5)
    ax_diff.margins(x=0.12)
    ax_diff.set_xlabel("fine-tuned − base (95% CI)")
    ax_diff.set_title("difference (green better, red worse, grey n.s.)", fontsize=10)
    ax_diff.grid(axis="x", alpha=0.3)
    fig.suptitle(report.get("title", "base vs fine-tuned"), fontsize=11)

    with atomic.path(path) as tmp:  # same folder and extension (savefig picks the format from it)
        fig.savefig(tmp, dpi=120)


def _float(x: Any) -> float:
    """x as a float, NaN for None/NaN/non-numbers."""
    return math.nan if _is_missing(x) else float(x)


def write_all(report: dict[str, Any], out_dir: str) -> dict[str, str]:
    """Write report.json, metrics.png, report.md and report.html (with the chart embedded) into out_dir; their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, file) for name, file in
             (("json", "report.json"), ("png", "metrics.png"), ("markdown", "report.md"), ("html", "report.html"))}
    write_json(report, paths["json"])
    plot_metrics(report, paths["png"])
    write_markdown(report, paths["markdown"])
    write_html(report, paths["html"], png_path=paths["png"])
    return paths
