"""Answer agreement on a real model: the fast path's greedy answers vs the plain per-prompt path's, one command (CPU).

    python bench/answer_agreement.py --out answer_agreement.json                  # SmolLM2-135M-Instruct (the demo's base), 64 prompts
    python bench/answer_agreement.py --adapter /tmp/demo13 --out agree.json      # the fine-tuned side: merged vs unmerged LoRA
    python bench/answer_agreement.py --engine static --out agree-static.json     # the static engines' path (grouped prefill)

fast: Llama.generate as eval.py runs it (evicting decoder, longest first, batch sized automatically; with --adapter the LoRA
update merged into the weights); --engine another of generation.ENGINES (on a CPU static runs the GPU engines' prompt in
groups and static cache, the decode steps eagerly). plain: one prompt at a time through model.generate (engine padded, batch 1), with an
unmerged adapter. Prompts: the first --prompts records of data/dolly_sample.jsonl (80; cycled with a shorter instruction
prefix beyond 80). Every answer that differs is printed side by side with the first differing token.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


def prompts_from_sample(n: int) -> list[str]:
    from dataset import create_question

    with open(os.path.join(ROOT, "data", "dolly_sample.jsonl"), encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    return [create_question(records[i % len(records)] | ({"context": ""} if i >= len(records) else {})) for i in range(n)]


def first_difference(a: list[int], b: list[int], tokenizer) -> dict:
    i = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    show = lambda ids: tokenizer.decode(ids[i : i + 1]) if i < len(ids) else "(ended)"  # noqa: E731
    return {"position": i, "fast_token": show(a), "plain_token": show(b), "common_prefix": tokenizer.decode(a[:i])}


def compare(fast: list[dict], plain: list[dict], tokenizer, prompts: list[str]) -> dict:
    same = [f["answer"] == p["answer"] for f, p in zip(fast, plain, strict=True)]
    diffs = []
    for i, (f, p) in enumerate(zip(fast, plain, strict=True)):
        if not same[i]:
            a, b = (tokenizer(x["raw"], add_special_tokens=False)["input_ids"] for x in (f, p))
            diffs.append({"prompt": i, "instruction": prompts[i].split("### Instruction:")[-1][:80].strip(),
                          "fast": f["answer"], "plain": p["answer"], "first_difference": first_difference(a, b, tokenizer)})
    return {"prompts": len(same), "identical": sum(same), "identical_share": sum(same) / max(1, len(same)), "differences": diffs}


def run(args: argparse.Namespace) -> dict:
    from dataset import section_markers
    from model import Llama

    prompts = prompts_from_sample(args.prompts)
    path = args.adapter or SMOLLM2
    fast = Llama.load_pretrained_model(path, quantization="none", engine=getattr(args, "engine", "auto"))
    plain = Llama.load_pretrained_model(path, quantization="none", merge=False, engine="padded")
    gen = {"max_new_tokens": args.max_new_tokens, "stop_strings": section_markers()}
    t0 = time.perf_counter()
    fast_answers = fast.generate(prompts, None, **gen)
    t1 = time.perf_counter()
    plain_answers = [plain.generate([p], 1, **gen)[0] for p in prompts]
    t2 = time.perf_counter()
    result = compare(fast_answers, plain_answers, fast.tokenizer, prompts)
    return result | {"model": path, "engine": getattr(args, "engine", "auto"), "max_new_tokens": args.max_new_tokens,
                     "fast_s": t1 - t0, "plain_s": t2 - t1,
                     "fast_tokens": sum(a["answer_tokens"] for a in fast_answers)}


def main() -> None:
    import torch

    from runtime import cpu_threads

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default=None, help="An adapter on SmolLM2 (the fine-tuned side); default: the bare base.")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--engine", default="auto", help="The fast side's engine (generation.ENGINES; auto = evict on a CPU).")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="answer_agreement.json")
    args = parser.parse_args()
    threads = cpu_threads(args.threads)
    result = run(args) | {"threads": threads, "load_average": os.getloadavg(), "torch": torch.__version__}
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"[agree] {result['identical']}/{result['prompts']} identical answers ({result['identical_share']:.1%}); "
          f"fast {result['fast_s']:.0f} s, plain {result['plain_s']:.0f} s", flush=True)
    for d in result["differences"]:
        fd = d["first_difference"]
        print(f"--- prompt {d['prompt']} ({d['instruction']}): first difference at token {fd['position']}: "
              f"fast {fd['fast_token']!r} vs plain {fd['plain_token']!r}\n  fast : {d['fast']!r}\n  plain: {d['plain']!r}")


if __name__ == "__main__":
    main()
