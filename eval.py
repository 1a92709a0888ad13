"""Compare the fine-tuned adapter's answers with the vanilla base model's, side by side.

    python eval.py                                   # predefined questions, adapter llama_adapter/
    python eval.py --adapter outputs/demo            # another adapter
    python eval.py --preset smoke                    # the adapter `python main.py --preset smoke` wrote
    python eval.py --question "Who wrote Hamlet?"    # your own question (and --context "...")

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

from config import ConfigError, EvalConfig, die, parse_config
from dataset import DataError, create_question
from model import Llama, ModelError

# A few dolly-style questions, one per kind of task, one with context.
PREDEFINED: list[dict[str, str]] = [
    {"category": "open_qa", "instruction": "What is the difference between a virus and a bacterium?", "context": ""},
    {"category": "closed_qa", "instruction": "When did the Wright brothers make their first powered flight, and where?",
     "context": "Orville and Wilbur Wright were American aviation pioneers. On December 17, 1903, near Kitty Hawk, "
                "North Carolina, they made the first controlled, sustained flight of a powered, heavier-than-air "
                "aircraft. Orville flew 120 feet in 12 seconds on the first of four flights that day."},
    {"category": "brainstorming", "instruction": "Give me five ideas for a rainy Sunday afternoon at home.", "context": ""},
    {"category": "classification", "instruction": "Classify each as a fruit or a vegetable: apple, carrot, banana, broccoli, mango.", "context": ""},
    {"category": "creative_writing", "instruction": "Write a short poem about the sea at night.", "context": ""},
    {"category": "general_qa", "instruction": "Why do leaves change colour in autumn?", "context": ""},
]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        run(argv)
    except (ConfigError, DataError, ModelError) as err:
        if "--debug" in argv:
            raise
        die(str(err))
    return 0


def run(argv: list[str]) -> None:
    cfg, _ = parse_config(EvalConfig, argv, __doc__)
    if not os.path.isdir(cfg.adapter):
        raise ConfigError(f"no adapter directory {cfg.adapter}: train one with `python main.py` (or --preset demo/smoke), or pass --adapter DIR")
    set_seed(cfg.seed)
    llama = Llama.load_pretrained_model(cfg.adapter, base_model=cfg.base_model, quantization=cfg.quantization)
    samples = [{"category": "your question", "instruction": cfg.question, "context": cfg.context}] if cfg.question else PREDEFINED
    base, tuned = compare(llama, samples, cfg)
    print_side_by_side(samples, base, tuned)


def generation(cfg: EvalConfig) -> dict[str, Any]:
    return {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p}


def compare(llama: Llama, samples: list[dict[str, str]], cfg: EvalConfig) -> tuple[list[str], list[str]]:
    """(base answers, fine-tuned answers) for the samples, from the same loaded weights."""
    prompts = [create_question(s) for s in samples]
    base = llama.ask_many(prompts, cfg.batch_size, use_adapter=False, progress=True, **generation(cfg))
    tuned = llama.ask_many(prompts, cfg.batch_size, use_adapter=True, progress=True, **generation(cfg))
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
