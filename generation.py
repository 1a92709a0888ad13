"""Generation: batched greedy (or sampled) answers with out-of-memory back-off, and the 16-bit copy of a 4-bit base.

    results = generate(model, tokenizer, prompts, batch_size=64, stop_strings=["### Instruction:"])
    # [{"answer", "raw", "answer_tokens", "stop": "eos" | "stop_string" | "length", "ended_with_eos"}]

Prompts go longest first, in batches of similar length (less left padding; an out-of-memory error shows up
at once, and halves the batch for the rest of the run); results come back in input order.

Stopping: an answer ends at EOS, at the first stop string (eval.py passes the template's section markers, the
same for every model), or at max_new_tokens, whichever comes first; `stop` says which. A sequence that has
stopped no longer decides when its batch ends. `raw` keeps the decoded text before the cut.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase


def generation_kwargs(tokenizer: PreTrainedTokenizerBase, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                      **extra: Any) -> dict[str, Any]:
    """generate() arguments: greedy at temperature 0 (sampling knobs a model's generation_config carries are cleared)."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "do_sample": temperature > 0,
    }
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs | extra


def generate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str], batch_size: int = 8,
             progress: bool = False, label: str = "answers", **generation: Any) -> list[dict[str, Any]]:
    """Each prompt's answer (new text only, cut at EOS or a stop string), its token count and how it ended, in input order."""
    from tqdm.auto import tqdm

    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]] if prompts else []
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    results: list[dict[str, Any]] = [{}] * len(prompts)
    bar = tqdm(total=len(prompts), desc=f"generating ({label})", unit="answer", disable=not progress)
    start = 0
    while start < len(prompts):
        chunk = order[start : start + batch_size]
        try:
            generated = generate_batch(model, tokenizer, [prompts[i] for i in chunk], **generation)
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size = max(1, batch_size // 2)  # the longest prompts come first: what fits now fits for the rest
            torch.cuda.empty_cache()
            print(f"[model] out of GPU memory while generating; retrying with batch size {batch_size}", flush=True)
            continue
        for i, result in zip(chunk, generated, strict=True):
            results[i] = result
        start += len(chunk)
        bar.update(len(chunk))
    bar.close()
    return results


@torch.inference_mode()
def generate_batch(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str], stop_strings: list[str] | None = None,
    **generation: Any,
) -> list[dict[str, Any]]:
    """One left-padded batch through model.generate."""
    tokenizer.padding_side = "left"  # generation continues from the last position of every row
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    stops = {"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings else {}
    out = model.generate(**batch, **stops, **generation_kwargs(tokenizer, **generation))
    return [end_answer(row, tokenizer, stop_strings or []) for row in out[:, batch["input_ids"].shape[1] :].tolist()]


def end_answer(new_tokens: list[int], tokenizer: PreTrainedTokenizerBase, stop_strings: list[str]) -> dict[str, Any]:
    """The answer in a row of generated tokens: up to EOS, then cut before the first stop string; and which rule ended it."""
    eos = tokenizer.eos_token_id
    length = new_tokens.index(eos) if eos in new_tokens else len(new_tokens)
    raw = tokenizer.decode(new_tokens[:length], skip_special_tokens=True)
    cut = min((raw.find(s) for s in stop_strings if s in raw), default=-1)
    if cut < 0:
        stop = "eos" if eos in new_tokens else "length"
        return {"answer": raw.strip(), "raw": raw, "answer_tokens": length, "stop": stop, "ended_with_eos": stop == "eos"}
    low, high = 0, length  # the most generated tokens whose text stays before the cut (binary search: decoding is monotone)
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if len(tokenizer.decode(new_tokens[:mid], skip_special_tokens=True)) <= cut else (low, mid - 1)
    return {"answer": raw[:cut].strip(), "raw": raw, "answer_tokens": low, "stop": "stop_string", "ended_with_eos": False}


# --- fast generation: the 4-bit base dequantized once -------------------------------------


def linear4bit_modules(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(parent, attribute, module) for every bitsandbytes 4-bit linear layer, LoRA's wrapped base layers included."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return []
    import bitsandbytes as bnb

    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, bnb.nn.Linear4bit)
    ]


def dequantized_bytes(model: torch.nn.Module) -> int:
    """Extra memory a 16-bit copy of the 4-bit linear weights takes (their 16-bit size minus the freed 4-bit storage)."""
    return sum(m.in_features * m.out_features * 2 - m.weight.numel() * m.weight.element_size() for _, _, m in linear4bit_modules(model))


def dequantize_4bit(model: torch.nn.Module) -> int:
    """Replace every 4-bit linear layer by a plain linear layer holding its dequantized weights; returns how many.

    The weight values are exactly the NF4 values bitsandbytes computes with; only the kernel changes (a dense
    16-bit matmul instead of unpacking the 4-bit weight inside every layer at every generated token), so the
    logits agree up to rounding, and batched generation gets faster at the memory of a 16-bit copy (13 GB
    for Llama-2-7B). LoRA wrappers keep their adapter unmerged, so `use_adapter=False` still gives the base
    itself. The model can no longer be trained as QLoRA afterwards.
    """
    import bitsandbytes as bnb

    layers = linear4bit_modules(model)
    count = len(layers)
    while layers:  # popped: each 4-bit layer is freed once replaced, so the two copies never coexist in full
        parent, name, q = layers.pop()
        dtype = q.compute_dtype or torch.bfloat16
        if getattr(q.weight.quant_state, "packing_format_for_cpu", False):
            # bitsandbytes repacked this weight for its CPU kernel at the first forward pass; read the values
            # back through that kernel: x = I gives x @ W.T = W.T.
            with torch.no_grad():
                eye = torch.eye(q.in_features, dtype=dtype, device=q.weight.device)
                weight = (q(eye) - (q.bias if q.bias is not None else 0)).t().contiguous().to(dtype)
        else:
            weight = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).to(dtype)
        dense = torch.nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=weight.device, dtype=dtype)
        dense.weight = torch.nn.Parameter(weight, requires_grad=False)
        if q.bias is not None:
            dense.bias = torch.nn.Parameter(q.bias.data.to(dtype), requires_grad=False)
        setattr(parent, name, dense)
    if count and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return count


def dequantize_fits(extra_bytes: int, headroom: float = 0.5) -> bool:
    """Whether `extra_bytes` (see dequantized_bytes) is at most `headroom` of the free GPU memory (the rest is left for the KV cache)."""
    if not torch.cuda.is_available():
        return False  # on the CPU the 4-bit path is the documented low-memory fallback; opt in with dequantize="yes"
    free, _ = torch.cuda.mem_get_info()
    return extra_bytes <= headroom * free


def lora_delta(layer: torch.nn.Module, adapter: str = "default") -> torch.Tensor:
    """The update a LoRA layer adds to its base weight, (alpha / r) * B @ A, computed in float32."""
    a, b = layer.lora_A[adapter].weight.float(), layer.lora_B[adapter].weight.float()
    return (b @ a) * layer.scaling[adapter]


@torch.no_grad()
def fold_lora(peft_model: torch.nn.Module, adapter: str = "default") -> torch.nn.Module:
    """The base model with each LoRA update added into its dense weight (in float32, cast once) and the wrappers removed.

    For a base whose 4-bit layers were dequantized (dequantize_4bit): PEFT's own merge expects bitsandbytes layers there.
    """
    wrapped = [(parent, name, child) for parent in peft_model.modules() for name, child in parent.named_children()
               if hasattr(child, "lora_A") and hasattr(child, "base_layer")]
    for parent, name, layer in wrapped:
        base = layer.base_layer
        if type(base) is not torch.nn.Linear:
            raise TypeError(f"{name}: fold_lora needs a dense base layer, got {type(base).__name__} (dequantize the base first)")
        base.weight.data = (base.weight.data.float() + lora_delta(layer, adapter)).to(base.weight.dtype)
        setattr(parent, name, base)
    return peft_model.get_base_model()
