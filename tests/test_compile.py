"""--compile and --pad-to-budget: padded rows train like unpadded ones, compiled layers like eager ones, failures are loud."""

from __future__ import annotations

import json
import os

import datasets
import pytest
import torch

import fp8
from compile_layers import CompileError, CompileWatch, check_compiled, zero_grads_outside_graphs
from config import FP8ES
from conftest import run, step_losses
from dataset import IGNORE_INDEX, DocumentBounds, PaddedPackedCollator, collate_packed, pack_examples, tokenize_record

ROWS = [{"input_ids": [1, 5], "labels": [-100, 5], "position_ids": [0, 1]},
        {"input_ids": [1, 7, 8], "labels": [-100, 7, 8], "position_ids": [0, 1, 2]}]


def test_padded_row_has_the_budget_shape_and_counts_real_tokens():
    batch = PaddedPackedCollator(budget=8, pad_id=0)(ROWS)
    assert batch["input_ids"].tolist() == [[1, 5, 1, 7, 8, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 5, -100, 7, 8, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0, 1, 2]]  # the padding is a record of its own
    assert batch["num_tokens"] == 5
    with pytest.raises(ValueError, match="longer than its budget"):
        PaddedPackedCollator(budget=4, pad_id=0)(ROWS)


def test_padding_to_the_budget_leaves_the_loss_unchanged(tiny_tokenizer):
    from config import TrainConfig
    from hub import TINY_MODEL
    from loading import load_for_training

    model, tokenizer, _ = load_for_training(TrainConfig(base_model=TINY_MODEL, gradient_checkpointing=False))
    model.eval()
    records = [{"instruction": f"Question {i}?", "context": "", "response": "An answer " * (i + 1)} for i in range(3)]
    row = pack_examples(datasets.Dataset.from_list([tokenize_record(r, tokenizer, 256)[0] for r in records]), 10_000, 0)[0]
    plain = collate_packed([row])
    padded = PaddedPackedCollator(plain["input_ids"].shape[1] + 37, tokenizer.pad_token_id)([row])
    padded.pop("num_tokens")
    with torch.no_grad():
        losses = [model(**batch).loss.item() for batch in (plain, padded)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_a_layer_running_eager_fails_loudly():
    def never_compiled(x):
        return x

    with pytest.raises(CompileError, match="runs eager"):
        check_compiled({"layers": 2, "code": never_compiled.__code__, "mode": "default"})


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_cuda_graphs_get_a_generation_per_micro_batch_and_zeroed_gradients(monkeypatch, mode):
    """--compile-mode reduce-overhead (or max-autotune, its graphs too) with 2 micro-batches per step: a new CUDA-graph
    generation before each micro-batch (on_step_begin, on_substep_end), and zeroed .grad buffers for the trainable
    parameters only, made before the first micro-batch (the backward's gradients are then added into them, not left in
    the graphs' pool)."""
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    model[0].requires_grad_(False)
    kept = torch.ones(2)
    model[1].bias.grad = kept
    watch, args = CompileWatch({"mode": mode}), type("Args", (), {"gradient_accumulation_steps": 2})()
    watch.on_step_begin(args, None, None, model=model)
    assert model[1].weight.grad.tolist() == [[0.0, 0.0], [0.0, 0.0]] and model[1].bias.grad is kept
    assert model[0].weight.grad is None and model[0].bias.grad is None
    watch.on_substep_end(args, None, None)
    assert len(marks) == 2
    CompileWatch({"mode": "default"}).on_substep_end(args, None, None)
    assert len(marks) == 2
    model.zero_grad()
    watch.on_step_begin(type("Args", (), {"gradient_accumulation_steps": 1})(), None, None, model=model)
    assert model[1].weight.grad is None and len(marks) == 3  # one micro-batch per step: autograd's own .grad is fine


def test_max_autotune_compiles_every_decoder_layer_and_tunes_inductors_kernels_too(monkeypatch):
    """--compile-mode max-autotune: each decoder layer compiled in that mode (lazily: nothing runs here), and Inductor's
    coordinate-descent tuning of its own kernels' launch configs switched on with it, as gpt-fast does."""
    import torch._inductor.config
    from transformers import LlamaConfig, LlamaForCausalLM

    from compile_layers import compile_decoder_layers

    monkeypatch.setattr(torch._inductor.config, "coordinate_descent_tuning", False)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    model = LlamaForCausalLM(config)
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append(kw["mode"]))
    compile_decoder_layers(model, "default")
    assert compiled == [None, None] and not torch._inductor.config.coordinate_descent_tuning
    stats = compile_decoder_layers(model, "max-autotune")
    assert compiled[2:] == ["max-autotune", "max-autotune"] and stats["mode"] == "max-autotune"
    assert torch._inductor.config.coordinate_descent_tuning


def test_zeroed_gradients_accumulate_like_autograds_own():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    xs = torch.randn(2, 5, 4)
    for x in xs:
        model(x).square().sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    zero_grads_outside_graphs(model)
    for x in xs:
        model(x).square().sum().backward()
    assert all(torch.equal(p.grad, e) for p, e in zip(model.parameters(), expected, strict=True))


@pytest.mark.slow  # ~2 minutes cold on 2 CPU cores (Inductor compiles the layer's forward and backward), ~1 with its cache
def test_compiled_training_matches_eager(tmp_path):
    flags = ["--preset", "smoke", "--max-steps", "3", "--val-fraction", "0", "--save-steps", "3", "--pad-to-budget"]
    outs = {}
    for mode in ("off", "on"):
        outs[mode] = str(tmp_path / mode)
        proc = run("main.py", *flags, "--compile", mode, "--output-dir", outs[mode])
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert step_losses(outs["on"]) == pytest.approx(step_losses(outs["off"]), abs=2e-4)
    with open(os.path.join(outs["on"], "metrics.json")) as fh:
        metrics = json.load(fh)
    assert metrics["compile"]["compiled_variants"] == 1 and metrics["compile"]["graph_breaks"] == {}  # one shape: one graph
    with open(os.path.join(outs["off"], "metrics.json")) as fh:
        assert metrics["num_input_tokens_seen"] == json.load(fh)["num_input_tokens_seen"]  # real tokens, not the padding


def train_in_both_compile_modes(tmp_path, flags: list[str]) -> tuple[dict[str, str], dict[str, dict]]:
    """python main.py with `flags` under --compile-mode default and reduce-overhead: ({mode: output dir}, {mode: metrics.json})."""
    outs, metrics = {}, {}
    for mode in ("default", "reduce-overhead"):
        outs[mode] = str(tmp_path / mode)
        proc = run("main.py", *flags, "--compile-mode", mode, "--output-dir", outs[mode])
        assert proc.returncode == 0, proc.stderr[-3000:]
        with open(os.path.join(outs[mode], "metrics.json")) as fh:
            metrics[mode] = json.load(fh)
    return outs, metrics


@pytest.mark.gpu
@pytest.mark.parametrize(("accumulation", "dense_base"), [(1, "no"), (2, "no"), (1, "fp8_backward"), (2, "fp8_backward_4bit")])
def test_cuda_graph_training_records_once_and_matches_default_compile(tmp_path, accumulation, dense_base):
    """--compile-mode reduce-overhead on fixed shapes (--pad-to-budget), one or two micro-batches per optimizer step: one
    forward and one backward graph per layer, recorded by step 4 and replayed since (not re-recorded: the 15x slowdown of
    session 3, the 13-19 s steps with accumulation of session 7), no call skipped them, and the losses equal --compile-mode
    default's (same Inductor kernels, replayed; with accumulation, the gradients of both micro-batches summed). Also over
    python main.py's base on Hopper, the 16-bit copy with FP8 input gradients (_scaled_mm inside the graphs), and over
    the 24 GB plan on Hopper: FP8 input gradients from the 4-bit base (nf4_kernel's cast inside the graphs), 2 micro-batches."""
    if dense_base in FP8ES and fp8.check_fp8_device("cuda:0"):
        pytest.skip(fp8.check_fp8_device("cuda:0"))
    flags = ["--preset", "smoke", "--max-steps", "8", "--val-fraction", "0", "--save-steps", "8", "--pad-to-budget",
             "--compile", "on", "--memory-plan", "off", "--no-gradient-checkpointing", "--pack-tokens", "512",
             "--gradient-accumulation-steps", str(accumulation), "--dense-base", dense_base]
    outs, metrics = train_in_both_compile_modes(tmp_path, flags)
    graphs = metrics["reduce-overhead"]["compile"]
    assert graphs["cudagraph_skips"] == 0, graphs
    assert graphs["cudagraphs_recorded"] == graphs["cudagraphs_recorded_at_step_4"] == 2 * graphs["layers"], graphs
    assert step_losses(outs["reduce-overhead"]) == pytest.approx(step_losses(outs["default"]), abs=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dense_base", ["no", "fp8_backward_4bit"])
def test_cuda_graph_training_with_evaluation_matches_default_compile(tmp_path, dense_base):
    """README's advice for small micro-batches (--pad-to-budget --compile-mode reduce-overhead) with held-out evaluation
    every 4 steps: the evaluation passes (eval mode, no grad) run between the training graphs' replays, the training
    graphs are not recorded again, and the training losses and the held-out loss equal --compile-mode default's. Also
    with fp8_backward_4bit, the 24 GB plan's base on Hopper."""
    if dense_base in FP8ES and fp8.check_fp8_device("cuda:0"):
        pytest.skip(fp8.check_fp8_device("cuda:0"))
    flags = ["--preset", "smoke", "--max-steps", "8", "--val-fraction", "0.2", "--eval-steps", "4", "--save-steps", "8",
             "--pad-to-budget", "--compile", "on", "--memory-plan", "off", "--no-gradient-checkpointing", "--pack-tokens", "512",
             "--dense-base", dense_base]
    outs, metrics = train_in_both_compile_modes(tmp_path, flags)
    graphs = metrics["reduce-overhead"]["compile"]
    # the training graphs recorded once (not 2 more per layer at every step after 4); evaluation's own, at most once per pass
    assert graphs["cudagraph_skips"] == 0, graphs
    assert graphs["cudagraphs_recorded"] <= graphs["cudagraphs_recorded_at_step_4"] + 2 * graphs["layers"], graphs
    assert step_losses(outs["reduce-overhead"]) == pytest.approx(step_losses(outs["default"]), abs=1e-3)
    assert metrics["reduce-overhead"]["eval_loss"] == pytest.approx(metrics["default"]["eval_loss"], abs=1e-3)


def test_compile_report_says_why_a_layer_recompiled():
    """The report names the guard behind each recompile (what TORCH_LOGS=recompiles prints), so a bench JSON says which
    input made a compiled variant: here a row length, then a Python int."""
    class Layer(torch.nn.Module):
        def forward(self, x, n: int):
            return x * n

    torch._dynamo.reset()
    layer = Layer()
    layer.compile(backend="eager")
    for length, n in ((3, 2), (5, 2), (7, 3)):
        layer(torch.ones(1, length, 4), n)
    report = check_compiled({"layers": 1, "code": Layer.forward.__code__, "mode": "default"})
    assert report["compiled_variants"] == 3
    assert report["recompile_reasons"][0] == "0/0: tensor 'x' size mismatch at index 1. expected 3, actual 5"
    assert report["recompile_reasons"][1].startswith("0/1: n == 2")


def test_varying_record_bounds_compile_two_variants_not_three():
    """Packed rows with varlen bounds through a compiled layer: the row length becomes symbolic at the second row. The
    longest record is the fixed --max-length bound (training.collator) and the record count is marked dynamic
    (training.mark_bounds_dynamic), so a row whose record count or longest record first changes later compiles
    nothing more. Without both, the third row here makes a third variant."""
    from training import mark_bounds_dynamic

    class Layer(torch.nn.Module):
        def forward(self, x, cu_seq_lens_q, max_length_q: int):
            return x * max_length_q + cu_seq_lens_q[-1]

    def row(records):  # same record count in the first two rows, then more records and a longer one
        return {"input_ids": [1] * sum(records), "labels": [1] * sum(records), "position_ids": [p for n in records for p in range(n)]}

    rows = [row([3, 4]), row([3, 5]), row([2, 2, 6])]
    variants = {}
    for fixed in (False, True):
        torch._dynamo.reset()
        layer = Layer()
        layer.compile(backend="eager")
        collate = DocumentBounds(collate_packed, longest=8 if fixed else None)
        for r in rows:
            batch = collate([r])
            batch = mark_bounds_dynamic(batch) if fixed else batch
            layer(batch["input_ids"][..., None].float(), batch["cu_seq_lens_q"], batch["max_length_q"])
        variants[fixed] = check_compiled({"layers": 1, "code": Layer.forward.__code__, "mode": "default"})["compiled_variants"]
    assert variants == {False: 3, True: 2}
