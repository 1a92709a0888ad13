"""loading.py under FSDP (where a 4-bit base is quantized and left before FSDP shards it), its config checks, memory.py.

FSDP itself needs GPUs (accelerate's plugin); what the CPU can check is the loading half: with the launcher's FSDP
environment, the tiny 4-bit base is quantized into CPU RAM, stored as bf16 (shardable), with no hf_device_map.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import loading
from config import ConfigError, TrainConfig
from conftest import tiny_4bit_for_training, two_answers_batch
from runtime import Runtime, runtime

CUDA = Runtime("cuda:1", torch.bfloat16)


@pytest.fixture
def fsdp_env(monkeypatch):
    """What `accelerate launch --config_file configs/accelerate/fsdp_qlora.yaml` sets, without a process group."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    monkeypatch.setattr("accelerate.PartialState", lambda cpu: None)  # the real one would start a process group


def test_fsdp_placement_keeps_the_gpu_for_the_shard_only():
    assert loading.fsdp_placement(CUDA, quantized=True) == ({"": "cuda:1"}, True)  # quantize on the GPU, then to CPU RAM
    assert loading.fsdp_placement(CUDA, quantized=True, where="cpu") == ({"": "cpu"}, False)
    assert loading.fsdp_placement(CUDA, quantized=True, where="gpu") == ({"": "cuda:1"}, False)  # the A/B baseline
    assert loading.fsdp_placement(CUDA, quantized=False) == (None, False)  # bf16 base: transformers loads to CPU
    with pytest.raises(ConfigError, match="via-gpu, cpu or gpu"):
        loading.fsdp_placement(CUDA, quantized=True, where="GPU")


def test_under_fsdp_the_4bit_base_is_quantized_into_cpu_ram_as_bf16_without_a_device_map(fsdp_env, monkeypatch):
    from bitsandbytes.nn import Params4bit
    from transformers import AutoModelForCausalLM

    from tiny_llama import ensure_tiny_llama

    monkeypatch.setenv(loading.FSDP_LOAD, "cpu")
    calls = []
    real = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: calls.append(k) or real(*a, **k))
    model = loading.load_base_model(ensure_tiny_llama(), "4bit", quant_storage="bfloat16")
    assert calls[0]["device_map"] == {"": "cpu"}
    weights = [m.weight for m in model.modules() if isinstance(getattr(m, "weight", None), Params4bit)]
    assert len(weights) == 14  # 2 layers x 7 linear layers
    for w in weights:
        assert w.device.type == "cpu" and w.dtype == torch.bfloat16 and w.bnb_quantized and w.quant_state.absmax.device.type == "cpu"
    # the rest in the compute dtype: bf16 on a GPU, so one dtype in every FSDP unit (fp32 here, on the CPU)
    assert {p.dtype for p in model.parameters() if not isinstance(p, Params4bit)} == {runtime().dtype}
    assert "hf_device_map" not in model.__dict__  # else accelerate refuses "a 4-bit model on another device"


def test_fsdp_refuses_settings_that_mix_dtypes_in_a_unit(fsdp_env):
    ok = TrainConfig(quant_storage="bfloat16")
    loading.check_fsdp_config(ok)
    loading.check_fsdp_config(dataclasses.replace(ok, quantization="none", fp32_upcast=True))  # bf16 base: nothing to mix
    for bad, words in (({"fp32_upcast": True}, "drop --fp32-upcast"), ({"quant_storage": "uint8"}, "--quant-storage bfloat16"),
                       ({"quantization": "8bit"}, "--quantization 4bit")):
        with pytest.raises(ConfigError, match=words):
            loading.check_fsdp_config(dataclasses.replace(ok, **bad))


def test_without_fsdp_the_checks_allow_everything(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    loading.check_fsdp_config(TrainConfig(fp32_upcast=True))


def test_memory_probe_writes_each_mark_and_the_steady_peak(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import memory

    gib = 2**30
    allocated = iter([1, 3, 2])  # after load, after wrap, step 1
    peaks = iter([5, 5, 5, 4, 4])  # the same marks, the load peak read before the reset, then the steady peak
    monkeypatch.setenv(memory.PROBE, str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(memory.MemoryProbe, "marks", {})
    monkeypatch.setattr(memory.MemoryProbe, "report", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: next(allocated) * gib)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda: 6 * gib)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: next(peaks) * gib)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    probe = memory.MemoryProbe()
    probe.mark("after load")
    model = torch.nn.Linear(2, 2)  # on the CPU: no parameter bytes on a GPU
    probe.on_train_begin(None, None, None, model=model)
    probe.on_step_end(None, SimpleNamespace(global_step=1), None)
    report = json.loads((tmp_path / "rank1.json").read_text())
    assert report["marks"]["after load"] == {"allocated_gib": 1, "reserved_gib": 6, "peak_gib": 5}
    assert list(report["marks"]) == ["after load", "after wrap", "step 1"]
    assert report["load_peak_gib"] == 5 and report["steady_peak_gib"] == 4 and report["parameters_on_gpu_gib"] == 0


def test_dense_base_trains_the_same_adapter_as_the_4bit_base(tiny_tokenizer):
    """--dense-base yes: every 4-bit layer becomes a frozen 16-bit linear holding its NF4 values before LoRA wraps it, and
    two SGD steps give the 4-bit base's losses and LoRA gradients (same seed, same LoRA init, same batch)."""
    import bitsandbytes as bnb
    from peft.tuners.lora import Linear as LoraLinear

    batch = two_answers_batch(tiny_tokenizer)
    losses, grads = {}, {}
    for dense in ("no", "yes"):
        model = tiny_4bit_for_training(dense)
        modules = list(model.modules())
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in modules) == (dense == "no")
        if dense == "yes":
            q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
            assert type(q_proj) is LoraLinear and type(q_proj.base_layer) is torch.nn.Linear and not q_proj.base_layer.weight.requires_grad
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=1.0)  # AdamW's first step is lr x sign(grad): it would amplify rounding
        losses[dense] = []
        for _ in range(2):
            loss = model(**batch).loss
            loss.backward()
            grads.setdefault(dense, [p.grad.clone() for p in params])
            optimizer.step()
            optimizer.zero_grad()
            losses[dense].append(loss.item())
    assert losses["yes"] == pytest.approx(losses["no"], rel=1e-5) and losses["no"][1] != losses["no"][0]
    for a, b in zip(grads["yes"], grads["no"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_dense_base_needs_a_4bit_base_and_one_process(fsdp_env):
    from hub import TINY_MODEL

    with pytest.raises(ConfigError, match="needs --quantization 4bit"):
        TrainConfig(base_model=TINY_MODEL, quantization="none", dense_base="yes")
    with pytest.raises(ConfigError, match="FSDP shards the 4-bit weights"):  # under FSDP: refused before the model is loaded
        loading.check_fsdp_config(TrainConfig(base_model=TINY_MODEL, dense_base="yes", quant_storage="bfloat16"))


def test_dense_base_frees_the_4bit_layers():
    """bitsandbytes' 4-bit layers sit in reference cycles: dequantize_for_training collects them, so the plan's peak holds
    (before it did, an H200 run peaked at 48.3 GiB with the copy, 11.0 over the 4-bit run: more than the copy's net +9.0)."""
    import weakref

    import generation
    from hub import TINY_MODEL, resolve_base_model

    model = loading.load_base_model(resolve_base_model(TINY_MODEL, None), "4bit")
    alive = [weakref.ref(q.weight) for _, _, q in generation.linear4bit_modules(model)]
    assert alive and all(ref() is not None for ref in alive)
    loading.dequantize_for_training(model)
    assert not generation.linear4bit_modules(model) and all(ref() is None for ref in alive)
