"""Generation: batched greedy (or sampled) answers with out-of-memory back-off, and the 16-bit copy of a 4-bit base.

    results = generate(model, tokenizer, prompts, batch_size=64)   # [{"answer", "answer_tokens", "ended_with_eos"}]

Prompts go longest first, in batches of similar length (less left padding; an out-of-memory error shows up
at once, and halves the batch for the rest of the run); results come back in input order.
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
    """Each prompt's answer (new text only, stopped at EOS), its token count and whether it ended with EOS, in input order."""
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
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str], **generation: Any
) -> list[dict[str, Any]]:
    """One left-padded batch through model.generate."""
    tokenizer.padding_side = "left"  # generation continues from the last position of every row
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    out = model.generate(**batch, **generation_kwargs(tokenizer, **generation))
    new_tokens = out[:, batch["input_ids"].shape[1] :].tolist()
    eos = tokenizer.eos_token_id
    results = []
    for row in new_tokens:
        length = row.index(eos) if eos in row else len(row)
        answer = tokenizer.decode(row[:length], skip_special_tokens=True).strip()
        results.append({"answer": answer, "answer_tokens": length, "ended_with_eos": eos in row})
    return results


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
