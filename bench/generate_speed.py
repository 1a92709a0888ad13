"""Generation speed: the seed's paths vs merge-on-switch with each decoding engine, side by side, one command.

    python bench/make_random_llama.py --out /tmp/l7 --tokenizer .tok/llama2-tokenizer
    python bench/generate_speed.py --model /tmp/l7 --out $OUT/generate_speed.json      # or: bench/gpu_generate.sh $OUT

The model is loaded once through the project's path (4-bit NF4) with a LoRA adapter of r=16 on all linear layers whose
B matrices are random and non-zero. Prompts are dolly-like (bench/train_speed.py's length model, real Llama 2 tokenizer).
Forced length: every variant produces exactly --new-tokens tokens per prompt (EOS and stop strings cannot end a row), greedy.

Variants, in this order on the same weights (JSON written after each):
- one_at_a_time: `generate` on one prompt at a time, 4-bit + unmerged LoRA (the first --single-prompts prompts);
- naive16: batches of 16 in input order, 4-bit + unmerged LoRA (the first --naive-prompts);
- unmerged64: the previous eval.py path: 16-bit copy + unmerged LoRA, batch 64, model.generate (the first --old-prompts);
- ENGINE_base / ENGINE_tuned for ENGINE in --engines (static, continuous, evict, continuous_nographs): merge on switch
  (fine-tuned = LoRA merged into the 16-bit copy; base = the copy rebuilt from the 4-bit weights), each batch sized from
  free memory for its longest prompt (the rows of each batch in "batches"), all --prompts; continuous first runs
  ENGINE_tuned_cold, which carries its compilation and graph capture, so ENGINE_base and ENGINE_tuned are warm (header
  "tuned_vs_base"); static captures its decode step per batch (part of every timed run: no cold run);
- ENGINE static_unplanned: static with each batch sized for its own longest prompt, as before generation.plan_batches;
  compiled (static with the decoder layers compiled for the decode steps) runs compiled_tuned_cold first, which carries
  the compilation; flash / compiled_flash: static / compiled with each row attending only to its own cache positions
  (generation.flash_decode_attention), compiled_flash with a cold run first too; triton / compiled_triton: the same
  with decode_kernel's one-query Triton kernel in place of FlashAttention's (a cold run first: Triton's JIT), its launch
  set by --decode-config (bench/decode_attention.py sweeps them);
- BEST_tuned_24gb / BEST_base_24gb ("cap" in --engines): the fastest warm engine so far as a 24 GB card runs it: a child
  process capped with torch.cuda.set_per_process_memory_fraction (--cap-gib) before it loads anything, the model
  loaded and its 16-bit copy made or not as eval.py decides (Llama's dequantize="auto"; the engine is named, not
  eval.py's auto, which answers with flash on sm80+, a 4-bit base included), and the same with the copy
  forced (BEST_tuned_24gb_copy) when auto made none; out-of-memory retries counted ("oom_retries"); --cap-engines adds
  other engines to the first child (e.g. evict, static, flash: session 7 compared them on a 4-bit base), --cap-prompts times
  the children on fewer prompts (drawn the same way);
- then (--profile-prompts, CUDA) one warm fine-tuned run of --profile-engine (default static) on that many prompts x 64
  new tokens under torch.profiler: the kernels by GPU time in OUT-ENGINE-profile.txt.
--single-prompts 0 / --naive-prompts 0 / --old-prompts 0 skip those variants.
Reported per variant: new tokens/s, its share of the card's memory-bandwidth limit (weights + KV cache read once per
decode step at the variant's mean rows per batch), the projected time for dolly's validation split (--project-records, both models,
every answer --new-tokens long: an upper bound), peak GPU memory; and last-position logits of the fast paths vs the 4-bit
paths. --budget-s skips the remaining variants once the run has taken that long.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def build_llama(model_path: str, seed: int, gguf_file: str | None = None):
    import torch
    from peft import LoraConfig, get_peft_model

    from config import LLAMA_LINEAR_LAYERS
    from hub import resolve_base_model
    from loading import load_base_model, load_tokenizer
    from model import Llama

    torch.manual_seed(seed)
    model_path = resolve_base_model(model_path, gguf_file)
    base = load_base_model(model_path, "4bit")
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=LLAMA_LINEAR_LAYERS, task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    return Llama(model, load_tokenizer(model_path), dequantize="no")


# engines that compile (Triton's JIT included): a cold fine-tuned run first, not in the warm figures
COLD_FIRST = ("continuous", "compiled", "compiled_flash", "triton", "compiled_triton")
BANDWIDTH_TBS = {"H200": 4.8, "H100 PCIe": 2.0, "H100": 3.35, "A100": 2.0, "L4": 0.3, "4090": 1.0}  # spec sheets, TB/s


def bandwidth_limit(model, batch: int, mean_context: float) -> dict:
    """Upper bound on decode tokens/s: every step reads the 16-bit weights and each row's KV cache once from HBM."""
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    tbs = next((v for k, v in BANDWIDTH_TBS.items() if k in name), None)
    c = model.config
    weights = sum(p.numel() for p in model.parameters()) * 2
    kv = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 2 * mean_context
    step_bytes = weights + batch * kv
    return {"card": name, "bandwidth_tbs": tbs, "step_gb": step_bytes / 1e9,
            "limit_tokens_per_s": batch * tbs * 1e12 / step_bytes if tbs else None}


def bench_prompts(n: int, seed: int) -> list[str]:
    """The bench's dolly-like prompts (train_speed.make_records' lengths, the project's template), shuffled."""
    from train_speed import make_records

    from dataset import create_question

    prompts = [create_question(r) for r in make_records(n, seed)]
    random.Random(seed).shuffle(prompts)
    return prompts


def gpu_sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(llama, prompts: list[str], batch_size: int | None, sorted_path: bool, new_tokens: int, use_adapter: bool = True,
          engine: str = "padded") -> dict:
    """Generate for `prompts`: sorted_path = `Llama.generate` (longest first), else plain input-order batches."""
    import torch

    import generation

    gen = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    name = engine  # continuous = CUDA graphs on; continuous_nographs = the same engine with transformers' own choice
    if engine.startswith("continuous"):
        gen["cuda_graphs"] = None if engine == "continuous_nographs" else True
        engine = "continuous"
    unplanned = engine == "static_unplanned"  # batches sized one at a time, as before generation.plan_batches
    engine = "static" if unplanned else engine
    llama.dequantize_if_allowed()  # a one-time conversion is not part of the timed generation (reported separately)
    llama.adapter(use_adapter)  # so is the switch (timed apart: switch_s)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    gpu_sync()
    t0 = time.perf_counter()
    stats: dict = {}
    if sorted_path:
        planned = generation.planned_batches
        if unplanned:  # session 3's sizing: each batch as many rows as fit with its own longest prompt (longest first)
            generation.planned_batches = lambda model, lengths, new, cap: [max(1, min(  # cap: cache positions
                generation.auto_batch_size(model, lengths[0], new, len(lengths)), cap // (lengths[0] + new) if cap else 256))]
        try:
            out = llama.generate(prompts, batch_size, use_adapter, engine=engine, stats=stats, **gen)
        finally:
            generation.planned_batches = planned
    else:
        with llama.adapter(use_adapter):
            out = [g for s in range(0, len(prompts), batch_size)
                   for g in generation.generate_batch(llama.model, llama.tokenizer, prompts[s : s + batch_size], engine=engine, **gen)]
    gpu_sync()
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    tokens = sum(g["answer_tokens"] for g in out)
    result = {"prompts": len(prompts), "batch_size": batch_size, "batches": stats.get("batches"), "engine": name, "wall_s": wall,
              "new_tokens": tokens, "graphs_captured": stats.get("captures"), "oom_retries": stats.get("oom_retries", 0),
              **{k: v for k, v in stats.items() if k.startswith("capture_")},
              "tokens_per_s": tokens / wall, "peak_gpu_mem_gib": peak, "answers": [g["answer"] for g in out]}
    rows = batch_size or stats.get("batches") or "auto"
    print(f"[bench] {len(prompts)} prompts, {name}, batch {rows}: {tokens / wall:.1f} new tok/s, wall {wall:.1f} s, "
          f"peak {peak or 0:.1f} GiB", flush=True)
    return result


def last_logits(llama, prompts: list[str], use_adapter: bool = True):
    import torch

    llama.tokenizer.padding_side = "left"
    batch = llama.tokenizer(prompts, return_tensors="pt", padding=True).to(llama.model.device)
    with torch.inference_mode(), llama.adapter(use_adapter):
        return llama.model(**batch).logits[:, -1].float().cpu()


def logit_agreement(a, b) -> dict:
    return {"max_abs_diff": float((a - b).abs().max()), "max_abs_logit": float(b.abs().max()),
            "argmax_equal": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Local model directory (bench/make_random_llama.py for Llama-2-7B).")
    parser.add_argument("--out", default="generate_speed.json", help="JSON results (rewritten after every variant).")
    parser.add_argument("--prompts", type=int, default=256, help="Dolly-like prompts for the merge-on-switch variants.")
    parser.add_argument("--new-tokens", type=int, default=256, help="Tokens generated per prompt (forced: no early EOS).")
    parser.add_argument("--engines",
                        default="compiled_flash,flash,compiled,static,cap,static_unplanned,continuous,evict,continuous_nographs",
                        help="Decoding engines to measure, in this order (generation.pick_engine; static_unplanned: static with "
                             "each batch sized for its own longest prompt (before plan_batches); continuous_nographs: "
                             "continuous batching with transformers' own CUDA-graph choice, off for SDPA).")
    parser.add_argument("--single-prompts", type=int, default=1, help="Prompts timed one at a time (the first N).")
    parser.add_argument("--naive-prompts", type=int, default=16, help="Prompts timed in naive batches of 16 (the first N).")
    parser.add_argument("--old-prompts", type=int, default=64, help="Prompts timed on the previous eval.py path (unmerged, batch 64).")
    parser.add_argument("--logit-prompts", type=int, default=16, help="Prompts whose last-position logits are compared across paths.")
    parser.add_argument("--project-records", type=int, default=750, help="Records of dolly's validation split, for the projection.")
    parser.add_argument("--cap-gib", type=float, default=24.0, help="Memory cap of the capped variant (a 24 GB card).")
    parser.add_argument("--budget-s", type=float, default=420.0, help="Skip the remaining variants after this many seconds.")
    parser.add_argument("--profile-prompts", type=int, default=128, help="Prompts of the profiled run (0: none).")
    parser.add_argument("--profile-engine", default="static", help="Engine of the profiled run (generation.pick_engine's names).")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--cap-engines", default="", help="Engines the capped child times besides the fastest (comma-separated).")
    parser.add_argument("--cap-prompts", type=int, default=None,
                        help="Prompts of the capped children (N drawn as --prompts are; default --prompts).")
    parser.add_argument("--decode-config", default=None,
                        help="BLOCK_N,WARPS,STAGES of the triton engines' kernel (decode_kernel.CONFIG when not given).")
    parser.add_argument("--capped-child", help=argparse.SUPPRESS)  # ENGINE[,ENGINE]:DEQUANTIZE, cap_variant's child process
    return parser.parse_args()


def derived(r: dict, llama, mean_context: float, args, reference: dict) -> dict:
    """Share of the bandwidth limit, projected dolly-validation time (both models), speed-ups, answers vs the plain path."""
    batch = r["batch_size"] or (r["prompts"] / len(r["batches"]) if r.get("batches") else min(r["prompts"], 256))  # mean rows
    limit = bandwidth_limit(llama.model, batch, mean_context)
    out = {"bandwidth": limit, "share_of_bandwidth_limit": r["tokens_per_s"] / limit["limit_tokens_per_s"]
           if limit["limit_tokens_per_s"] else None,
           "projected_dolly_validation_both_models_s": 2 * args.project_records * args.new_tokens / r["tokens_per_s"]}
    for name, ref in reference.items():
        out[f"speedup_vs_{name}"] = r["tokens_per_s"] / ref["tokens_per_s"]
    return out


def main() -> None:
    import torch
    from train_speed import versions

    from generation import dequantized_bytes
    from model import Llama

    args = parse_args()
    if args.decode_config:
        import decode_kernel

        decode_kernel.CONFIG = tuple(int(x) for x in args.decode_config.split(","))
    if args.capped_child:
        run_capped(args)
        return
    start = time.perf_counter()
    prompts = bench_prompts(args.prompts, args.seed)
    llama = build_llama(args.model, args.seed)
    lengths = sorted(len(ids) for ids in llama.tokenizer(prompts)["input_ids"])
    mean_context = sum(lengths) / len(lengths) + args.new_tokens / 2
    probe = prompts[: args.logit_prompts]
    logits = {"4bit_tuned": last_logits(llama, probe), "4bit_base": last_logits(llama, probe, use_adapter=False)}
    results: dict[str, dict] = {}
    header = {"args": vars(args), "versions": versions(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "prompt_tokens": {"p50": lengths[len(lengths) // 2], "p90": lengths[int(0.9 * len(lengths))], "max": lengths[-1]}}

    def record(name: str, result: dict, final: bool = False) -> None:  # a run cut short keeps what it measured
        results[name] = result
        ref = {k: results[k] for k in ("one_at_a_time", "naive16", "unmerged64") if k in results and k != name}
        result.update(derived(result, llama, mean_context, args, ref))
        variants = {k: {kk: vv for kk, vv in v.items() if kk != "answers"} for k, v in results.items()}
        with open(args.out, "w") as fh:
            json.dump(header | {"partial": not final, "variants": variants}, fh, indent=2)

    if args.single_prompts:
        record("one_at_a_time", timed(llama, prompts[: args.single_prompts], 1, False, args.new_tokens))
    if args.naive_prompts:
        record("naive16", timed(llama, prompts[: args.naive_prompts], 16, False, args.new_tokens))
    extra_gib = dequantized_bytes(llama.model) / 2**30
    llama = Llama(llama.model, llama.tokenizer, dequantize="yes", merge=False)  # the previous eval.py path
    t0 = time.perf_counter()
    llama.dequantize_if_allowed()
    gpu_sync()
    header |= {"dequantize_s": time.perf_counter() - t0, "dequantized_extra_gib": extra_gib}
    if args.old_prompts:
        record("unmerged64", timed(llama, prompts[: args.old_prompts], 64, True, args.new_tokens))
    old = llama
    llama = Llama(old.model, old.tokenizer, dequantize="yes")  # merge on switch on the same 16-bit copy
    llama._originals = old._originals  # the kept 4-bit layers: the base is rebuilt from them exactly
    llama.dequantize_if_allowed()
    header["logits"] = switch_logits(llama, probe, logits)
    engines = args.engines.split(",")
    for engine in engines:
        if time.perf_counter() - start >= args.budget_s:
            break
        if engine == "cap":  # the fastest warm engine so far, as a 24 GB card would run it
            cap_variant(prompts, args, results, record)
            continue
        # compiled engines: a cold fine-tuned run first (compilation, CUDA graph capture), then base and fine-tuned warm
        sides = (("tuned_cold", True),) if engine in COLD_FIRST else ()
        for side, use_adapter in sides + (("base", False), ("tuned", True)):
            if time.perf_counter() - start < args.budget_s:
                try:
                    record(f"{engine}_{side}", timed(llama, prompts, None, True, args.new_tokens, use_adapter, engine))
                except Exception as e:  # one engine failing must not cost the others' figures
                    header.setdefault("failed", {})[f"{engine}_{side}"] = f"{type(e).__name__}: {e}"[:2000]
                    print(f"[bench] {engine}_{side} FAILED: {type(e).__name__}: {str(e)[:500]}", flush=True)
                    break
        if f"{engine}_tuned" in results and f"{engine}_base" in results:
            ratio = results[f"{engine}_tuned"]["tokens_per_s"] / results[f"{engine}_base"]["tokens_per_s"]
            header.setdefault("tuned_vs_base", {})[engine] = ratio
    last = "naive16" if "naive16" in results else next(iter(results))  # re-recorded once: the JSON marked final
    record(last, results[last], final=True)
    if args.profile_prompts and torch.cuda.is_available():
        profile_engine(llama, prompts[: args.profile_prompts], args.out.removesuffix(".json") + f"-{args.profile_engine}-profile.txt",
                       args.profile_engine)
    for name, r in results.items():
        print(f"[bench] {name:<22} {r['tokens_per_s']:>9.1f} new tok/s  share of bandwidth limit {r['share_of_bandwidth_limit'] or 0:.0%}  "
              f"dolly validation both models {r['projected_dolly_validation_both_models_s'] / 60:.1f} min  "
              f"peak {r['peak_gpu_mem_gib'] or 0:.1f} GiB", flush=True)
    print(f"[bench] logits: {json.dumps(header['logits'])}", flush=True)


def cap_variant(prompts: list[str], args, results: dict, record) -> None:
    """BEST_{tuned,base}_24gb: the fastest warm engine so far in a child process capped at --cap-gib from its start
    (run_capped); BEST_tuned_24gb_copy: the same with the 16-bit copy forced, when dequantize="auto" made none."""
    import subprocess

    import torch

    warm = {k[: -len("_tuned")]: r["tokens_per_s"] for k, r in results.items() if k.endswith("_tuned")}
    if not torch.cuda.is_available() or not warm:
        return
    best = max(warm, key=warm.get)
    extra = [e for e in args.cap_engines.split(",") if e and e != best]
    for dequantize in ("auto", "yes"):
        out = args.out.removesuffix(".json") + f"-cap-{dequantize}.json"
        engines = ",".join([best, *extra] if dequantize == "auto" else [best])
        cmd = [sys.executable, __file__, "--model", args.model, "--out", out, "--prompts", str(args.cap_prompts or args.prompts),
               "--new-tokens", str(args.new_tokens), "--cap-gib", str(args.cap_gib), "--seed", str(args.seed),
               "--capped-child", f"{engines}:{dequantize}"] + (["--decode-config", args.decode_config] if args.decode_config else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        print("\n".join(ln for ln in proc.stdout.splitlines() if ln.startswith(("[bench]", "[model]"))), flush=True)
        if proc.returncode != 0 or not os.path.exists(out):
            print(f"[bench] capped child ({dequantize}) failed:\n{proc.stderr[-2500:]}", flush=True)
            return
        with open(out) as fh:
            child = json.load(fh)
        suffix = "_copy" if dequantize == "yes" else ""
        for name, r in child.items():
            record(f"{name}_24gb{suffix}", r)
        if child[f"{best}_tuned"]["dequantized"]:
            return  # auto made the copy: forcing it would measure the same


def run_capped(args) -> None:
    """The child of cap_variant: capped before anything touches the GPU, then load, (maybe) dequantize, generate."""
    import torch

    from model import Llama

    engines, dequantize = args.capped_child.split(":")
    torch.cuda.set_per_process_memory_fraction(args.cap_gib * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    prompts = bench_prompts(args.prompts, args.seed)
    built = build_llama(args.model, args.seed)
    llama = Llama(built.model, built.tokenizer, dequantize=dequantize)
    results = {}
    for engine in engines.split(","):
        cold = (("tuned_cold", True),) if engine in COLD_FIRST else ()  # compilation out of the warm figures
        for side, use_adapter in cold + (("tuned", True), ("base", False)):
            r = timed(llama, prompts, None, True, args.new_tokens, use_adapter, engine)
            r.pop("answers")
            results[f"{engine}_{side}"] = r | {"cap_gib": args.cap_gib, "dequantize": dequantize, "dequantized": llama._dequantized}
            with open(args.out, "w") as fh:  # after each run: a child cut by the time limit keeps what it measured
                json.dump(results, fh, indent=2)


def profile_engine(llama, prompts: list[str], path: str, engine: str = "static") -> None:
    """One warm fine-tuned run of `engine` (64 forced new tokens) under torch.profiler: the kernels by GPU time, to `path`."""
    from torch.profiler import ProfilerActivity, profile

    gen = {"max_new_tokens": 64, "min_new_tokens": 64, "engine": engine}
    llama.generate(prompts, None, True, **gen)
    gpu_sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=False) as prof:
        llama.generate(prompts, None, True, **gen)
        gpu_sync()
    with open(path, "w") as fh:
        fh.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30) + "\n")
    print(f"[bench] {engine} profile ({len(prompts)} prompts x 64 tokens) -> {path}", flush=True)


def switch_logits(llama, probe: list[str], logits: dict) -> dict:
    """Last-position logits after switching: merged vs unmerged 4-bit; base (rebuilt exactly) vs the 4-bit base; exactness."""
    import time as _time

    t0 = _time.perf_counter()
    tuned = last_logits(llama, probe, use_adapter=True)
    gpu_sync()
    switch_s = _time.perf_counter() - t0
    base = last_logits(llama, probe, use_adapter=False)
    again = last_logits(llama, probe, use_adapter=True), last_logits(llama, probe, use_adapter=False)
    return {"merged_vs_4bit_unmerged": logit_agreement(tuned, logits["4bit_tuned"]),
            "base_vs_4bit_base": logit_agreement(base, logits["4bit_base"]),
            "switch_back_and_forth_exact": bool((again[0] == tuned).all() and (again[1] == base).all()), "first_switch_s": switch_s}


if __name__ == "__main__":
    main()
