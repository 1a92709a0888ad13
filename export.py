"""Merge a LoRA adapter into its base and write a plain transformers model (no peft needed to load it).

    python export.py --adapter llama_adapter --out llama_merged
    python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('llama_merged')"

The base is loaded unquantized (bf16 on CUDA, fp32 on the CPU), the adapter's low-rank update
W + (alpha / r) * B @ A is added into each target weight (peft's merge_and_unload), and the result
is saved as safetensors with the adapter's tokenizer. A merged model generates without the LoRA
side-branch, which makes it faster to serve.

Adapters trained on a 4-bit base merge into the full-precision weights by default, as in the QLoRA paper:
that merged model differs from the 4-bit base + adapter that eval.py evaluated by the base's 4-bit quantization
error. `--from-4bit` merges into the exact dequantized values of the 4-bit weights instead: the evaluated model.
"""

from __future__ import annotations

import argparse
import os
import sys

import atomic
from cli import run_cli
from config import ConfigError
from generation import fold_lora
from model import Llama


def export(adapter: str, out: str, base_model: str | None = None, from_4bit: bool = False) -> str:
    """Write the merged model to `out` (atomically: a temporary folder renamed at the end)."""
    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise ConfigError(f"{adapter}: no adapter_config.json; pass the directory main.py wrote")
    if os.path.exists(out):
        raise ConfigError(f"{out} already exists; choose another --out or remove it")
    if from_4bit:
        llama = Llama.load_pretrained_model(adapter, base_model=base_model, quantization="4bit", dequantize="yes")
        llama.dequantize_if_allowed()  # every 4-bit layer becomes a dense layer holding exactly its dequantized values
        merged = fold_lora(llama.model)
        merged.config.__dict__.pop("quantization_config", None)  # no 4-bit layer is left: save it as the plain model it is
        merged.hf_quantizer = None
    else:
        llama = Llama.load_pretrained_model(adapter, base_model=base_model, quantization="none")
        merged = llama.model.merge_and_unload()
    with atomic.folder(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        llama.tokenizer.save_pretrained(tmp)
    return out


def run(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default="llama_adapter", help="Adapter directory written by main.py (default: llama_adapter).")
    parser.add_argument("--out", required=True, help="New directory for the merged model.")
    parser.add_argument("--base-model", default=None, help="Override the base recorded in the adapter's train_config.yaml.")
    parser.add_argument("--from-4bit", action="store_true",
                        help="Merge into the dequantized 4-bit base (the model eval.py evaluated) instead of the 16-bit base.")
    parser.add_argument("--debug", action="store_true", help="Show full tracebacks instead of one-line errors.")
    args = parser.parse_args(argv)
    out = export(args.adapter, args.out, args.base_model, args.from_4bit)
    if args.from_4bit:
        print(f"[export] {out}/: the 4-bit base's exact dequantized weights + the adapter, merged: the model eval.py evaluated")
    else:
        print(f"[export] {out}/: the 16-bit base + the adapter, merged. eval.py evaluated the 4-bit base + the adapter; "
              "this model differs from it by the base's 4-bit quantization error (--from-4bit merges into the evaluated weights)")


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
