"""What an FSDP run (configs/accelerate/fsdp_qlora.yaml) saves and restores beyond transformers' Trainer: the LoRA
weights, gathered on rank 0 and written in PEFT's format (checkpoints and the final adapter) and read back into every
process's shards (--resume), and the optimizer's state on --resume.

    weights = gather_lora(model)             # every process (collectives); rank 0 gets {PEFT key: full tensor}, the rest None
    write_adapter(model, weights, folder)    # rank 0: adapter_config.json + adapter_model.safetensors, as PeftModel writes them
    load_lora(model, folder)                 # every process: the folder's LoRA weights into its shards
    create_optimizer_state(optimizer)        # before Trainer loads a sharded optimizer checkpoint into it

The LoRA weights: not PEFT's save_pretrained / set_peft_model_state_dict, nor accelerate's save_fsdp_model(adapter_only=True),
which Trainer calls for SHARDED_STATE_DICT checkpoints. peft 0.21 picks an adapter's entries by module names
(peft/tuners/tuners_utils.py, _get_tuner_state_dict_key_prefixes), and FSDP1 puts `_fsdp_wrapped_module.` inside the name
of every module of a wrapped decoder layer, of which PEFT strips only a leading one. It picks no LoRA weight at all: the
final adapter had none and each sharded checkpoint an empty model state. Loading misses the same way, silently
(peft/utils/save_and_load.py, set_peft_model_state_dict: strict=False, and FSDP's flat parameter names make it strip
`base_model.model.` from every key), so --resume went on from the initial LoRA weights. Here every LoRA layer is unsharded
on its own (FSDP.summon_full_params): PEFT's fsdp_auto_wrap_policy, which Trainer installs, makes each one an FSDP unit.
Only the LoRA weights travel, never the 4-bit base.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator

import torch

from config import ConfigError

ADAPTER = "default"  # loading.add_lora's only adapter
WEIGHTS_NAME = "adapter_model.safetensors"
FSDP_PREFIX = "_fsdp_wrapped_module."  # torch's FSDP1 wrapper puts it into module names; state-dict keys are without it


def lora_layers(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """(PEFT's key of its weight, e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight; the FSDP unit) per LoRA layer."""
    from peft.tuners.lora import LoraLayer
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        prefix = name.replace(FSDP_PREFIX, "")
        for part in ("lora_A", "lora_B"):
            unit = getattr(module, part)[ADAPTER]
            if not isinstance(unit, FSDP):  # inside its decoder layer's flat parameter: summoning it alone would not unshard it
                raise RuntimeError(f"{prefix}.{part} is not an FSDP unit of its own: FSDP needs PEFT's fsdp_auto_wrap_policy "
                                   "(transformers' Trainer sets it with fsdp_version 1)")
            yield f"{prefix}.{part}.weight", unit


def set_up(model: torch.nn.Module) -> torch.nn.Module:
    """The FSDP root `model`, its units set up. FSDP does that from the root at the first forward (_lazy_init); a unit
    summoned before (a resume comes before any step) would take itself for the root, and that forward would fail.
    Summoning the root's own parameters (recurse=False: embeddings, final norm, lm_head) sets them up as a forward would."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if getattr(model, "_is_root", None) is None:  # None until set up (were it ever missing: summoned each time, slower)
        with FSDP.summon_full_params(model, recurse=False, writeback=False, rank0_only=True):
            pass
    return model


def gather_lora(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Every process must call it (one all-gather per LoRA layer); rank 0 gets the full weights on its CPU, the others None."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    rank0 = torch.distributed.get_rank() == 0
    weights = {}
    for key, unit in lora_layers(set_up(model)):
        # offload_to_cpu stays off: FSDP cannot offload from a CPU device (the tests' FSDP runs); the copy below moves it
        with FSDP.summon_full_params(unit, writeback=False, rank0_only=True):
            if rank0:
                weights[key] = unit.weight.detach().to("cpu", copy=True)
    return weights if rank0 else None


def write_adapter(model: torch.nn.Module, weights: dict[str, torch.Tensor], folder: str) -> None:
    """adapter_config.json and adapter_model.safetensors in `folder`, in PeftModel.save_pretrained's format."""
    from safetensors.torch import save_file

    config = copy.copy(model.peft_config[ADAPTER])
    config.inference_mode = True  # as PeftModel.save_pretrained writes it
    os.makedirs(folder, exist_ok=True)
    config.save_pretrained(folder)
    save_file(weights, os.path.join(folder, WEIGHTS_NAME), metadata={"format": "pt"})


def load_lora(model: torch.nn.Module, folder: str) -> None:
    """Every process must call it: the LoRA weights of `folder` (written by write_adapter) into this process's shards."""
    from safetensors.torch import load_file
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    path = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise ConfigError(f"{folder} has no {WEIGHTS_NAME} (a checkpoint of an FSDP run from before the LoRA weights were "
                          "saved in it): it cannot be resumed; start again with --overwrite")
    weights, units = load_file(path), dict(lora_layers(set_up(model)))
    if weights.keys() != units.keys():
        missing, unexpected = sorted(units.keys() - weights.keys()), sorted(weights.keys() - units.keys())
        raise ConfigError(f"{path} does not fit this model: {len(missing)} LoRA weights missing "
                          f"({missing[:1]}), {len(unexpected)} unexpected ({unexpected[:1]})")
    for key, unit in units.items():
        with FSDP.summon_full_params(unit, writeback=True), torch.no_grad():  # writeback: each process keeps its shard
            if unit.weight.shape != weights[key].shape:
                raise ConfigError(f"{path}: {key} is {tuple(weights[key].shape)}, the model's {tuple(unit.weight.shape)}")
            unit.weight.copy_(weights[key])


def create_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give a fresh optimizer its per-parameter state (AdamW: step and zero moments), leaving the weights as they are.

    accelerate's load_fsdp_optimizer (SHARDED_STATE_DICT, accelerate/utils/fsdp_utils.py) reads the checkpoint into the
    optimizer's own state dict, as a template (dist_cp.load fills only the entries it has). A fresh optimizer has no state
    until its first step, so only the hyperparameters were read and AdamW went on from zero moments. One step with zero
    gradients at learning rate 0 creates the state, as torch's get_optimizer_state_dict does for the same reason
    (torch/distributed/checkpoint/state_dict.py, _init_optim_state); the load then overwrites all of it.
    """
    optimizer = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside accelerate's wrapper (its step also scales, counts)
    if optimizer.state:
        return
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for p in group["params"]:
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
    try:
        optimizer.step()
    finally:
        for group, lr in zip(optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
