"""Loading a base model and its tokenizer, wrapping it with a fresh LoRA adapter, or loading a trained one.

    model, tokenizer, base_path = load_for_training(cfg)          # main.py: 4-bit base + new LoRA adapter
    model, tokenizer, train_cfg = load_adapter("llama_adapter")   # inference: base + trained adapter

An adapter is checked against its base before PEFT sees it (`check_adapter_fits`): another hidden size or
layer count is one line saying which base it was trained on, never a size-mismatch traceback.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from config import CONFIG_NAME, TrainConfig, load_train_config
from hub import ModelError, explain_load_error, resolve_base_model
from runtime import attention_kernel, fsdp_active, quantization_config, runtime


def set_pad_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Give the tokenizer a pad token that is not EOS (Llama 2: <unk>, id 0). Returns its id.

    A collator that masks pad positions would otherwise mask the EOS labels too, and the model would never learn to stop.
    """
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if eos is None:
        raise ModelError("the tokenizer has no EOS token: the model could not learn to stop")
    if pad is not None and pad != eos:
        return pad
    if tokenizer.unk_token_id is None or tokenizer.unk_token_id == eos:
        raise ModelError("the tokenizer has no pad or unk token distinct from EOS; add a pad token to it first")
    tokenizer.pad_token = tokenizer.unk_token
    return tokenizer.pad_token_id


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise explain_load_error(err, name) from err
    set_pad_token(tokenizer)
    return tokenizer


def load_base_model(
    name: str, quantization: str = "4bit", trust_remote_code: bool = False, attention: str = "sdpa", quant_storage: str = "uint8"
) -> torch.nn.Module:
    """The base model (a path or hub id from hub.resolve_base_model), quantized as asked, on this process's device."""
    rt = runtime()
    kwargs: dict[str, Any] = {"dtype": rt.dtype, "trust_remote_code": trust_remote_code, "attn_implementation": attention}
    qconfig = quantization_config(quantization, rt, quant_storage)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    kwargs["device_map"] = {"": rt.device}
    if fsdp_active():
        # FSDP places the shards itself: no device_map. The process group must exist and this process's GPU be
        # selected before loading: transformers then loads FSDP-aware (cpu_ram_efficient_loading), and bitsandbytes
        # quantizes on this process's GPU (its default is the current device), not on GPU 0 in every process.
        from accelerate import PartialState

        PartialState(cpu=not rt.cuda)
        kwargs["device_map"] = None
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        raise explain_load_error(err, name) from err
    model.config.use_cache = True
    return model


def add_lora(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """Wrap the base with a fresh LoRA adapter; the base stays frozen (and 4-bit when quantized)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.quantization != "none" and cfg.fp32_upcast:
        # Casts norms, embeddings and lm_head to fp32, enables input grads (needed with checkpointing), turns checkpointing on.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    # No KV cache in training: it is useless there, conflicts with checkpointing, and (transformers 5)
    # its presence turns off the per-record attention mask that packed rows rely on.
    model.config.use_cache = False
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def load_for_training(cfg: TrainConfig) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, str]:
    """(LoRA-wrapped model, tokenizer, the base's resolved path or hub id) for main.py."""
    name = resolve_base_model(cfg.base_model, cfg.gguf_file)
    tokenizer = load_tokenizer(name, cfg.trust_remote_code)
    attention = attention_kernel(cfg.attention, cfg.packing, runtime())
    model = load_base_model(name, cfg.quantization, cfg.trust_remote_code, attention, cfg.quant_storage)
    return add_lora(model, cfg), tokenizer, name


def read_train_config(adapter: str) -> TrainConfig | None:
    """The resolved config main.py saved beside the adapter (None for an adapter trained elsewhere)."""
    path = os.path.join(adapter, CONFIG_NAME)
    return load_train_config(path) if os.path.isfile(path) else None


def load_adapter(
    path: str, base_model: str | None = None, quantization: str | None = None, trust_remote_code: bool = False
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, str]:
    """(base + trained LoRA adapter, tokenizer, the base's name) for an adapter folder main.py wrote.

    The base and quantization default to those recorded in the adapter's train_config.yaml (or, for an
    adapter trained elsewhere, PEFT's adapter_config.json).
    """
    from peft import PeftModel

    cfg = read_train_config(path)
    gguf_file = None
    if base_model is None and cfg is not None:
        base_model, gguf_file = cfg.base_model, cfg.gguf_file
    elif base_model is None:
        with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as fh:
            base_model = json.load(fh)["base_model_name_or_path"]
    name = resolve_base_model(base_model, gguf_file)
    has_tokenizer = any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model"))
    tokenizer = load_tokenizer(path if has_tokenizer else name, trust_remote_code)
    base = load_base_model(name, quantization or (cfg.quantization if cfg else "4bit"), trust_remote_code)
    check_adapter_fits(path, base, name, len(tokenizer), cfg.base_model if cfg else None)
    return PeftModel.from_pretrained(base, path), tokenizer, base_model


def check_adapter_fits(path: str, base: torch.nn.Module, base_name: str, vocab_size: int, trained_on: str | None) -> None:
    """A one-line ModelError unless the adapter's weights (read as safetensors only, never pickle) fit `base`.

    Another hidden size or layer count then fails here with what to do, not as PEFT's size-mismatch
    traceback or, worse, as an adapter silently applied to only some layers.
    """
    weights = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        pickled = os.path.isfile(os.path.join(path, "adapter_model.bin"))
        pickle_note = " (adapter_model.bin is a pickle file and is not loaded; save the adapter as safetensors)" if pickled else ""
        raise ModelError(f"{path}: no adapter_model.safetensors" + pickle_note)
    problem = adapter_mismatch(path, base, vocab_size)
    if problem:
        cfg = base.config
        if trained_on:
            advice = f"it was trained on {trained_on}: leave --base-model out (or pass that one)"
        else:
            advice = "pass the base it was trained on with --base-model"
        raise ModelError(f"the adapter in {path} does not fit the base {base_name} "
                         f"(hidden size {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
                         f"vocabulary {cfg.vocab_size}): {problem}; {advice}")


def adapter_mismatch(path: str, base: torch.nn.Module, vocab_size: int) -> str | None:
    """What does not fit: a LoRA pair whose sizes differ from its base layer, a targeted base layer without one, the vocabulary."""
    from safetensors import safe_open

    shapes: dict[str, dict[str, list[int]]] = {}  # base module name -> {"A": [r, in], "B": [out, r]}
    with safe_open(os.path.join(path, "adapter_model.safetensors"), "pt") as fh:
        for key in fh.keys():
            if ".lora_A." in key or ".lora_B." in key:
                module, part = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
                shapes.setdefault(module, {})[part[0]] = fh.get_slice(key).get_shape()
    modules = dict(base.named_modules())
    for module, pair in sorted(shapes.items()):
        layer = modules.get(module)
        if not hasattr(layer, "in_features"):
            return f"the base has no linear layer {module}"
        if (pair["A"][1], pair["B"][0]) != (layer.in_features, layer.out_features):
            return f"{module} is {layer.in_features}->{layer.out_features} in the base, {pair['A'][1]}->{pair['B'][0]} in the adapter"
    with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as fh:
        targets = json.load(fh).get("target_modules")
    if isinstance(targets, list):  # (a regex string would need PEFT's matching; the shapes above still apply)
        missing = sorted(n for n, m in modules.items() if n.rsplit(".", 1)[-1] in targets and hasattr(m, "in_features") and n not in shapes)
        if missing:
            return f"the adapter has no weights for {len(missing)} of the base's layers (e.g. {missing[0]}): the base has more layers"
    if vocab_size > base.get_input_embeddings().num_embeddings:
        return f"the adapter's tokenizer has {vocab_size} tokens, the base's embeddings only {base.get_input_embeddings().num_embeddings}"
    return None
