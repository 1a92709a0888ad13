"""fsdp_state.py in one process: the tiny Llama with LoRA wrapped by FSDP as Trainer wraps it (PEFT's auto-wrap policy,
use_orig_params false) over a one-process gloo group on the CPU. Two CPU processes through main.py: tests/test_distributed.py."""

from __future__ import annotations

import os

import pytest
import torch

from config import TrainConfig, parse_config


@pytest.fixture
def fsdp_lora(tmp_path):
    """(the FSDP-wrapped LoRA model, PEFT's own state dict of its adapter taken before wrapping)."""
    import torch.distributed as dist
    from peft import get_peft_model_state_dict
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from transformers import AutoModelForCausalLM

    from loading import add_lora
    from tiny_llama import ensure_tiny_llama

    cfg, _ = parse_config(TrainConfig, ["--preset", "smoke", "--quantization", "none"], "")
    torch.manual_seed(0)
    model = add_lora(AutoModelForCausalLM.from_pretrained(ensure_tiny_llama(), dtype=torch.float32), cfg)
    with torch.no_grad():  # lora_B starts at zero: give every weight its own values, so that a mix-up shows
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    expected = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=False, device_id=torch.device("cpu")), expected
    finally:
        dist.destroy_process_group()


def test_the_gathered_adapter_is_pefts_with_every_lora_weight_whole(fsdp_lora, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from fsdp_state import gather_lora, write_adapter
    from tiny_llama import ensure_tiny_llama

    model, expected = fsdp_lora
    weights = gather_lora(model)
    assert len(expected) == 28  # 2 layers x 7 targets x (lora_A, lora_B)
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)  # full shapes, the values of the unwrapped model
    write_adapter(model, weights, str(tmp_path))
    saved = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert all(torch.equal(saved[k], expected[k]) for k in expected)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ensure_tiny_llama()), str(tmp_path))
    params = dict(loaded.named_parameters())
    assert all(torch.equal(params[k.replace(".weight", ".default.weight")], expected[k]) for k in expected)


def test_load_lora_puts_the_saved_weights_back_into_the_shards(fsdp_lora, tmp_path):
    from fsdp_state import gather_lora, load_lora, write_adapter

    model, expected = fsdp_lora
    write_adapter(model, gather_lora(model), str(tmp_path))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # the LoRA layers' flat parameters (the base is frozen)
                p.zero_()
    assert not any(v.any() for v in gather_lora(model).values())
    load_lora(model, str(tmp_path))
    weights = gather_lora(model)
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


def test_peft_still_finds_no_lora_weight_in_an_fsdp_model(fsdp_lora):
    """Why fsdp_state.py gathers the LoRA weights itself. If this fails, PEFT handles FSDP's nested module names: drop the workaround."""
    from peft import get_peft_model_state_dict
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model, _ = fsdp_lora
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=True)):
        full = model.state_dict()
    assert sum(".lora_A." in k for k in full) == 14  # the weights are in the gathered state dict ...
    assert get_peft_model_state_dict(model.module, state_dict=full) == {}  # ... and PEFT picks none of them


def test_create_optimizer_state_makes_adamws_state_and_leaves_the_weights():
    from fsdp_state import create_optimizer_state

    layer = torch.nn.Linear(4, 3)
    before = [p.detach().clone() for p in layer.parameters()]
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    create_optimizer_state(optimizer)
    assert all(torch.equal(p, b) for p, b in zip(layer.parameters(), before, strict=True))
    assert all(p.grad is None for p in layer.parameters()) and optimizer.param_groups[0]["lr"] == 1e-2
    assert all(set(optimizer.state[p]) == {"step", "exp_avg", "exp_avg_sq"} for p in layer.parameters())
    assert all(not optimizer.state[p]["exp_avg"].any() for p in layer.parameters())
