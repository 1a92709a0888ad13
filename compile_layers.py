"""Regional torch.compile: each decoder layer compiled on its own, the 4-bit + LoRA layers inside (--compile).

    stats = compile_decoder_layers(model)          # before Trainer(...) is built (training.build_trainer)
    trainer.add_callback(CompileWatch(stats))       # fails the run if a layer runs eager, recompiles or breaks its graph

Why regional: all decoder layers share one code object, so one compiled graph serves all 32 (compile time of one
layer, not of the model); gradient checkpointing stays outside the compiled region (transformers' checkpoint wraps the
compiled layer, torchtune's order). bitsandbytes 0.50's 4-bit matmul is a registered custom op and peft's LoRA forward
is plain tensor code, so the layer traces without graph breaks (fullgraph=True makes any break an error at step 1).

Nothing falls back to eager silently: suppress_errors off, a recompile-limit hit raises, and CompileWatch checks the
compiled entries of the layer's code after step `check_at` (and reports them at the end). Inductor's caches (FX graph, autotuning)
persist in TORCHINDUCTOR_CACHE_DIR (default: ~/.cache/llama-dolly/inductor), so a second run compiles faster.
"""

from __future__ import annotations

import os
import time

import torch
from transformers import TrainerCallback

from runtime import Runtime, launched_processes

CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the torch.compile modes that replay CUDA graphs


class CompileError(RuntimeError):
    """The compiled layers did not stay compiled (eager fallback, recompiles, graph breaks)."""


def compile_enabled(choice: str, rt: Runtime, gradient_checkpointing: bool = False, fp8_base: bool = False) -> bool:
    """on; or auto where it was measured faster with equal losses (one H100, BENCHMARKS.md): CUDA, one process, no
    gradient checkpointing (with checkpointing, compiled layers recompile: the known pitfall; several processes and FSDP
    are not measured compiled). With --dense-base fp8 also with checkpointing: eager FP8 casts are several unfused
    kernels per product (an H200 under a 24 GiB cap: 8,404 tokens/s eager vs 16,677 compiled, 2 compiled variants)."""
    if choice != "auto":
        return choice == "on"
    return rt.cuda and launched_processes() == 1 and (fp8_base or not gradient_checkpointing)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The ModuleList of decoder layers inside a (PEFT-wrapped) causal LM: the largest one whose items are *DecoderLayer."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) and type(m[0]).__name__.endswith("DecoderLayer")]
    if not lists:
        raise CompileError("--compile: no ModuleList of *DecoderLayer modules in this model")
    return max(lists, key=len)


def compile_decoder_layers(model: torch.nn.Module, mode: str = "default", dynamic: bool | None = None, recompile_limit: int = 16) -> dict:
    """Compile every decoder layer in place (`layer.compile()`, as torchtune's compile_model). Returns what CompileWatch checks.

    dynamic=None: the first row length compiles static, the second recompiles once with a symbolic length; rows padded to
    one budget (--pad-to-budget) compile once. The layer's input must require grad in every layer (layer 0's comes from the
    frozen embeddings), else layer 0 and layers 1.. are two compiled variants: enable_input_require_grads costs nothing.
    """
    import torch._dynamo

    use_inductor_cache()
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, recompile_limit)
    never_fall_back()
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    if mode == "max-autotune":  # everything Inductor can tune: its kernels' launch configs too (gpt-fast's recipe)
        import torch._inductor.config

        torch._inductor.config.coordinate_descent_tuning = True
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(mode=None if mode == "default" else mode, dynamic=dynamic, fullgraph=True)
    return {"layers": len(layers), "code": type(layers[0]).forward.__code__, "mode": mode}


def never_fall_back() -> None:
    """Dynamo errors instead of running eager silently: no suppressed compile errors, a recompile-limit hit raises
    (training's layers here, generation's decode steps in generation.py)."""
    import torch._dynamo

    torch._dynamo.config.suppress_errors = False
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        torch._dynamo.config.fail_on_recompile_limit_hit = True


def use_inductor_cache() -> None:
    """Inductor's caches (FX graphs, autotuning) in ~/.cache/llama-dolly/inductor unless TORCHINDUCTOR_CACHE_DIR says
    otherwise: a second run compiles faster (training's layers here, generation's decode steps in generation.py)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "llama-dolly", "inductor"))


def compiled_entries(code) -> int:
    """How many compiled variants Dynamo holds for a code object (one per guard set); 0 = it runs eager."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(code))


def recompile_reasons(code, limit: int = 300) -> list[str]:
    """Why the layer recompiled: at each recompile, the first failed guard of every compiled variant it tried (what
    TORCH_LOGS=recompiles prints), e.g. "0/0: tensor 'hidden_states' size mismatch at index 1. expected 812, actual 977"."""
    from torch._dynamo.utils import guard_failures

    return [" ".join(str(r).split())[:limit] for r in guard_failures.get(code, [])]


def compile_report(stats: dict) -> dict:
    """Compiled variants of the layer and the guards that made each recompile, graph breaks by reason, unique graphs and
    Dynamo + Inductor compile seconds; with CUDA graphs (CUDA_GRAPH_MODES), the CUDA graphs recorded so far and the skips
    (cudagraph_report)."""
    from torch._dynamo.utils import compile_times, counters

    names, values = compile_times(repr="csv", aggregate=True)
    times = dict(zip(names, map(float, values), strict=False))
    report = {"layers": stats["layers"], "mode": stats["mode"], "compiled_variants": compiled_entries(stats["code"]),
              "recompile_reasons": recompile_reasons(stats["code"]),
              "graph_breaks": dict(counters["graph_break"]), "unique_graphs": counters["stats"]["unique_graphs"],
              "dynamo_compile_s": round(times.get("_compile.compile_inner", 0.0), 1),  # tracing + forward compile, all variants
              "inductor_compile_s": round(times.get("compile_fx_inner", 0.0), 1)}  # forward and (lazily compiled) backward graphs
    return report | (cudagraph_report() if stats["mode"] in CUDA_GRAPH_MODES else {})


def cudagraph_report() -> dict:
    """CUDA graphs recorded by cudagraph trees on the current device (a layer's forward and backward, once each per layer
    when they replay; a count growing with the steps = re-recording) and the calls that skipped CUDA graphs (TORCH_LOGS=perf_hints
    says why)."""
    from torch._dynamo.utils import counters

    report = {"cudagraph_skips": counters["inductor"]["cudagraph_skips"]}
    if torch.cuda.is_available():
        from torch._inductor import cudagraph_trees

        manager = cudagraph_trees.get_container(torch.cuda.current_device()).tree_manager
        if manager is not None and manager.roots is not None:
            nodes = [n for roots in manager.roots.values() for n in roots]
            count = 0
            while nodes:
                node = nodes.pop()
                count += 1
                nodes.extend(c for children in node.children.values() for c in children)
            report["cudagraphs_recorded"] = count
    return report


def check_compiled(stats: dict, max_variants: int = 8) -> dict:
    """compile_report, raising CompileError on an eager layer, too many recompiled variants or any graph break."""
    report = compile_report(stats)
    problems = []
    if report["compiled_variants"] == 0:
        problems.append("the decoder layer has no compiled variant: it runs eager")
    if report["compiled_variants"] > max_variants:
        problems.append(f"{report['compiled_variants']} compiled variants of the decoder layer (TORCH_LOGS=recompiles says why)")
    if report["graph_breaks"]:
        problems.append(f"graph breaks: {report['graph_breaks']}")
    if problems:
        raise CompileError("--compile: " + "; ".join(problems) + f" ({report}); run with --compile off meanwhile")
    return report


def zero_grads_outside_graphs(model: torch.nn.Module) -> None:
    """Give every trainable parameter without a gradient a zeroed .grad, allocated outside the CUDA graphs' memory pool.

    With CUDA graphs (--compile-mode reduce-overhead or max-autotune) and several micro-batches per optimizer step: autograd would make the
    first micro-batch's gradient, an output of the backward's graph living in the graphs' pool, the .grad itself, and the
    next micro-batch's replay writes into that pool (pytorch#96693: a quarter of the gradient left with 4 micro-batches).
    With a .grad already there, each backward's gradient is added into it and dies; a new CUDA-graph generation before
    every micro-batch (CompileWatch) then replays one recorded path instead of recording each micro-batch's own."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


class CompileWatch(TrainerCallback):
    """Checks the compiled layers after optimizer step `check_at` (past warm-up and one automatic-dynamic recompile),
    raising CompileError, and reports them at the end without raising (the training is done by then); records the first
    step's wall time (mostly compilation) in `report`. Evaluation (eval mode, no grad) compiles variants of its own:
    a smoke run with --eval-steps 2 on the CPU held 4 (2 training, 2 evaluation); more than 8 is an error."""

    def __init__(self, stats: dict, check_at: int = 4, max_variants: int = 8):
        self.stats, self.check_at, self.max_variants = stats, check_at, max_variants
        self.report: dict = {}
        self._t0: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.stats["mode"] in CUDA_GRAPH_MODES:
            torch.compiler.cudagraph_mark_step_begin()  # one CUDA-graph generation per micro-batch (and on_substep_end)
            if args.gradient_accumulation_steps > 1 and model is not None:
                zero_grads_outside_graphs(model)

    def on_substep_end(self, args, state, control, **kwargs):
        if self.stats["mode"] in CUDA_GRAPH_MODES:  # the next micro-batch replays the same graphs from the root
            torch.compiler.cudagraph_mark_step_begin()

    def on_step_end(self, args, state, control, **kwargs):
        if self._t0 is not None:
            self.report["first_step_s"] = round(time.perf_counter() - self._t0, 1)
            self._t0 = None
        if state.global_step == self.check_at:
            self.report |= check_compiled(self.stats, self.max_variants)
            if "cudagraphs_recorded" in self.report:  # compared with the end's count: equal = recorded once, replayed since
                self.report[f"cudagraphs_recorded_at_step_{self.check_at}"] = self.report["cudagraphs_recorded"]
            print(f"[compile] after step {state.global_step}: {self.report}", flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        try:  # the training is done and valid whatever this says: report, never lose the run's outputs over it
            self.report |= check_compiled(self.stats, self.max_variants)
        except CompileError as e:
            self.report |= compile_report(self.stats) | {"problem": str(e)}
            print(f"[compile] at the end of training: {e}", flush=True)
