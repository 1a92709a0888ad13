"""Time nf4_kernel's W^T cast (--dense-base fp8_backward_4bit's backward) over launch configs, at Llama-2-7B's weight shapes.

    python bench/nf4_cast.py --out nf4_cast.json [--configs 32,64,4,512 64,128,4,512 ...]

Per shape and config: microseconds per call (both kernels) and the bytes they must move at least (half a byte per weight
read twice, the fp32 absmax twice, one byte per weight written) over that time; beside them, in the same process,
bitsandbytes' own dequantization to bf16 and the torch cast of session 12 (dequantize + quantize_rows of W^T).
The backward runs only the cast (parts_us.cast_transposed): the column maxima are taken once, at load (W is frozen).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import nf4_kernel  # noqa: E402

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))  # q/k/v/o, gate/up, down


@triton.jit
def tile_only(Packed, Absmax, Code, Out, n_out, n_in, BLOCKSIZE: tl.constexpr, ROUND: tl.constexpr, ALIGNED: tl.constexpr,
              NATIVE: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr):
    rows, cols, w, mask = nf4_kernel._tile(Packed, Absmax, Code, tl.program_id(0) * BO, n_out, n_in, BLOCKSIZE, ROUND, ALIGNED,
                                           NATIVE, BO, BI)
    tl.store(Out + rows[:, None] * n_in + cols[None, :], w.to(tl.bfloat16), mask=mask)


@triton.jit
def tile_no_gather(Packed, Absmax, Out, n_out, n_in, BLOCKSIZE: tl.constexpr, ROUND: tl.constexpr, ALIGNED: tl.constexpr,
                   NATIVE: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr):
    rows = tl.program_id(0) * BO + tl.arange(0, BO)
    pairs = tl.program_id(1) * (BI // 2) + tl.arange(0, BI // 2)
    in_rows = rows[:, None] < n_out
    byte = tl.load(Packed + rows[:, None] * (n_in // 2) + pairs[None, :], mask=in_rows, other=0).to(tl.int32)
    nibble = tl.interleave(byte >> 4, byte & 15)
    cols = tl.program_id(1) * BI + tl.arange(0, BI)
    mask = in_rows & (cols[None, :] < n_in)
    absmax = tl.load(Absmax + (rows[:, None] * n_in + cols[None, :]) // BLOCKSIZE, mask=mask, other=0.0)
    w = nibble.to(tl.float32) * absmax
    tl.store(Out + rows[:, None] * n_in + cols[None, :], w.to(tl.bfloat16), mask=mask)


@triton.jit
def cast_untransposed(Packed, Absmax, Code, ColMax, Out, n_out, n_in, BLOCKSIZE: tl.constexpr, ROUND: tl.constexpr,
                      ALIGNED: tl.constexpr, NATIVE: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr):
    rows, cols, w, mask = nf4_kernel._tile(Packed, Absmax, Code, tl.program_id(0) * BO, n_out, n_in, BLOCKSIZE, ROUND, ALIGNED,
                                           NATIVE, BO, BI)
    amax = tl.load(ColMax + cols, mask=cols < n_in, other=1.0)
    scale = tl.where(amax > 0, amax * (1.0 / 448.0), 1.0)
    inverse = tl.math.div_rn(1.0, scale)
    q = nf4_kernel._to_e4m3(tl.minimum(tl.maximum(w * inverse[None, :], -448.0), 448.0), NATIVE)
    tl.store(Out + rows[:, None] * n_in + cols[None, :], q, mask=mask)


@triton.jit
def copy_bytes(Packed, Out, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Out + offs, tl.load(Packed + offs, mask=offs < n), mask=offs < n)



def seconds_per_call(fn, *args, calls: int = 50) -> float:
    fn(*args)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls


def parts(q, absmax, code, n_out, n_in, config):
    """GPU microseconds (CUDA-graph replays: no host time) of the cast's parts and of stripped-down kernels, so that the
    slow part shows: the two kernels alone; the dequantized tile stored as bf16 untransposed; the same without the
    code-table gather; the cast stored untransposed; a plain copy of the packed bytes."""
    from triton.testing import do_bench_cudagraph

    bo, bi, warps, rows = config
    meta = dict(BLOCKSIZE=64, BO=bo, BI=bi, num_warps=warps, ALIGNED=int(64 % bi == 0), NATIVE=1, ROUND=1)
    grid = (triton.cdiv(n_out, bo), triton.cdiv(n_in, bi))
    col_max = torch.zeros(n_in, dtype=torch.float32, device="cuda")
    out8 = torch.empty(n_in, n_out, dtype=torch.float8_e4m3fn, device="cuda")
    scale = torch.empty(1, n_in, dtype=torch.float32, device="cuda")
    out16 = torch.empty(n_out, n_in, dtype=torch.bfloat16, device="cuda")
    flat = q.reshape(-1)
    copied = torch.empty_like(flat)
    runs = {
        "column_max": lambda: nf4_kernel._column_max[(triton.cdiv(n_out, rows), triton.cdiv(n_in, bi))](
            q, absmax, code, col_max, n_out, n_in, ROWS=rows, **meta),
        "cast_transposed": lambda: nf4_kernel._cast_transposed[grid](q, absmax, code, col_max, out8, scale, n_out, n_in, **meta),
        "cast_untransposed": lambda: cast_untransposed[grid](q, absmax, code, col_max, out8, n_out, n_in, **meta),
        "tile_to_bf16": lambda: tile_only[grid](q, absmax, code, out16, n_out, n_in, **meta),
        "tile_to_bf16_no_code_gather": lambda: tile_no_gather[grid](q, absmax, out16, n_out, n_in, **meta),
        "interpreter_rounding_both_kernels": lambda: nf4_kernel.launch(q, absmax, code, [n_out, n_in], 64, True, config=config,
                                                                        native=False),
        "copy_packed_bytes": lambda: copy_bytes[(triton.cdiv(flat.numel(), 1024),)](flat, copied, flat.numel(), BLOCK=1024),
    }
    out = {}
    for name, fn in runs.items():
        try:
            out[name] = round(do_bench_cudagraph(fn, rep=50) * 1e3, 1)
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            out[name] = f"{type(e).__name__}: {e}"[:200]
    return out


def torch_cast(q, state):
    """Session 12's cast: bitsandbytes' 16-bit W, then quantize_rows of its transpose."""
    from bitsandbytes import functional as F

    import fp8

    return fp8.quantize_rows(F.dequantize_4bit(q, state).t())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file for the timings")
    parser.add_argument("--configs", nargs="*", default=["8,128,2,256", "8,64,2,256", "16,64,2,256", "16,64,4,256",
                                                         "32,64,4,512", "16,32,2,256", "32,32,2,512"],
                        help="launch configs BO,BI,warps,ROWS (nf4_kernel.CONFIG's fields)")
    args = parser.parse_args()
    from bitsandbytes import functional as F

    rows = []
    for n_out, n_in in SHAPES:
        w = (torch.randn(n_out, n_in, device="cuda") * 0.02).bfloat16()
        q, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        absmax = nf4_kernel.fp32_absmax(state)
        code = state.code.float()
        least = n_out * n_in * (0.5 * 2 + 1) + absmax.numel() * 4 * 2
        row = {"shape": [n_out, n_in], "card": torch.cuda.get_device_name(),
               "bnb_dequantize_us": seconds_per_call(F.dequantize_4bit, q, state) * 1e6,
               "torch_cast_us": seconds_per_call(torch_cast, q, state) * 1e6, "configs": {}}
        for text in args.configs:
            config = tuple(int(v) for v in text.split(","))
            try:
                t = seconds_per_call(nf4_kernel.launch, q, absmax, code, [n_out, n_in], 64, True, lambda k: k, config)
            except Exception as e:  # noqa: BLE001 - a config the card cannot run is reported, not fatal
                row["configs"][text] = {"error": f"{type(e).__name__}: {e}"[:200]}
                continue
            row["configs"][text] = {"us": round(t * 1e6, 1), "GB_s": round(least / t / 1e9, 1)}
        best = min((v["us"], k) for k, v in row["configs"].items() if "us" in v)
        row["parts_us"] = parts(q, absmax, code, n_out, n_in, tuple(int(v) for v in best[1].split(",")))
        print(f"[nf4_cast] {n_out}x{n_in} GPU us per part at {best[1]}: {row['parts_us']}", flush=True)
        print(f"[nf4_cast] {n_out}x{n_in}: bnb dequantize {row['bnb_dequantize_us']:.0f} us, torch cast {row['torch_cast_us']:.0f} us; "
              + ", ".join(f"{k}: {v.get('us', v.get('error'))}" for k, v in row["configs"].items()) + f"; best {best[1]}", flush=True)
        rows.append(row)
    with open(args.out, "w") as fh:
        json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
