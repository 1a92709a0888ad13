"""Time nf4_kernel's W^T cast (--dense-base fp8_backward_4bit's backward) over launch configs, at Llama-2-7B's weight shapes.

    python bench/nf4_cast.py --out nf4_cast.json [--configs 32,64,4,512 64,128,4,512 ...]

Per shape and config: microseconds per call (both kernels) and the bytes they must move at least (half a byte per weight
read twice, the fp32 absmax twice, one byte per weight written) over that time; beside them, in the same process,
bitsandbytes' own dequantization to bf16 and the torch cast of session 12 (dequantize + quantize_rows of W^T).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))  # q/k/v/o, gate/up, down


def seconds_per_call(fn, *args, calls: int = 50) -> float:
    fn(*args)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls


def torch_cast(q, state):
    """Session 12's cast: bitsandbytes' 16-bit W, then quantize_rows of its transpose."""
    from bitsandbytes import functional as F

    import fp8

    return fp8.quantize_rows(F.dequantize_4bit(q, state).t())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file for the timings")
    parser.add_argument("--configs", nargs="*", default=["32,64,4,512", "64,64,4,512", "32,128,4,512", "64,128,8,512",
                                                         "16,128,4,256", "32,64,2,512", "64,32,4,512", "128,64,8,1024"],
                        help="launch configs BO,BI,warps,ROWS (nf4_kernel.CONFIG's fields)")
    args = parser.parse_args()
    from bitsandbytes import functional as F

    import nf4_kernel

    rows = []
    for n_out, n_in in SHAPES:
        w = (torch.randn(n_out, n_in, device="cuda") * 0.02).bfloat16()
        q, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        absmax = (F.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()
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
        print(f"[nf4_cast] {n_out}x{n_in}: bnb dequantize {row['bnb_dequantize_us']:.0f} us, torch cast {row['torch_cast_us']:.0f} us; "
              + ", ".join(f"{k}: {v.get('us', v.get('error'))}" for k, v in row["configs"].items()) + f"; best {best[1]}", flush=True)
        rows.append(row)
    with open(args.out, "w") as fh:
        json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
