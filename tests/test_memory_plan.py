"""memory_plan.py: what --memory-plan auto picks on cards of different sizes, from fake memory figures (no GPU)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from config import TrainConfig, parse_config
from memory_plan import (
    CALIBRATION,
    GIB,
    LLAMA2_7B,
    ModelShape,
    PlanError,
    apply_memory_plan,
    dense_copy_gib,
    plan_memory,
    predict_peak_gib,
    static_bytes,
)

H100 = {"total_bytes": int(79.2 * GIB), "free_bytes": int(78.7 * GIB)}  # an 80 GB card after the CUDA context


def test_model_reproduces_calibration_without_underpredicting():
    for tokens, gc, gib in CALIBRATION:
        assert gib <= predict_peak_gib(LLAMA2_7B, tokens, gc) <= gib * 1.03, (tokens, gc, gib)


def test_7b_parameters_and_static_part():
    assert LLAMA2_7B.params == pytest.approx(6.74e9, rel=0.001)
    assert LLAMA2_7B.lora_params(16) == 39_976_960  # what peft reports for r=16 on the 7 linear layers
    assert 4.0 < static_bytes(LLAMA2_7B) / GIB < 4.4


def test_80gb_card_picks_the_fast_setting():
    plan = plan_memory(**H100)
    assert (plan.gradient_checkpointing, plan.pack_tokens, plan.gradient_accumulation_steps) == (False, 8192, 1)
    assert plan.predicted_peak_gib < 40 and plan.fits


def test_24gb_cap_fits_under_22_gib_with_the_same_recipe():
    plan = plan_memory(**H100, cap_bytes=24 * GIB)  # bench/capped_main.py GPU_MEM_CAP_GIB=24
    assert (plan.gradient_checkpointing, plan.pack_tokens, plan.gradient_accumulation_steps) == (False, 4096, 2)
    assert plan.predicted_peak_gib <= 22


def test_real_24gb_card():  # RTX 4090: 23.99 GiB total, ~23.5 free
    plan = plan_memory(total_bytes=int(23.99 * GIB), free_bytes=int(23.5 * GIB))
    assert (plan.gradient_checkpointing, plan.pack_tokens, plan.gradient_accumulation_steps) == (False, 4096, 2)
    assert plan.predicted_peak_gib <= 22


def test_40gb_card_splits_the_step_in_two():  # 8192 tokens without GC (36.7 GiB) is over the 35.6 GiB budget
    plan = plan_memory(total_bytes=int(39.4 * GIB), free_bytes=int(39.0 * GIB))
    assert (plan.gradient_checkpointing, plan.pack_tokens, plan.gradient_accumulation_steps) == (False, 4096, 2)
    assert plan.predicted_peak_gib <= plan.budget_gib


def test_12gb_card_turns_checkpointing_on():
    plan = plan_memory(total_bytes=int(11.6 * GIB), free_bytes=int(11.2 * GIB))
    assert plan.gradient_checkpointing and plan.pack_tokens * plan.gradient_accumulation_steps == 8192
    assert plan.predicted_peak_gib <= plan.budget_gib


def test_too_small_card_says_what_to_do():
    with pytest.raises(PlanError, match="--memory-plan off"):
        plan_memory(total_bytes=6 * GIB, free_bytes=int(5.5 * GIB))


def test_busy_card_plans_with_free_memory_not_total():
    plan = plan_memory(total_bytes=int(79.2 * GIB), free_bytes=20 * GIB)
    assert plan.usable_gib == 20 and plan.predicted_peak_gib <= 20 / 1.08 - 0.5
    assert plan.gradient_checkpointing  # 4096 tokens without it (20.4 GiB) is over; 2048 without it is slower than 8192 with it


def test_larger_model_scales():
    llama13 = ModelShape(layers=40, hidden=5120, intermediate=13824, vocab=32000)
    assert predict_peak_gib(llama13, 4096, False) > predict_peak_gib(LLAMA2_7B, 4096, False) * 1.4
    plan = plan_memory(**H100, shape=llama13)
    assert plan.predicted_peak_gib <= plan.budget_gib


def test_explicit_flags_win_and_the_rest_is_planned():
    plan = plan_memory(**H100, fixed={"pack_tokens": 2048})  # --pack-tokens 2048: the recipe kept by accumulation
    assert (plan.gradient_checkpointing, plan.pack_tokens, plan.gradient_accumulation_steps) == (False, 2048, 4)
    plan = plan_memory(**H100, fixed={"gradient_checkpointing": True})
    assert plan.gradient_checkpointing and plan.pack_tokens * plan.gradient_accumulation_steps == 8192
    plan = plan_memory(**H100, fixed={"gradient_accumulation_steps": 4})
    assert (plan.pack_tokens, plan.gradient_accumulation_steps) == (2048, 4)


def test_explicit_flags_win_even_over_the_budget_with_a_warning():
    fixed = {"gradient_checkpointing": False, "pack_tokens": 8192, "gradient_accumulation_steps": 1}
    plan = plan_memory(total_bytes=24 * GIB, free_bytes=int(23.5 * GIB), fixed=fixed)
    assert (plan.gradient_checkpointing, plan.pack_tokens, plan.gradient_accumulation_steps, plan.fits) == (False, 8192, 1, False)
    assert "WARNING: over the budget" in plan.line()


def test_one_printed_line():
    line = plan_memory(**H100, card="NVIDIA H100 80GB HBM3").line()
    assert line == ("[memory-plan] NVIDIA H100 80GB HBM3, 78.7 GiB usable -> peak budget 72.4 GiB: gradient checkpointing off, "
                    "8192 tokens per micro-batch x 1 accumulation = 8192 tokens per optimizer step, 16-bit copy of the base off; "
                    "expected peak 36.7 GiB")


def test_parse_config_names_the_explicit_fields():
    _, args = parse_config(TrainConfig, ["--pack-tokens", "2048"], "t")
    assert args.explicit == {"pack_tokens"}
    _, args = parse_config(TrainConfig, ["--preset", "smoke", "--no-gradient-checkpointing"], "t")
    assert {"pack_tokens", "gradient_accumulation_steps", "gradient_checkpointing"} <= args.explicit


def test_plan_is_off_on_the_cpu():
    cfg = TrainConfig()
    planned = apply_memory_plan(cfg, set())  # nothing else changes without CUDA: the smoke/demo runs stay as they were
    assert planned == dataclasses.replace(cfg, dense_base="no")
    assert apply_memory_plan(TrainConfig(dense_base="yes"), set()).dense_base == "yes"  # given: kept (loading checks it)


def test_dense_base_is_added_only_where_the_plan_still_fits_with_it():
    """--dense-base auto: the 16-bit copy of the base (+~9 GiB for 7B) joins the plan chosen without it when it still fits;
    it never costs a smaller micro-batch or checkpointing. Given as yes, every option counts it."""
    plans = {name: plan_memory(**card, dense_base="auto") for name, card in (
        ("80", H100), ("24cap", dict(**H100, cap_bytes=24 * GIB)), ("40", {"total_bytes": int(39.4 * GIB), "free_bytes": int(39.0 * GIB)}),
        ("12", {"total_bytes": int(11.6 * GIB), "free_bytes": int(11.2 * GIB)}))}
    split = {name: (p.gradient_checkpointing, p.pack_tokens, p.gradient_accumulation_steps, p.dense_base) for name, p in plans.items()}
    assert split == {"80": (False, 8192, 1, "yes"), "24cap": (False, 4096, 2, "no"), "40": (False, 4096, 2, "yes"),
                     "12": (True, 8192, 1, "no")}
    copy = dense_copy_gib(LLAMA2_7B)
    assert 12.0 < copy < 12.1  # an upper bound: the 4-bit weights (3.1 GiB) are freed once it is made
    assert plans["80"].predicted_peak_gib == pytest.approx(plan_memory(**H100).predicted_peak_gib + copy, abs=0.01)
    assert plans["80"].predicted_peak_gib >= 48.3  # measured on an H200 (session 6), the 4-bit weights not yet collected
    assert all(p.predicted_peak_gib <= p.budget_gib for p in plans.values())
    assert "16-bit copy of the base on" in plans["80"].line()
    forced = plan_memory(**H100, cap_bytes=24 * GIB, dense_base="yes")  # given: checkpointing is what fits with it
    assert (forced.gradient_checkpointing, forced.dense_base) == (True, "yes") and forced.predicted_peak_gib <= forced.budget_gib
    assert plan_memory(**H100, quantization="none", dense_base="auto").dense_base == "no"  # nothing to copy
    both = plan_memory(**H100, dense_base="fp8_backward")  # W in 16 bits + W^T in e4m3: 3 bytes per base weight
    assert both.predicted_peak_gib == pytest.approx(plan_memory(**H100).predicted_peak_gib + 1.5 * copy, abs=0.01)
    assert (both.gradient_checkpointing, both.pack_tokens, both.dense_base) == (False, 8192, "fp8_backward")
    assert "FP8 transpose on (FP8 input gradients)" in both.line()
    with pytest.raises(PlanError, match="drop --dense-base yes"):
        plan_memory(total_bytes=int(11.6 * GIB), free_bytes=int(11.2 * GIB), dense_base="yes")


def test_dense_base_auto_takes_fp8_backward_on_an_fp8_card_where_its_transpose_fits_too():
    """With fp8_ok (Hopper or newer, compiled layers) auto prefers fp8_backward (1.5x the copy: +6 GiB for 7B), else the
    16-bit copy, else (no checkpointing) no copy, FP8 input gradients from the 4-bit base and CUDA graphs
    (fp8_backward_4bit, nothing held), else none; the micro-batch and checkpointing stay those chosen without a copy."""
    cards = {"80": H100, "24cap": dict(**H100, cap_bytes=24 * GIB), "40": {"total_bytes": int(39.4 * GIB), "free_bytes": int(39.0 * GIB)},
             "12": {"total_bytes": int(11.6 * GIB), "free_bytes": int(11.2 * GIB)}}
    plans = {name: plan_memory(**card, dense_base="auto", fp8_ok=True) for name, card in cards.items()}
    split = {name: (p.gradient_checkpointing, p.pack_tokens, p.gradient_accumulation_steps, p.dense_base) for name, p in plans.items()}
    assert split == {"80": (False, 8192, 1, "fp8_backward"), "24cap": (False, 4096, 2, "fp8_backward_4bit"),
                     "40": (False, 4096, 2, "yes"), "12": (True, 8192, 1, "no")}  # 12: checkpointing, no CUDA graphs
    assert [name for name, p in plans.items() if p.cuda_graphs] == ["24cap"]
    assert plans["24cap"].predicted_peak_gib == plan_memory(**cards["24cap"]).predicted_peak_gib  # nothing held for it
    words = "no copy of the base, FP8 input gradients from the 4-bit base, CUDA graphs over rows padded to the budget"
    assert words in plans["24cap"].line()
    refused = plan_memory(**cards["24cap"], dense_base="auto", fp8_ok=True, cuda_graphs_ok=False)  # e.g. --compile-mode default given
    assert (refused.dense_base, refused.cuda_graphs) == ("no", False)
    assert not plan_memory(**cards["24cap"], dense_base="auto").cuda_graphs  # no FP8 card: the 4-bit base as before
    copy = dense_copy_gib(LLAMA2_7B)
    assert plans["80"].predicted_peak_gib == pytest.approx(plan_memory(**H100).predicted_peak_gib + 1.5 * copy, abs=0.01)
    assert plans["80"].predicted_peak_gib >= 54.1  # measured on an H200 (session 11)
    odd = dataclasses.replace(LLAMA2_7B, intermediate=11000)  # not divisible by 16: no FP8 matmul
    assert plan_memory(**H100, shape=odd, dense_base="auto", fp8_ok=True).dense_base == "yes"
    assert all(p.predicted_peak_gib <= p.budget_gib for p in plans.values())


def test_fp8_backward_is_offered_to_auto_only_on_an_fp8_card_with_compiled_layers(monkeypatch):
    from memory_plan import fp8_backward_ok
    from runtime import Runtime

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    gpu = Runtime("cuda:0", torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8_backward_ok(TrainConfig(), gpu)
    assert not fp8_backward_ok(TrainConfig(compile="off"), gpu)  # eager casts: not measured
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not fp8_backward_ok(TrainConfig(), gpu)  # several processes: compile auto is off
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert not fp8_backward_ok(TrainConfig(), gpu)  # no row-wise scaled FP8 matmul before Hopper


def test_compile_auto_is_on_only_where_it_was_measured(monkeypatch):
    """--compile auto: one CUDA process without gradient checkpointing (the H100 measurement); off on a CPU, with
    checkpointing (compiled layers recompile there) and with several processes; on/off always win."""
    from compile_layers import compile_enabled
    from runtime import Runtime

    gpu, cpu = Runtime("cuda:0", torch.bfloat16), Runtime("cpu", torch.float32)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert compile_enabled("auto", gpu) and not compile_enabled("auto", cpu)
    assert not compile_enabled("auto", gpu, gradient_checkpointing=True)
    assert compile_enabled("auto", gpu, gradient_checkpointing=True, fp8_base=True)  # eager FP8 casts: 2x slower
    assert not compile_enabled("auto", cpu, gradient_checkpointing=True, fp8_base=True)
    assert compile_enabled("on", cpu, gradient_checkpointing=True) and not compile_enabled("off", gpu)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not compile_enabled("auto", gpu) and compile_enabled("on", gpu)


@pytest.mark.gpu
def test_python_main_py_plans_and_trains_compiled_on_the_gpu(tmp_path):
    """python main.py with no speed flags (the smoke preset's model and data) on a real card: one [memory-plan] line, on a
    Hopper card with the 16-bit copy + FP8 input gradients, and compiled layers with two variants at most (the static
    first row, then the symbolic row length: the record bounds add none), no graph breaks, a finite loss."""
    import json
    import math
    import os

    import fp8
    from conftest import run, step_losses

    out = str(tmp_path / "run")
    proc = run("main.py", "--preset", "smoke", "--max-steps", "6", "--val-fraction", "0", "--save-steps", "6", "--output-dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[memory-plan]")]
    assert len(lines) == 1, proc.stdout[-3000:]
    if fp8.check_fp8_device("cuda:0") is None:
        assert "FP8 input gradients" in lines[0], lines[0]
    with open(os.path.join(out, "metrics.json")) as fh:
        compiled = json.load(fh)["compile"]
    assert compiled["graph_breaks"] == {} and 1 <= compiled["compiled_variants"] <= 2, compiled
    assert all(math.isfinite(x) for x in step_losses(out))


def test_a_24gb_fp8_card_gets_cuda_graphs_over_fp8_backward_4bit_unless_the_mode_or_padding_is_given(monkeypatch):
    """apply_memory_plan on a (faked) Hopper card capped at 24 GiB: --dense-base fp8_backward_4bit with
    --pad-to-budget --compile-mode reduce-overhead, the plan's fastest measured there; a compile mode or padding given
    otherwise keeps the 4-bit base as it was, and an 80 GB card keeps fp8_backward without graphs."""
    import memory_plan
    import runtime
    from hub import TINY_MODEL

    monkeypatch.setattr(runtime, "runtime", lambda: runtime.Runtime("cuda:0", torch.bfloat16))
    monkeypatch.setattr(memory_plan, "fp8_backward_ok", lambda cfg, rt: True)
    card = {}
    monkeypatch.setattr(memory_plan, "plan_from_cuda", lambda shape, device=0, **kw: plan_memory(**card, **kw))
    card.update(H100, cap_bytes=24 * GIB)
    cfg = TrainConfig(base_model=TINY_MODEL)
    planned = apply_memory_plan(cfg, set())
    assert (planned.dense_base, planned.compile_mode, planned.pad_to_budget, planned.gradient_checkpointing,
            planned.pack_tokens, planned.gradient_accumulation_steps) == ("fp8_backward_4bit", "reduce-overhead", True, False, 4096, 2)
    tuned = apply_memory_plan(dataclasses.replace(cfg, compile_mode="max-autotune"), {"compile_mode"})  # graphs too: kept
    assert (tuned.dense_base, tuned.compile_mode, tuned.pad_to_budget) == ("fp8_backward_4bit", "max-autotune", True)
    kept = apply_memory_plan(dataclasses.replace(cfg, compile_mode="default"), {"compile_mode"})
    assert (kept.dense_base, kept.compile_mode, kept.pad_to_budget) == ("no", "default", False)
    assert apply_memory_plan(cfg, {"pad_to_budget"}).dense_base == "no"  # --no-pad-to-budget given
    card.clear()
    card.update(H100)
    big = apply_memory_plan(cfg, set())
    assert (big.dense_base, big.compile_mode, big.pad_to_budget) == ("fp8_backward", "default", False)
