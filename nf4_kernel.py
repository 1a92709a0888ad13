"""Triton kernels for --dense-base fp8_backward_4bit (fp8.py): W^T in e4m3 straight from a bitsandbytes NF4 weight.

    col_max = column_max(packed, absmax, code, [out, in], blocksize)  # once: W is frozen
    wt_q, wt_scale = nf4_to_e4m3_t(packed, absmax, code, col_max, [out, in], blocksize, dtype, grad_dtype)  # each backward

Bit-equal to quantize_rows(dequantize_4bit(W).to(grad_dtype).t()), what fp8_backward's copy holds, without the 16-bit W:
one kernel takes the column maxima (an atomic max per column), the other casts and writes W^T a tile at a time, the
tile transposed in registers so that each row of W^T is stored contiguously. The base is frozen, so its column maxima
are taken once, at load (4 bytes per input column); each backward pass runs only the cast, which reads the packed
nibbles (half a byte per weight) and the fp32 absmax and writes one byte per weight, against ~7 bytes of traffic for
dequantizing to 16 bits and casting the transpose with torch ops (session 12's version: 0.98x the 4-bit base).

A torch.library.triton_op: inside a compiled graph Inductor launches the cast itself (no Python custom-op call per
layer); off CUDA the op is bitsandbytes' dequantization and quantize_rows. The tests run the kernels on the CPU
under Triton's interpreter (TRITON_INTERPRET=1, set before triton is first imported), whose float casts truncate: so
the kernels round with integer arithmetic on the bits, which the GPU computes the same way; another test compiles them
for an sm90 GPU there (Triton's compiler needs none), which the interpreter does not check.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

# (BO, BI, warps, ROWS): a tile of BO rows x BI columns of W (BI even); the column maxima take ROWS rows per program
CONFIG = (32, 64, 4, 512)  # the fastest of bench/nf4_cast.py's sweep on an H200 (session 13)
ROUNDING = {torch.float32: 0, torch.bfloat16: 1}  # the dtypes the kernels round W through (1: to bfloat16)


@triton.jit
def _round_bf16(w, NATIVE: tl.constexpr):
    """w rounded to bfloat16 (to nearest, ties to even), kept in fp32: the GPU's own conversion (NATIVE), or integer
    arithmetic on the bits (Triton's interpreter, whose float casts truncate)."""
    if NATIVE:
        return w.to(tl.bfloat16).to(tl.float32)
    bits = w.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _to_e4m3(x, NATIVE: tl.constexpr):
    """x (|x| <= 448) as float8 e4m3fn, rounded to nearest, ties to even: the GPU's conversion (NATIVE), or rounded on
    the bits first (3 mantissa bits from 2^-6 up, steps of 2^-9 below) so that the interpreter's cast cannot round."""
    if not NATIVE:
        bits = x.to(tl.uint32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
        magnitude = tl.abs(x)
        subnormal = ((magnitude * 512.0 + 12582912.0) - 12582912.0) * 0.001953125  # 1.5 * 2^23: to an even integer
        subnormal = (subnormal.to(tl.uint32, bitcast=True) | (bits & 0x80000000)).to(tl.float32, bitcast=True)  # x's sign
        x = tl.where(magnitude >= 0.015625, normal, subnormal)
    return x.to(tl.float8e4nv)


@triton.jit
def _tile(Packed, Absmax, Code, row0, n_out, n_in, BLOCKSIZE: tl.constexpr, ROUND: tl.constexpr, ALIGNED: tl.constexpr,
          NATIVE: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr):
    """(rows, cols, W[rows, cols] in fp32, in-bounds mask) for rows row0.. and this program's columns, W dequantized as
    bitsandbytes does (code[nibble] * absmax in fp32, the even element in the high nibble), rounded to bfloat16 if
    ROUND; 0 outside W. Each packed byte is loaded once (n_in is even: a row's bytes start at row * n_in / 2). ALIGNED
    (BLOCKSIZE divides n_in and BI divides BLOCKSIZE): one absmax per row of the tile, else one per weight. int32
    offsets: _meta (every launch) checks that W has fewer than 2^31 elements."""
    rows = row0 + tl.arange(0, BO)
    pairs = tl.program_id(1) * (BI // 2) + tl.arange(0, BI // 2)
    in_rows = rows < n_out
    byte = tl.load(Packed + rows[:, None] * (n_in // 2) + pairs[None, :],
                   mask=in_rows[:, None] & (pairs[None, :] < n_in // 2), other=0).to(tl.int32)
    nibble = tl.interleave(byte >> 4, byte & 15)  # [BO, BI]: element 2k from the high nibble of byte k
    cols = tl.program_id(1) * BI + tl.arange(0, BI)
    mask = in_rows[:, None] & (cols[None, :] < n_in)
    if ALIGNED:
        absmax = tl.load(Absmax + rows * (n_in // BLOCKSIZE) + (tl.program_id(1) * BI) // BLOCKSIZE, mask=in_rows, other=0.0)
        w = tl.load(Code + nibble) * absmax[:, None]
    else:
        w = tl.load(Code + nibble) * tl.load(Absmax + (rows[:, None] * n_in + cols[None, :]) // BLOCKSIZE, mask=mask, other=0.0)
    if ROUND:
        w = _round_bf16(w, NATIVE)
    return rows, cols, w, mask


@triton.jit
def _column_max(Packed, Absmax, Code, ColMax, n_out, n_in, BLOCKSIZE: tl.constexpr, ROUND: tl.constexpr,
                ALIGNED: tl.constexpr, NATIVE: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr, ROWS: tl.constexpr):
    """The largest |W| of each column over ROWS rows, BO at a time (kept per element, reduced once), then one atomic max
    per column."""
    running = tl.zeros([BO, BI], dtype=tl.float32)
    for r in range(0, ROWS, BO):
        rows, cols, w, mask = _tile(Packed, Absmax, Code, tl.program_id(0) * ROWS + r, n_out, n_in, BLOCKSIZE, ROUND,
                                    ALIGNED, NATIVE, BO, BI)
        running = tl.maximum(running, tl.abs(w))
    cols = tl.program_id(1) * BI + tl.arange(0, BI)
    tl.atomic_max(ColMax + cols, tl.max(running, axis=0), mask=cols < n_in)


@triton.jit
def _cast_transposed(Packed, Absmax, Code, ColMax, Out, Scale, n_out, n_in, BLOCKSIZE: tl.constexpr,
                     ROUND: tl.constexpr, ALIGNED: tl.constexpr, NATIVE: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr):
    rows, cols, w, mask = _tile(Packed, Absmax, Code, tl.program_id(0) * BO, n_out, n_in, BLOCKSIZE, ROUND, ALIGNED, NATIVE,
                                BO, BI)
    amax = tl.load(ColMax + cols, mask=cols < n_in, other=1.0)
    if ROUND:  # the maxima of the rounded W: rounding is monotone, so the rounded maxima (idempotent where rounded already)
        amax = _round_bf16(amax, NATIVE)
    scale = tl.where(amax > 0, amax * (1.0 / 448.0), 1.0)  # quantize_rows' scale: the fp32 reciprocal's product
    inverse = tl.math.div_rn(1.0, scale)  # one IEEE reciprocal per column, then a product per weight: as quantize_rows
    q = _to_e4m3(tl.minimum(tl.maximum(w * inverse[None, :], -448.0), 448.0), NATIVE)
    # W^T[cols, rows]: the tile transposed in registers, each row of W^T written contiguously
    tl.store(Out + cols[:, None] * n_out + rows[None, :], tl.trans(q), mask=tl.trans(mask))
    if tl.program_id(0) == 0:
        tl.store(Scale + cols, scale, mask=cols < n_in)


def launch(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape: list[int], blocksize: int,
           round_bf16: bool, wrap=lambda kernel: kernel, config: tuple = CONFIG, native: bool | None = None,
           col_max: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The cast over `packed` (uint8, out * in / 2 bytes), after the column maxima (column_max's kernel) unless `col_max`
    holds them already (W is frozen, so Nf4Fp8BackwardLinear takes them once, at load); wrap: torch.library.wrap_triton
    around the cast inside the op; config: (BO, BI, warps, ROWS), CONFIG by default; native: the GPU's own float
    conversions (default: on CUDA)."""
    n_out, n_in = shape
    bo, bi, _, _ = config
    if col_max is None:
        col_max = column_max(packed, absmax, code, shape, blocksize, config, packed.is_cuda if native is None else native)
    out = torch.empty(n_in, n_out, dtype=torch.float8_e4m3fn, device=packed.device)
    scale = torch.empty(1, n_in, dtype=torch.float32, device=packed.device)
    wrap(_cast_transposed)[(triton.cdiv(n_out, bo), triton.cdiv(n_in, bi))](
        packed, absmax, code, col_max, out, scale, n_out, n_in, **_meta(packed, shape, blocksize, round_bf16, config, native))
    return out, scale


@torch.no_grad()
def column_max(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape: list[int], blocksize: int,
               config: tuple = CONFIG, native: bool | None = None) -> torch.Tensor:
    """max |W| over each column of the NF4 weight, in fp32, W not rounded (the cast rounds the maxima as it rounds W):
    the _column_max kernel on CUDA (or under the interpreter), bitsandbytes' fp32 dequantization elsewhere."""
    if packed.device.type != "cuda" and native is None:
        weight = torch.ops.bitsandbytes.dequantize_4bit(packed, absmax, blocksize, "nf4", shape, torch.float32)
        return weight.abs().amax(dim=0)
    n_out, n_in = shape
    _, bi, _, rows = config
    col_max = torch.zeros(n_in, dtype=torch.float32, device=packed.device)
    _column_max[(triton.cdiv(n_out, rows), triton.cdiv(n_in, bi))](packed, absmax, code, col_max, n_out, n_in, ROWS=rows,
                                                                    **_meta(packed, shape, blocksize, False, config, native))
    return col_max


def _meta(packed: torch.Tensor, shape: list[int], blocksize: int, round_bf16: bool, config: tuple, native: bool | None) -> dict:
    """The kernels' compile-time arguments (ROWS apart): ALIGNED where blocks align with the tiles' columns; NATIVE
    (the GPU's own float conversions) by default on CUDA. Both kernels' launches pass here, so W's size is checked here:
    the kernels' offsets are int32."""
    n_out, n_in = shape
    if n_out * n_in >= 2**31:
        raise ValueError(f"nf4_kernel: a {n_out} x {n_in} weight has 2^31 elements or more (int32 offsets)")
    bo, bi, warps, _ = config
    native = packed.is_cuda if native is None else native
    return dict(BLOCKSIZE=blocksize, ROUND=int(round_bf16), ALIGNED=int(n_in % blocksize == 0 and blocksize % bi == 0),
                NATIVE=int(native), BO=bo, BI=bi, num_warps=warps)


def fp32_absmax(state) -> torch.Tensor:
    """A bitsandbytes QuantState's absmax per block in fp32, what the kernels read: with double quantization the absmax
    values are themselves 8-bit, undone as dequantize_4bit undoes them."""
    if not state.nested:
        return state.absmax.float()
    from bitsandbytes import functional as F

    return (F.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()


def by_torch(packed, absmax, code, shape, blocksize, dtype, grad_dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernels compute, by bitsandbytes' dequantization and quantize_rows (the CPU; float16)."""
    import fp8

    weight = torch.ops.bitsandbytes.dequantize_4bit(packed, absmax, blocksize, "nf4", shape, dtype)
    wt_q, wt_scale = fp8.quantize_rows(weight.to(grad_dtype).t())
    return wt_q, wt_scale.reshape(1, -1)


@triton_op("llama_qa::nf4_to_e4m3_t", mutates_args=())
def nf4_to_e4m3_t(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, col_max: torch.Tensor, shape: list[int],
                  blocksize: int, dtype: torch.dtype, grad_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(W^T in e4m3 [in, out], its scale [1, in]) from a bitsandbytes NF4 weight of `shape` [out, in]: packed nibbles
    (uint8), fp32 absmax per `blocksize` weights (double quantization undone), the 16-entry code, W's column maxima
    (column_max: computed once, W being frozen; the CPU path recomputes them). W is rounded to
    `dtype` (the weight's) then `grad_dtype`, as dequantize_4bit(...).to(grad_dtype) gives it, and W^T is cast as
    quantize_rows(W.t()) casts it: bit-equal to that."""
    if packed.device.type != "cuda" or dtype not in ROUNDING or grad_dtype not in ROUNDING:  # float16 rounding: not written
        return by_torch(packed, absmax, code, shape, blocksize, dtype, grad_dtype)  # (a branch Inductor traces too)
    round_bf16 = torch.bfloat16 in (dtype, grad_dtype)  # fp32 -> bf16 -> fp32 is exact; bf16 twice is bf16 once
    return launch(packed, absmax, code, shape, blocksize, round_bf16, wrap_triton, col_max=col_max)
