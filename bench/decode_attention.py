"""Decode-step attention kernels side by side (issue 13: where the flash engines' decode time goes). GPU; no model needed.

    python bench/decode_attention.py --out decode_attention.json       # rows 204 and 52, Llama-2-7B's 32 heads x 128

One query per row attends to its own stretch of a (rows x length) KV cache laid out as the flash engines lay it out
(generation.relayout_cache: rows, length, heads, dim; each row's tokens right-aligned, its first `length - n` slots
padding). Per kernel: microseconds per call (one layer, one decode step; CUDA events over --iters calls after warm-up),
the KV bytes it must read (each row's own keys and values, once) over that time as a share of the card's memory
bandwidth, and the largest difference from `flash_varlen` (bf16). Kernels:
  flash_varlen  what the flash engines run: aten._flash_attention_forward, varlen, seqused_k (FlashAttention 2 inside
                PyTorch; for one query row a tile of 128 query rows is computed, 127 of them padding)
  sdpa_masked   SDPA over the whole padded cache with a boolean mask (what the static engine runs; reads every slot)
  flex          flex_attention compiled, a BlockMask of each row's stretch (Triton; short queries take its decoding kernel,
                which splits the keys across thread blocks and skips the blocks outside the mask)
  flex_ahead128 the same with a BlockMask made for 128 steps ahead (what a decode loop in a CUDA graph could keep for
                128 steps: the blocks a row will reach by then are read, the mask_mod still exact)
  triton_B_W_S  decode_kernel's one-query Triton kernel (the triton engines): BLOCK_N B, W warps, S stages; one program
                per (row, head) streaming the row's stretch once, the products on the tensor cores (the query repeated
                over 16 rows); --triton-configs lists the sweep (session 10 also swept a CUDA-core version, dropped)
Session 7's profile (bench/results-compiled-flash-profile-h200.txt) put flash_varlen at 213 us per layer and step, the
largest decode item.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HEADS, DIM = 32, 128
BLOCK = 128  # flex attention's key block
DEVICE = "cuda"  # --device cpu: the plumbing only (no flash_varlen, times meaningless)
BANDWIDTH_TBS = {"H100": 3.35, "H200": 4.8, "A100": 2.0}


def card_bandwidth() -> float | None:
    name = torch.cuda.get_device_name()
    return next((v for k, v in BANDWIDTH_TBS.items() if k in name), None)


def make_case(rows: int, mean_context: int, seed: int) -> dict:
    """Lengths uniform in [mean/2, 3 mean/2], the cache as long as the longest plus 16 free slots."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(mean_context // 2, mean_context * 3 // 2 + 1, (rows,), generator=g)
    length = int(lengths.max()) + 16
    dev, dt = DEVICE, torch.bfloat16
    q = torch.randn(rows, HEADS, DIM, device=dev, dtype=dt)
    k = torch.randn(rows, length, HEADS, DIM, device=dev, dtype=dt)
    v = torch.randn(rows, length, HEADS, DIM, device=dev, dtype=dt)
    first = (length - lengths).to(dev)
    starts = torch.arange(rows, device=dev) * length + first
    return {"q": q, "k": k, "v": v, "length": length, "lengths": lengths.to(dev), "first": first,
            "starts": torch.cat([starts, starts.new_tensor([rows * length])]).to(torch.int32),
            "cu_q": torch.arange(rows + 1, device=dev, dtype=torch.int32), "scale": 1 / math.sqrt(DIM)}


def flash_varlen(c: dict):
    rows, length = c["q"].shape[0], c["length"]
    k, v = c["k"].view(rows * length, HEADS, DIM), c["v"].view(rows * length, HEADS, DIM)
    return lambda: torch.ops.aten._flash_attention_forward(c["q"], k, v, c["cu_q"], c["starts"], 1, length, 0.0, False, False,
                                                           scale=c["scale"], seqused_k=c["lengths"].to(torch.int32))[0]


def sdpa_masked(c: dict):
    position = torch.arange(c["length"], device=DEVICE)[None]
    visible = ((position >= c["first"][:, None]) & (position < (c["first"] + c["lengths"])[:, None]))[:, None, None]
    k, v, q = c["k"].transpose(1, 2), c["v"].transpose(1, 2), c["q"][:, :, None]
    return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=c["scale"])[:, :, 0]


def blocks_through(first: torch.Tensor, reach: torch.Tensor, length: int, mask_mod):
    """A BlockMask of every 128-key block from each row's first position up to `reach` (exclusive), none marked full, so
    `mask_mod` (each row's exact stretch) runs on every block read: one mask for as many steps as `reach` allows."""
    from torch.nn.attention.flex_attention import BlockMask

    block = torch.arange(-(-length // BLOCK), device=first.device)[None]
    needed = (block * BLOCK < reach[:, None]) & ((block + 1) * BLOCK > first[:, None])
    order = torch.argsort((~needed).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return BlockMask.from_kv_blocks(needed.sum(-1).to(torch.int32)[:, None, None], order[:, None, None], BLOCK_SIZE=BLOCK,
                                    mask_mod=mask_mod, seq_lengths=(1, length))


def flex(c: dict, ahead: int = 0):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    first, end, length = c["first"], c["first"] + c["lengths"], c["length"]

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx >= first[b]) & (kv_idx < end[b])

    if ahead:  # the blocks a row will reach `ahead` steps from now
        block_mask = blocks_through(first, torch.clamp(end + ahead, max=length), length, mask_mod)
    else:
        block_mask = create_block_mask(mask_mod, B=c["q"].shape[0], H=None, Q_LEN=1, KV_LEN=length, device=DEVICE)
    k, v, q = c["k"].transpose(1, 2), c["v"].transpose(1, 2), c["q"][:, :, None]
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda: compiled(q, k, v, block_mask=block_mask, scale=c["scale"])[:, :, 0]


def triton_kernel(c: dict, config: tuple):
    import decode_kernel

    rows, length = c["q"].shape[0], c["length"]
    k, v = c["k"].view(rows * length, HEADS, DIM), c["v"].view(rows * length, HEADS, DIM)
    lengths = c["lengths"].to(torch.int32)
    return lambda: decode_kernel.decode_attention(c["q"], k, v, c["starts"], lengths, c["scale"], config=config)


KERNELS = {"flash_varlen": flash_varlen, "sdpa_masked": sdpa_masked, "flex": flex,
           "flex_ahead128": lambda c: flex(c, ahead=128)}
TRITON_CONFIGS = "32_4_3,64_4_2,64_4_3,64_4_4,64_8_3,128_4_3,128_8_3,128_8_2,32_2_4"


def time_us(fn, iters: int) -> float:
    for _ in range(5):
        fn()
    if DEVICE != "cuda":
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) * 1e6 / iters
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="204,52", help="Batch sizes (the flash engines' two batches in session 7's bench).")
    parser.add_argument("--mean-context", type=int, default=360, help="Mean cached tokens per row (dolly-like prompt + half the answer).")
    parser.add_argument("--kernels", default=",".join(KERNELS) + ",triton",
                        help="triton: every --triton-configs entry (triton_B_W_S names one).")
    parser.add_argument("--triton-configs", default=TRITON_CONFIGS, help="BLOCKN_WARPS_STAGES entries for the triton kernel.")
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--out", default="decode_attention.json")
    parser.add_argument("--device", default="cuda", help="cpu: a plumbing check (flash_varlen needs CUDA; times meaningless).")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    bandwidth = card_bandwidth() if DEVICE == "cuda" else None
    results = {"card": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__, "bandwidth_tbs": bandwidth,
               "mean_context": args.mean_context, "cases": {}}
    for rows in map(int, args.rows.split(",")):
        c = make_case(rows, args.mean_context, seed=rows)
        kv_bytes = int(c["lengths"].sum()) * HEADS * DIM * 2 * 2
        case = {"rows": rows, "cache_length": c["length"], "kv_gb": kv_bytes / 1e9}
        reference = None
        names = [n for k in args.kernels.split(",") for n in
                 ([f"triton_{t}" for t in args.triton_configs.split(",")] if k == "triton" else [k])]
        for name in names:
            try:
                fn = (triton_kernel(c, tuple(int(x) for x in name.split("_")[1:])) if name.startswith("triton_")
                      else KERNELS[name](c))
                out = fn().float()
                reference = out if reference is None else reference
                us = time_us(fn, args.iters)
                case[name] = {"us": round(us, 1), "share_of_bandwidth": round(kv_bytes / (us * 1e-6) / (bandwidth * 1e12), 3)
                              if bandwidth else None, "max_abs_diff_vs_first": float((out - reference).abs().max())}
            except Exception as e:  # a kernel this torch cannot run: said, the others still measured
                case[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"[decode_attention] rows {rows}: {name} {case[name]}", flush=True)
        timed = {n: r["us"] for n, r in case.items() if isinstance(r, dict) and n.startswith("triton_") and "us" in r}
        if timed:
            case["best_triton"] = min(timed, key=timed.get)
        results["cases"][str(rows)] = case
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
