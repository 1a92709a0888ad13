"""Loading a base model and its tokenizer, wrapping it with a fresh LoRA adapter, or loading a trained one.

    model, tokenizer, base_path = load_for_training(cfg)          # main.py: 4-bit base + new LoRA adapter
    model, tokenizer, train_cfg = load_adapter("llama_adapter")   # inference: base + trained adapter

An adapter is checked against its base before PEFT sees it (`check_adapter_fits`): another hidden size or
layer count is one line saying which base it was trained on, never a size-mismatch traceback.
"""

from __future__ import annotations

import gc
import json
import os
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

import fp8
from config import CONFIG_NAME, COPIES, FP8ES, ConfigError, TrainConfig, load_train_config
from hub import ModelError, explain_load_error, resolve_base_model
from memory import MemoryProbe, start_recording
from runtime import VARLEN, Runtime, attention_kernel, fsdp_active, padding_mask_hook, quantization_config, runtime


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


FSDP_LOAD = "LLAMA_DOLLY_FSDP_LOAD"  # where a 4-bit base is quantized under FSDP: via-gpu (default), cpu, gpu (see fsdp_placement)


def load_base_model(
    name: str, quantization: str = "4bit", trust_remote_code: bool = False, attention: str = "sdpa", quant_storage: str = "uint8"
) -> torch.nn.Module:
    """The base model (a path or hub id from hub.resolve_base_model), quantized as asked, on this process's device.

    Under FSDP the model is left where `fsdp_placement` says (CPU RAM for a 4-bit base): FSDP moves it to the GPU one
    wrapped unit at a time and keeps only this process's shard of each.
    """
    rt = runtime()
    kwargs: dict[str, Any] = {"dtype": rt.dtype, "trust_remote_code": trust_remote_code, "attn_implementation": attention}
    qconfig = quantization_config(quantization, rt, quant_storage)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    kwargs["device_map"], to_cpu = {"": rt.device}, False
    threads = torch.get_num_threads()
    if fsdp_active():
        from accelerate import PartialState

        PartialState(cpu=not rt.cuda)  # process group up, this process's GPU selected, before loading
        kwargs["device_map"], to_cpu = fsdp_placement(rt, qconfig is not None, os.environ.get(FSDP_LOAD, "via-gpu"))
        if kwargs["device_map"] == {"": "cpu"}:  # torchrun sets OMP_NUM_THREADS=1: give CPU quantization this process's cores
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        raise explain_load_error(err, name) from err
    finally:
        torch.set_num_threads(threads)
    if to_cpu:
        model.to("cpu")  # Params4bit.to moves its quant_state along; the packed values are unchanged
        torch.cuda.empty_cache()  # a clean allocator: FSDP's per-unit uploads do not land in the holes of the whole model
    model.config.use_cache = True
    if attention == VARLEN:  # a padding mask of one's own forward pass or generate() would otherwise be dropped
        model.get_decoder().register_forward_pre_hook(padding_mask_hook, with_kwargs=True)
    MemoryProbe.mark("after load")
    return model


def fsdp_placement(rt: Runtime, quantized: bool, where: str = "via-gpu") -> tuple[dict[str, str] | None, bool]:
    """Under FSDP: (device_map for from_pretrained, whether to move the loaded model into CPU RAM before FSDP wraps it).

    transformers 5.x has no rank-0/meta path for quantized weights (4.x had one): bitsandbytes quantizes each weight
    where it is materialized, and with device_map None it picks this process's GPU, so every process holds the WHOLE
    4-bit base on its GPU before FSDP shards it (issue 14: both ranks OOMed). A model in CPU RAM is instead moved to the
    GPU by FSDP (device_id) one wrapped unit at a time, flattened and sharded: the GPU keeps about 1/N of it.
      via-gpu: quantize on this GPU (seconds), then move the 4-bit model to CPU RAM. The load briefly needs the whole
               4-bit base on each GPU (what transformers 4.x did on rank 0), training only the shard.
      cpu:     quantize in CPU RAM: no GPU peak at load, but minutes for a 13B (bitsandbytes' CPU kernel).
      gpu:     leave it on the GPU (FSDP shards it in place; the caching allocator keeps the freed whole-model blocks).
    A one-device map sets no hf_device_map, so accelerate's "4-bit model on another device" check does not fire.
    A bf16 base (no quantization) loads into CPU RAM with device_map None, as FSDP expects.
    """
    if where not in ("via-gpu", "cpu", "gpu"):
        raise ConfigError(f"{FSDP_LOAD}={where}: expected via-gpu, cpu or gpu")
    if not quantized:
        return None, False
    if where == "cpu":
        return {"": "cpu"}, False
    return {"": rt.device}, where == "via-gpu" and rt.cuda


def check_fsdp_config(cfg: TrainConfig) -> None:
    """FSDP (use_orig_params false) flattens each unit into one tensor of one dtype: refuse settings that mix dtypes, and
    --dense-base yes (FSDP shards the 4-bit weights), before anything is loaded."""
    if not fsdp_active() or cfg.quantization == "none":
        return
    if cfg.dense_base in COPIES + FP8ES:
        raise ConfigError(f"--dense-base {cfg.dense_base} is for one process: FSDP shards the 4-bit weights (pass --dense-base no)")
    if cfg.quantization == "8bit":
        raise ConfigError("FSDP shards a 4-bit (bf16-stored) or unquantized base, not an 8-bit one: pass --quantization 4bit")
    if cfg.quant_storage != "bfloat16":
        raise ConfigError("FSDP shards float tensors only: pass --quant-storage bfloat16 (the 4-bit weights packed into bf16 values)")
    if cfg.fp32_upcast:
        raise ConfigError("--fp32-upcast casts norms and embeddings to fp32 beside the bf16-stored 4-bit weights, and FSDP "
                          "(use_orig_params false) needs one dtype per wrapped unit: drop --fp32-upcast under FSDP")


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
    check_fsdp_config(cfg)
    start_recording()  # LLAMA_DOLLY_MEMORY_SNAPSHOT=1: allocations from the load on
    name = resolve_base_model(cfg.base_model, cfg.gguf_file)
    tokenizer = load_tokenizer(name, cfg.trust_remote_code)
    attention = attention_kernel(cfg.attention, cfg.packing, runtime())
    if cfg.dense_base in FP8ES:
        problem = fp8.check_fp8_device(runtime().device)
        if problem:
            raise ConfigError(f"--dense-base {cfg.dense_base}: {problem}; pass --dense-base yes (the 16-bit copy) instead")
    model = load_base_model(name, cfg.quantization, cfg.trust_remote_code, attention, cfg.quant_storage)
    dense = dequantize_for_training(model, cfg.dense_base in FP8ES) if cfg.dense_base in COPIES else []
    model = add_lora(model, cfg)
    if cfg.dense_base == "fp8_backward_4bit":
        count = fp8.fp8_backward_4bit(model)
        if not count:
            raise ConfigError("--dense-base fp8_backward_4bit needs a 4-bit base (--quantization 4bit)")
        print(f"[model] the base's {count} 4-bit linear layers compute their input gradients in FP8 (W^T cast to e4m3 in each "
              "backward pass, the gradient per row; the forward stays 4-bit, the LoRA branch 16-bit)", flush=True)
    elif cfg.dense_base in FP8ES:
        exact_forward = cfg.dense_base == "fp8_backward"
        count = fp8.to_fp8(model, dense, exact_forward)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        what = "compute their input gradients in FP8 (the forward stays 16-bit)" if exact_forward else "compute in FP8"
        print(f"[model] the base's {count} linear layers {what} (e4m3, a scale per row; the LoRA branch stays 16-bit)",
              flush=True)
        MemoryProbe.mark("after the FP8 copy")
    MemoryProbe.mark("after LoRA")
    return model, tokenizer, name


def dequantize_for_training(model: torch.nn.Module, for_fp8: bool = False) -> list[torch.nn.Module]:
    """--dense-base yes: every 4-bit linear layer replaced by a frozen 16-bit one holding its dequantized NF4 values, before
    LoRA wraps it, the 4-bit weights freed. Each forward and backward pass then multiplies by the same weight values
    without unpacking them (bitsandbytes dequantizes each layer's weight in the forward and again in the backward).
    Returns the 16-bit layers (--dense-base fp8 hands them to fp8.to_fp8 once LoRA has wrapped them; for_fp8 only
    changes what is printed)."""
    import generation

    layers = generation.linear4bit_modules(model)
    if not layers:
        raise ConfigError(f"--dense-base {'fp8 / fp8_backward' if for_fp8 else 'yes'} needs a 4-bit base (--quantization 4bit)")
    extra = generation.dequantized_bytes(model) - sum(q.weight.numel() * q.weight.element_size() for _, _, q in layers)
    dense = list(generation.dequantize_4bit(model))  # its {dense: 4-bit} map is dropped: the 4-bit layers are freed
    count = len(layers)
    del layers
    gc.collect()  # bitsandbytes' 4-bit layers sit in reference cycles: without this they stay until Python's next collection
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    then = ", with FP8 products once LoRA wraps them" if for_fp8 else ""
    print(f"[model] training against a 16-bit copy of the 4-bit base ({count} layers, the same NF4 values{then}; "
          f"+{extra / 2**30:.1f} GiB)", flush=True)
    MemoryProbe.mark("after the 16-bit copy")
    return dense


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
