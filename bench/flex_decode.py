"""bench/generate_speed.py with the flash engines' decode attention through compiled flex attention: a diagnosis (issue 13).

    python bench/flex_decode.py --model /tmp/l7 --out flex.json --engines flash,compiled_flash --single-prompts 0 \
        --naive-prompts 0 --old-prompts 0 --profile-prompts 0        # any generate_speed.py flags; compare with a plain run

bench/decode_attention.py measured the kernel alone on an H200: FlashAttention's variable-length kernel (what the flash
engines call, generation.flash_decode_attention) at 47% of the bandwidth for 204 rows, flex attention's decoding kernel
at 63-64% (1.36x). This runs the whole benchmark with generation.flash_decode_attention replaced by flex_decode_attention
below, to see what that is worth end to end before it is built into generation.py. The BlockMask is made inside the
decode step from the step's own bounds (tensor ops only, no host sync: it is captured in the CUDA graph with the rest):
every key block from a row's first real token to the end of its cache (the blocks its answer will reach), each row's
exact stretch masked by the mask_mod. flash joins the engines run cold first (flex attention compiles).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import generate_speed  # noqa: E402
import torch  # noqa: E402
from decode_attention import blocks_through  # noqa: E402
from torch.nn.attention.flex_attention import flex_attention  # noqa: E402

import generation  # noqa: E402

_flex = torch.compile(flex_attention, dynamic=False)


def flex_decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """generation.flash_decode_attention's contract (row r's one query attends to its cache positions decode_starts[r]
    .. + decode_lengths[r] of the flattened rows x length cache) through flex attention over the (rows, heads, length,
    dim) views of the cache."""
    starts, lengths = kwargs["decode_starts"], kwargs["decode_lengths"]
    rows, heads, _, _ = query.shape
    length = key.shape[2]
    first = starts[:-1].long() - torch.arange(rows, device=query.device) * length
    end = first + lengths.long()
    block_mask = blocks_through(first, torch.full_like(first, length), length,
                                lambda b, h, q_idx, kv_idx: (kv_idx >= first[b]) & (kv_idx < end[b]))
    out = _flex(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=heads != key.shape[1])
    return out.transpose(1, 2), None


if __name__ == "__main__":
    generation.flash_decode_attention = flex_decode_attention
    generate_speed.COLD_FIRST = (*generate_speed.COLD_FIRST, "flash")
    generate_speed.main()
