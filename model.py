"""The 4-bit Llama-2 base with a LoRA adapter, for inference: `Llama`. Never datasets.

    from model import Llama
    from dataset import create_question
    llama = Llama.load_pretrained_model("llama_adapter")
    llama.ask_model(create_question({"instruction": "Name three primary colours.", "context": ""}))
    llama.ask_model(question, use_adapter=False)   # the vanilla base, same weights, adapter off
    llama.generate([q1, q2, ...], batch_size=64)   # many at once: answers, token counts, how each ended

Where the pieces live: runtime.py chooses device, dtype and quantization; hub.py finds the base model;
loading.py loads it (and the adapter); generation.py batches generate() and makes the 16-bit copy.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

import generation
from hub import ModelError, resolve_base_model
from loading import load_adapter, load_base_model, load_tokenizer


class Llama:
    """A loaded base model, optionally with a LoRA adapter that can be switched off per call.

    dequantize: "auto" (default) turns a 4-bit base into its 16-bit copy before the first forward pass when the
    GPU has room (generation.dequantize_4bit): the same weight values, several times faster to generate from;
    "yes" always, "no" never. It happens once; every later ask_model / generate / nll call reuses it.
    merge: on a dense base (the 16-bit copy, or an unquantized base) the adapter is merged into the weights for
    fine-tuned answers and the exact base weights are put back for base answers (generation.MergeSwitch), so both
    run at the base's speed; the switch happens only when the requested side changes.
    engine: how answers are decoded (generation.pick_engine): auto, padded, evict, static, compiled, flash, compiled_flash,
    triton, compiled_triton or continuous.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, base_model: str | None = None,
                 dequantize: str = "auto", merge: bool = True, engine: str = "auto"):
        if dequantize not in ("auto", "yes", "no"):
            raise ValueError(f"dequantize must be auto, yes or no (got {dequantize!r})")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.base_model = base_model or getattr(model.config, "name_or_path", None)  # what the answers come from
        self.dequantize = dequantize
        self._dequantize_checked = False
        self._dequantized = False
        self._originals: dict[torch.nn.Module, torch.nn.Module] = {}  # dense layer -> its 4-bit layer, for exact restore
        self.merge, self.engine = merge, engine
        self.switch: generation.MergeSwitch | None = None

    @classmethod
    def load_pretrained_model(cls, path_or_name: str = "llama_adapter", base_model: str | None = None, quantization: str | None = None,
                              trust_remote_code: bool = False, dequantize: str = "auto", merge: bool = True, engine: str = "auto") -> Llama:
        """An adapter directory written by main.py (its base read from train_config.yaml), or a bare base model."""
        if os.path.isfile(os.path.join(path_or_name, "adapter_config.json")):
            model, tokenizer, base = load_adapter(path_or_name, base_model, quantization, trust_remote_code)
            return cls(model, tokenizer, base, dequantize, merge, engine)
        if os.path.isdir(path_or_name) and not os.path.isfile(os.path.join(path_or_name, "config.json")) and base_model is None:
            raise ModelError(f"{path_or_name}: neither an adapter (no adapter_config.json) nor a model (no config.json)")
        name = resolve_base_model(base_model or path_or_name)
        tokenizer = load_tokenizer(name, trust_remote_code)
        return cls(load_base_model(name, quantization or "4bit", trust_remote_code), tokenizer, base_model or path_or_name,
                   dequantize, merge, engine)

    @property
    def has_adapter(self) -> bool:
        return hasattr(self.model, "disable_adapter")

    def adapter(self, use_adapter: bool) -> contextlib.AbstractContextManager:
        """Context in which the model runs with (or without) its adapter: the same weights either way.

        With a MergeSwitch the weights are switched in place (and stay so after the block: the next call switches back
        only if it asks for the other side); otherwise PEFT's disable_adapter() for the base.
        """
        if self.switch is not None:
            self.switch.use(use_adapter)
            return contextlib.nullcontext()
        if use_adapter or not self.has_adapter:
            return contextlib.nullcontext()
        return self.model.disable_adapter()

    def ask_model(self, question: str, use_adapter: bool = True, **generation_args: Any) -> str:
        """The answer to one rendered prompt (see dataset.create_question): new text only, stopped at EOS."""
        return self.generate([question], batch_size=1, use_adapter=use_adapter, **generation_args)[0]["answer"]

    def generate(self, questions: list[str], batch_size: int | None = 8, use_adapter: bool = True, progress: bool = False,
                 **generation_args: Any) -> list[dict[str, Any]]:
        """Answers to many prompts, in input order: {"answer", "raw", "answer_tokens", "stop", "ended_with_eos"} each.

        stop_strings=[...] (eval.py: the template's section markers) ends an answer at the first of them too (see generation.py).
        batch_size None: sized from free memory. engine=... overrides the Llama's engine for this call.
        """
        self.dequantize_if_allowed()
        label = "fine-tuned" if use_adapter and self.has_adapter else "base"
        generation_args.setdefault("engine", self.engine)
        with self.adapter(use_adapter):
            return generation.generate(self.model, self.tokenizer, questions, batch_size, progress, label, **generation_args)

    @torch.inference_mode()
    def nll(self, examples: list[dict[str, list[int]]], use_adapter: bool = True, batch_size: int = 8) -> list[float]:
        """Mean negative log-likelihood per supervised token of each tokenized example, teacher-forced.

        The same quantity as the training loss on that example (labels -100 are ignored), so it
        needs no generation: cheap and exact.
        """
        from torch.nn.utils.rnn import pad_sequence

        self.dequantize_if_allowed()
        out: list[float] = []
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            ids = pad_sequence([torch.tensor(e["input_ids"]) for e in chunk], batch_first=True, padding_value=self.tokenizer.pad_token_id)
            labels = pad_sequence([torch.tensor(e["labels"]) for e in chunk], batch_first=True, padding_value=-100)
            mask = pad_sequence([torch.ones(len(e["input_ids"]), dtype=torch.long) for e in chunk], batch_first=True)
            with self.adapter(use_adapter):
                logits = self.model(input_ids=ids.to(self.model.device), attention_mask=mask.to(self.model.device)).logits.float()
            targets = labels[:, 1:].to(logits.device)
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none")
            counts = (targets != -100).sum(dim=1).clamp(min=1)
            out.extend((losses.sum(dim=1) / counts).tolist())
        return out

    def quantization_label(self) -> str:
        """What the base's weights are, in words: "4-bit NF4", "8-bit", or "unquantized (torch.float32)"."""
        q = getattr(self.model.config, "quantization_config", None)
        q = q.to_dict() if hasattr(q, "to_dict") else q or {}
        if not q.get("load_in_4bit") and not q.get("load_in_8bit"):
            return f"unquantized ({self.model.dtype})"
        label = f"4-bit {q.get('bnb_4bit_quant_type', '').upper()}".strip() if q.get("load_in_4bit") else "8-bit"
        return label + (" (answers generated from its exact 16-bit copy)" if self._dequantized else "")

    def device_label(self) -> str:
        """The card (or CPU) the answers come from, for reports."""
        device = self.model.device
        if device.type == "cuda":
            return torch.cuda.get_device_name(device)
        return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"

    def dequantize_if_allowed(self) -> None:
        """Once, before the first forward pass: swap the 4-bit base for its 16-bit copy if asked to (auto: if it fits),
        then set up merge-on-switch if the base is dense."""
        if self._dequantize_checked:
            return
        self._dequantize_checked = True
        self.dequantize_4bit_if_allowed()
        self.prepare_merge()

    def dequantize_4bit_if_allowed(self) -> None:
        if self.dequantize == "no" or not generation.linear4bit_modules(self.model):
            return
        extra = generation.dequantized_bytes(self.model)
        if self.dequantize == "yes" or generation.dequantize_fits(extra):
            print(f"[model] dequantizing the 4-bit base to a 16-bit copy for generation (+{extra / 2**30:.1f} GiB; "
                  "same weight values, faster)", flush=True)
            self._originals = generation.dequantize_4bit(self.model)
            self._dequantized = True

    def prepare_merge(self) -> None:
        """Once: set up the MergeSwitch where every LoRA layer wraps a dense layer (see the class docstring)."""
        if self.merge and self.switch is None and self.has_adapter and generation.MergeSwitch.supported(self.model):
            self.switch = generation.MergeSwitch(self.model, self._originals)
