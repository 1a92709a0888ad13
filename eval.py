"""Compare the fine-tuned adapter's answers with the vanilla base model's, side by side.

    python eval.py                                   # predefined questions, adapter llama_adapter/
    python eval.py --adapter outputs/demo            # another adapter
    python eval.py --preset smoke                    # the adapter `python main.py --preset smoke` wrote
    python eval.py --question "Who wrote Hamlet?"    # your own question (and --context "...")
    python eval.py --adapter outputs/demo --split validation   # scores on the held-out split -> outputs/demo/eval/
    python eval.py --dataset my.jsonl --limit 200 --categories closed_qa open_qa
    python eval.py --interactive                     # type questions, see both answers

Both answers come from ONE loaded model: the base answer is generated with the adapter
switched off (PEFT's disable_adapter), so the 7B base is never loaded twice.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import textwrap
from typing import Any

from transformers import set_seed

import scores
from cli import run_cli
from config import ConfigError, EvalConfig, TrainConfig, parse_config
from dataset import DataError, create_question, load_records, split_records, tokenize_record
from loading import read_train_config
from model import Llama
from runtime import silence_harmless_logs

# A few dolly-style questions, one per kind of task, one with context.
PREDEFINED: list[dict[str, str]] = [
    {"category": "open_qa", "instruction": "What is the difference between a virus and a bacterium?", "context": ""},
    {"category": "closed_qa", "instruction": "When did the Wright brothers make their first powered flight, and where?",
     "context": "Orville and Wilbur Wright were American aviation pioneers. On December 17, 1903, near Kitty Hawk, "
                "North Carolina, they made the first controlled, sustained flight of a powered, heavier-than-air "
                "aircraft. Orville flew 120 feet in 12 seconds on the first of four flights that day."},
    {"category": "brainstorming", "instruction": "Give me five ideas for a rainy Sunday afternoon at home.", "context": ""},
    {"category": "classification",
     "instruction": "Classify each as a fruit or a vegetable: apple, carrot, banana, broccoli, mango.", "context": ""},
    {"category": "creative_writing", "instruction": "Write a short poem about the sea at night.", "context": ""},
    {"category": "general_qa", "instruction": "Why do leaves change colour in autumn?", "context": ""},
]


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, sys.argv[1:] if argv is None else argv)


def run(argv: list[str]) -> None:
    silence_harmless_logs()
    cfg, _ = parse_config(EvalConfig, argv, __doc__)
    if not os.path.isdir(cfg.adapter):
        raise ConfigError(
            f"no adapter directory {cfg.adapter}: train one with `python main.py` (or --preset demo/smoke), or pass --adapter DIR"
        )
    if cfg.out and os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise ConfigError(f"--out {cfg.out} is a file; choose a directory for the report")
    state = distributed_state()  # None in one process (python eval.py)
    if state is not None and cfg.interactive:
        raise ConfigError("--interactive reads the keyboard: run it in one process (python eval.py --interactive)")
    set_seed(cfg.seed)
    train_cfg = read_train_config(cfg.adapter)  # None for an adapter trained elsewhere
    llama = Llama.load_pretrained_model(cfg.adapter, base_model=cfg.base_model, quantization=cfg.quantization, dequantize=cfg.dequantize)
    if state is None or state.is_main_process:
        print(f"[eval] base model {llama.base_model} (adapter off) vs the same base + adapter {cfg.adapter}", flush=True)
    if cfg.interactive:
        return interactive(llama, cfg)
    if cfg.split or cfg.dataset:
        return evaluate(llama, train_cfg, cfg, state)
    if state is not None and not state.is_main_process:
        return  # a few side-by-side questions: the main process answers them alone
    samples = [{"category": "your question", "instruction": cfg.question, "context": cfg.context}] if cfg.question else PREDEFINED
    base, tuned = compare(llama, samples, cfg)
    print_side_by_side(samples, base, tuned)


# --- the quantitative evaluation ---------------------------------------------------------

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
# SQuAD-style F1 is the primary score where answers are short spans; ROUGE-L elsewhere.
PRIMARY = {"closed_qa": "f1", "information_extraction": "f1", "classification": "f1", "default": "rougeL"}


def select_records(train: TrainConfig | None, cfg: EvalConfig) -> tuple[list[dict[str, Any]], str]:
    """The records to score: the adapter's own held-out split (same data, fraction and seed), or --dataset."""
    dataset = cfg.dataset or (train.dataset if train else None)
    if dataset is None:
        raise ConfigError("this adapter has no train_config.yaml naming its dataset; pass --dataset")
    same = train is not None and dataset == train.dataset
    records = load_records(dataset, train.max_records if same else None, cfg.skip_bad_records or (same and train.skip_bad_records))
    split = cfg.split or "all"
    if split == "validation":
        if train is None:
            raise ConfigError("--split validation needs the adapter's train_config.yaml (its split seed and fraction)")
        _, records = split_records(records, train.val_fraction, train.seed)
    rows = [dict(r, id=i) for i, r in enumerate(records) if not cfg.categories or r["category"] in cfg.categories]
    if not rows:
        raise DataError(f"{dataset}: no records to evaluate in split {split!r} for categories {cfg.categories}")
    return rows[: cfg.limit] if cfg.limit else rows, dataset


def score_items(llama: Llama, rows: list[dict[str, Any]], cfg: EvalConfig, max_length: int) -> list[dict[str, Any]]:
    """Generate with the adapter off and on, score each answer, and the reference NLL under each."""
    prompts = [create_question(r) for r in rows]
    examples = [tokenize_record(r, llama.tokenizer, max_length)[0] for r in rows]
    kept = [e for e in examples if e is not None]
    items = [{k: r[k] for k in ("id", "category", "instruction", "context")} | {"reference": r["response"].strip()} for r in rows]
    for side, use_adapter in (("base", False), ("tuned", True)):
        generated = llama.generate(prompts, cfg.batch_size, use_adapter, progress=True, **generation(cfg))
        nll = iter(llama.nll(kept, use_adapter, NLL_BATCH))
        for item, gen, example in zip(items, generated, examples, strict=True):
            ref, answer = item["reference"], gen["answer"]
            item[side] = {
                "answer": answer, "rougeL": scores.rouge_l(answer, ref), "f1": scores.token_f1(answer, ref),
                "em": scores.exact_match(answer, ref), "nll": next(nll) if example is not None else float("nan"),
                "answer_tokens": gen["answer_tokens"], "eos_rate": float(gen["ended_with_eos"]),
            }
    return items


def aggregate(items: list[dict[str, Any]], cfg: EvalConfig) -> dict[str, Any]:
    """Per metric: base and tuned means, the paired-bootstrap 95% CI of the difference, a verdict."""
    out: dict[str, Any] = {"n": len(items), "scores": {}}
    for metric, meta in METRICS.items():
        pairs = [(i["base"][metric], i["tuned"][metric]) for i in items]
        pairs = [(b, t) for b, t in pairs if b == b and t == t]  # NLL is NaN for records the length policy drops
        ci = scores.paired_bootstrap([b for b, _ in pairs], [t for _, t in pairs], cfg.bootstrap_samples, cfg.seed)
        higher = meta["higher_is_better"]
        verdict = scores.verdict(ci, higher) if len(pairs) >= MIN_ITEMS_FOR_VERDICT else f"too few items (n<{MIN_ITEMS_FOR_VERDICT})"
        out["scores"][metric] = ci | {"verdict": verdict if higher is not None else None}
    nll = out["scores"]["nll"]
    out["perplexity"] = {side: math.exp(nll[side]) if nll[side] == nll[side] else float("nan") for side in ("base", "tuned")}
    return out


def distributed_state() -> Any:
    """accelerate's PartialState when launched as several processes (`accelerate launch eval.py`, torchrun), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # one process per GPU (LOCAL_RANK); gloo on a CPU
    return state if state.num_processes > 1 else None


def score_across_processes(llama: Llama, rows: list[dict[str, Any]], cfg: EvalConfig, max_length: int, state: Any) -> list[dict[str, Any]]:
    """Each process scores its contiguous share of the rows; every process gets back all items, in the rows' order."""
    from accelerate.utils import gather_object

    with state.split_between_processes(rows) as mine:
        items = score_items(llama, mine, cfg, max_length)
    return sorted(gather_object(items), key=lambda item: item["id"])


def evaluate(llama: Llama, train: TrainConfig | None, cfg: EvalConfig, state: Any = None) -> None:
    import report as report_lib

    rows, dataset = select_records(train, cfg)
    is_main = state is None or state.is_main_process
    max_length = train.max_length if train else 1024  # the adapter's length policy for the reference NLL
    if is_main:
        across = f", split across {state.num_processes} processes" if state is not None else ""
        print(f"[eval] scoring {len(rows)} records of {dataset} ({cfg.split or 'all'}), base and fine-tuned{across}")
    items = score_items(llama, rows, cfg, max_length) if state is None else score_across_processes(llama, rows, cfg, max_length, state)
    if not is_main:
        return  # the main process aggregates and writes the report
    categories = sorted({i["category"] for i in items})
    report = {
        "title": f"base vs fine-tuned: {cfg.adapter} on {dataset} ({cfg.split or 'all'})",
        "adapter": cfg.adapter, "base_model": llama.base_model,
        "dataset": dataset, "split": cfg.split or "all", "generation": generation(cfg), "seed": cfg.seed,
        "metrics": METRICS, "primary": PRIMARY, "items": items,
        "aggregates": {
            "overall": aggregate(items, cfg),
            "by_category": {c: aggregate([i for i in items if i["category"] == c], cfg) for c in categories},
        },
    }
    paths = report_lib.write_all(report, cfg.out or os.path.join(cfg.adapter, "eval"))
    print(report_lib.to_markdown(report))
    print("[eval] wrote " + ", ".join(paths.values()))


def interactive(llama: Llama, cfg: EvalConfig) -> None:
    """Read a question (and optional context) per turn; print both answers side by side. Empty question quits."""
    print("Type a question (empty line to quit); then an optional context (empty line for none).")
    while True:
        try:
            question = input("question> ").strip()
            context = input("context>  ").strip() if question else ""
        except EOFError:
            question = ""
        if not question:
            return
        sample = {"category": "your question", "instruction": question, "context": context}
        base, tuned = compare(llama, [sample], cfg)
        print_side_by_side([sample], base, tuned)


def generation(cfg: EvalConfig) -> dict[str, Any]:
    return {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p}


def compare(llama: Llama, samples: list[dict[str, str]], cfg: EvalConfig) -> tuple[list[str], list[str]]:
    """(base answers, fine-tuned answers) for the samples, from the same loaded weights."""
    prompts = [create_question(s) for s in samples]
    base, tuned = ([g["answer"] for g in llama.generate(prompts, cfg.batch_size, use_adapter, progress=True, **generation(cfg))]
                   for use_adapter in (False, True))
    return base, tuned


def side_by_side(left: str, right: str, width: int) -> str:
    """Two wrapped columns of text, `width` characters in all."""
    col = max(20, (width - 3) // 2)
    lines_l = [w for p in left.splitlines() or [""] for w in textwrap.wrap(p, col) or [""]]
    lines_r = [w for p in right.splitlines() or [""] for w in textwrap.wrap(p, col) or [""]]
    rows = max(len(lines_l), len(lines_r))
    lines_l += [""] * (rows - len(lines_l))
    lines_r += [""] * (rows - len(lines_r))
    return "\n".join(f"{a:<{col}} | {b}" for a, b in zip(lines_l, lines_r, strict=True))


def print_side_by_side(samples: list[dict[str, str]], base: list[str], tuned: list[str]) -> None:
    width = min(shutil.get_terminal_size((120, 40)).columns, 160)
    for i, (sample, b, t) in enumerate(zip(samples, base, tuned, strict=True), 1):
        print("=" * width)
        print(f"[{i}] ({sample.get('category', '')}) {sample['instruction']}")
        if sample.get("context"):
            print(textwrap.fill("context: " + sample["context"], width))
        print("-" * width)
        print(side_by_side("BASE MODEL", "FINE-TUNED (adapter)", width))
        print(side_by_side("-" * 10, "-" * 20, width))
        print(side_by_side(b or "(empty answer)", t or "(empty answer)", width))
    print("=" * width)


if __name__ == "__main__":
    raise SystemExit(main())
