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

import os
import shutil
import sys
import textwrap
from typing import Any

from transformers import set_seed

import comparison
from cli import run_cli
from config import ConfigError, EvalConfig, TrainConfig, parse_config
from dataset import create_question, section_markers
from loading import read_train_config
from model import Llama
from runtime import cpu_threads, launched_processes, silence_harmless_logs

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
    threads = cpu_threads(cfg.threads)
    llama = Llama.load_pretrained_model(cfg.adapter, base_model=cfg.base_model, quantization=cfg.quantization, dequantize=cfg.dequantize,
                                        engine=cfg.engine)
    if not llama.model.device.type == "cuda":
        print(f"[eval] CPU: {threads} torch thread(s) (--threads)", flush=True)
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


# --- the quantitative evaluation (comparison.py: which records, scores, verdicts) -------------


def distributed_state() -> Any:
    """accelerate's PartialState when launched as several processes (`accelerate launch eval.py`, torchrun), else None."""
    if launched_processes() <= 1:
        return None
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # one process per GPU (LOCAL_RANK); gloo on a CPU
    return state if state.num_processes > 1 else None


def score_across_processes(
    llama: Llama, rows: list[dict[str, Any]], cfg: EvalConfig, max_length: int, stops: list[str], state: Any
) -> list[dict[str, Any]]:
    """Each process scores its contiguous share of the rows; every process gets back all items, in the rows' order."""
    from accelerate.utils import gather_object

    with state.split_between_processes(rows) as mine:
        items = comparison.score_items(llama, mine, cfg, max_length, stops)
    return sorted(gather_object(items), key=lambda item: item["id"])


def evaluate(llama: Llama, train: TrainConfig | None, cfg: EvalConfig, state: Any = None) -> None:
    import report as report_lib

    prints = comparison.read_fingerprints(cfg.adapter)
    rows, dataset = comparison.select_records(train, prints, cfg)
    overlap = comparison.check_no_training_records(rows, prints, cfg)  # refuses to score training records unless told to
    is_main = state is None or state.is_main_process
    max_length = train.max_length if train else 1024  # the adapter's length policy for the reference NLL
    stops = section_markers() if cfg.stop_strings else []
    if is_main:
        across = f", split across {state.num_processes} processes" if state is not None else ""
        print(f"[eval] scoring {len(rows)} records of {dataset} ({cfg.split or 'all'}), base and fine-tuned{across}")
    if state is None:
        items = comparison.score_items(llama, rows, cfg, max_length, stops)
    else:
        items = score_across_processes(llama, rows, cfg, max_length, stops, state)
    if not is_main:
        return  # the main process aggregates and writes the report
    report = build_report(llama, items, dataset, cfg, stops, overlap)
    paths = report_lib.write_all(report, cfg.out or os.path.join(cfg.adapter, "eval"))
    print(report_lib.to_markdown(report))
    print("[eval] wrote " + ", ".join(paths.values()))


def build_report(
    llama: Llama, items: list[dict[str, Any]], dataset: str, cfg: EvalConfig, stops: list[str], overlap: int
) -> dict[str, Any]:
    """The report dict report.py renders: what was compared, on what, how, and every item with both answers."""
    categories = sorted({i["category"] for i in items})
    aggregates = {
        "overall": comparison.aggregate(items, cfg),
        "by_category": {c: comparison.aggregate([i for i in items if i["category"] == c], cfg) for c in categories},
    }
    policy = comparison.assign_verdicts(aggregates)
    sample = f"seeded sample of {cfg.limit}, stratified by category (seed {cfg.seed})" if cfg.limit else "all selected records"
    header = {
        "base": f"{llama.base_model}: {llama.quantization_label()} base with the adapter switched off (the same weights)",
        "fine-tuned": f"the same base + the LoRA adapter in {cfg.adapter}",
        "card": llama.device_label(),
        "stop rules": ("EOS, or the first of " + ", ".join(repr(s) for s in stops) + ", the same for both models; "
                       "scores are computed on the cut answers (raw text in report.json)") if stops else "EOS only",
        "sample": sample,
        "training records scored": f"{overlap} (allowed by --allow-train-overlap)" if overlap else "none (checked by content hash)",
        "verdicts": (f"primary test (pre-declared): overall {comparison.METRICS[policy['primary']['metric']]['label']}, 95% paired "
                     f"bootstrap CI; the other {policy['corrected_tests']} verdicts Holm–Bonferroni-corrected, family-wise "
                     f"α = {policy['family_alpha']}; fewer than {comparison.MIN_ITEMS_FOR_VERDICT} items: no verdict"),
        "perplexity": "token-weighted: exp(sum of NLL over the reference's tokens / their count), as in training",
    }
    return {
        "title": f"base vs fine-tuned: {cfg.adapter} on {dataset} ({cfg.split or 'all'})",
        "adapter": cfg.adapter, "base_model": llama.base_model, "dataset": dataset, "split": cfg.split or "all",
        "generation": comparison.generation(cfg), "seed": cfg.seed, "header": header, "verdict_policy": policy,
        "metrics": comparison.METRICS, "primary": comparison.PRIMARY, "items": items, "aggregates": aggregates,
    }


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


def compare(llama: Llama, samples: list[dict[str, str]], cfg: EvalConfig) -> tuple[list[str], list[str]]:
    """(base answers, fine-tuned answers) for the samples, from the same loaded weights."""
    prompts = [create_question(s) for s in samples]
    stops = section_markers() if cfg.stop_strings else []
    answers = [llama.generate(prompts, cfg.batch_size, use_adapter, progress=True, stop_strings=stops, **comparison.generation(cfg))
               for use_adapter in (False, True)]
    base, tuned = ([g["answer"] for g in side] for side in answers)
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
