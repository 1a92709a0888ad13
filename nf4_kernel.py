"""Triton kernels for --dense-base fp8_backward_4bit (fp8.py): W^T in e4m3 straight from a bitsandbytes NF4 weight.

    wt_q, wt_scale = nf4_to_e4m3_t(packed, absmax, code, [out, in], blocksize, dtype, grad_dtype)

Bit-equal to quantize_rows(dequantize_4bit(W).to(grad_dtype).t()), what fp8_backward's copy holds, without the 16-bit W:
one kernel takes the column maxima (atomic max per column), the other casts and writes W^T a tile at a time, the tile
transposed in registers so that each row of W^T is stored contiguously. Both read the packed nibbles (half a byte per
weight) and the fp32 absmax; the cast writes one byte per weight: 2 bytes of traffic per weight in all, against ~7 for
dequantizing to 16 bits and casting the transpose with torch ops (measured 0.98x the 4-bit base, BENCHMARKS.md,
session 12). fp8.nf4_to_e4m3_t (the custom op torch.compile sees) calls this on CUDA; the tests run it on the CPU under
Triton's interpreter (TRITON_INTERPRET=1, set before triton is first imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE = (64, 128)  # rows x columns of W per program of both kernels (4 warps)
ROUNDING = {torch.float32: 0, torch.bfloat16: 1}  # the dtypes the kernels can round W through (1: to bfloat16)
E4M3_MAX = 448.0


@triton.jit
def _round_bf16(w):
    """w rounded to bfloat16 (to nearest, ties to even), kept in fp32: integer arithmetic on the bits, so that Triton's
    interpreter (whose float casts truncate) computes what the GPU does."""
    bits = w.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _round_e4m3(x):
    """x (|x| <= 448) rounded to float8 e4m3fn, to nearest, ties to even, kept in fp32 (exact in e4m3 then, so the cast
    that follows cannot round again): 3 mantissa bits from 2^-6 up, steps of 2^-9 below (subnormals)."""
    bits = x.to(tl.uint32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
    magnitude = tl.abs(x)
    subnormal = ((magnitude * 512.0 + 12582912.0) - 12582912.0) * 0.001953125  # 1.5 * 2^23 rounds to an even integer
    subnormal = (subnormal.to(tl.uint32, bitcast=True) | (bits & 0x80000000)).to(tl.float32, bitcast=True)  # x's sign, -0 too
    return tl.where(magnitude >= 0.015625, normal, subnormal)


@triton.jit
def _tile(Packed, Absmax, Code, rows, cols, n_out, n_in, BLOCKSIZE: tl.constexpr, ROUND1: tl.constexpr,
          ROUND2: tl.constexpr):
    """W[rows, cols] in fp32 as bitsandbytes dequantizes it (code[nibble] * absmax in fp32; the even element in the high
    nibble), rounded to bfloat16 where the weight's dtype (ROUND1) or the gradient's (ROUND2) is; 0 outside W."""
    mask = (rows[:, None] < n_out) & (cols[None, :] < n_in)
    f = rows[:, None].to(tl.int64) * n_in + cols[None, :]
    byte = tl.load(Packed + (f >> 1), mask=mask, other=0).to(tl.int32)
    nibble = tl.where((f & 1) == 0, byte >> 4, byte & 15)
    w = tl.load(Code + nibble) * tl.load(Absmax + f // BLOCKSIZE, mask=mask, other=0.0)
    if ROUND1 or ROUND2:
        w = _round_bf16(w)
    return w, mask


@triton.jit
def _column_max(Packed, Absmax, Code, ColMax, n_out, n_in, BLOCKSIZE: tl.constexpr, ROUND1: tl.constexpr,
                ROUND2: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr):
    rows = tl.program_id(0) * BO + tl.arange(0, BO)
    cols = tl.program_id(1) * BI + tl.arange(0, BI)
    w, mask = _tile(Packed, Absmax, Code, rows, cols, n_out, n_in, BLOCKSIZE, ROUND1, ROUND2)
    tl.atomic_max(ColMax + cols, tl.max(tl.abs(w), axis=0), mask=cols < n_in)


@triton.jit
def _cast_transposed(Packed, Absmax, Code, ColMax, Out, Scale, n_out, n_in, BLOCKSIZE: tl.constexpr,
                     ROUND1: tl.constexpr, ROUND2: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr):
    rows = tl.program_id(0) * BO + tl.arange(0, BO)
    cols = tl.program_id(1) * BI + tl.arange(0, BI)
    w, mask = _tile(Packed, Absmax, Code, rows, cols, n_out, n_in, BLOCKSIZE, ROUND1, ROUND2)
    amax = tl.load(ColMax + cols, mask=cols < n_in, other=1.0)
    scale = tl.where(amax > 0, tl.math.div_rn(amax, 448.0), 1.0)  # quantize_rows' scale, IEEE-rounded as torch's
    q = tl.math.div_rn(w, scale[None, :])
    q = _round_e4m3(tl.minimum(tl.maximum(q, -448.0), 448.0)).to(tl.float8e4nv)
    # W^T[cols, rows]: the tile transposed in registers, each row of W^T written contiguously
    tl.store(Out + cols[:, None].to(tl.int64) * n_out + rows[None, :], tl.trans(q), mask=tl.trans(mask))
    if tl.program_id(0) == 0:
        tl.store(Scale + cols, scale, mask=cols < n_in)


def nf4_to_e4m3_t(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape: list[int], blocksize: int,
                  dtype: torch.dtype, grad_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(W^T in e4m3 [in, out], its scale [1, in]) for a 4-bit weight of `shape` [out, in]: see the module docstring."""
    n_out, n_in = shape
    packed = packed.reshape(-1).view(torch.uint8)
    col_max = torch.zeros(n_in, dtype=torch.float32, device=packed.device)
    out = torch.empty(n_in, n_out, dtype=torch.float8_e4m3fn, device=packed.device)
    scale = torch.empty(1, n_in, dtype=torch.float32, device=packed.device)
    bo, bi = TILE
    grid = (triton.cdiv(n_out, bo), triton.cdiv(n_in, bi))
    meta = dict(BLOCKSIZE=blocksize, ROUND1=ROUNDING[dtype], ROUND2=ROUNDING[grad_dtype], BO=bo, BI=bi)
    _column_max[grid](packed, absmax, code, col_max, n_out, n_in, **meta)
    _cast_transposed[grid](packed, absmax, code, col_max, out, scale, n_out, n_in, **meta)
    return out, scale
