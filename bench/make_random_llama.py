"""Write a random-weight Llama-2-7B or -13B (the real architecture) with the real Llama 2 tokenizer, for speed and memory work.

    python bench/make_random_llama.py --out /tmp/llama-2-7b-random --tokenizer .tok/llama2-tokenizer

Speed and memory do not depend on the weight values; the hub's weights cannot be downloaded on the
GPU machine. Weights are initialised on the GPU in bf16 (about 20 s to save 13.5 GB).
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
SIZES = {"7b": LLAMA2_7B, "13b": LLAMA2_7B | dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                                   num_attention_heads=40, num_key_value_heads=40)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="Directory to write the model and tokenizer to.")
    parser.add_argument("--tokenizer", required=True, help="Directory of the Llama 2 tokenizer (tokenizer.model).")
    parser.add_argument("--size", choices=list(SIZES), default="7b", help="Llama-2 architecture: 7b (6.7B parameters) or 13b (13.0B).")
    parser.add_argument("--layers", type=int, default=None, help="Decoder layers (default: the architecture's, 32 for 7b, 40 for 13b).")
    args = parser.parse_args()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    arch = SIZES[args.size]
    config = LlamaConfig(**(arch | {"num_hidden_layers": args.layers or arch["num_hidden_layers"]}))
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: a 13B fp32 copy would not fit one card
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)
    model.save_pretrained(args.out)
    AutoTokenizer.from_pretrained(args.tokenizer).save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {n / 1e9:.2f}B-parameter random Llama to {args.out} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
