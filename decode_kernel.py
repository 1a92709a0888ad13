"""A Triton kernel for the decode step's attention (issue 13): one query per row against that row's stretch of the cache.

    out = decode_attention(q, k, v, starts, lengths, scale)   # q (rows, heads, dim); k, v (rows * length, kv_heads, dim)

Row r's query attends to the flattened cache positions starts[r] .. starts[r] + lengths[r] (its first real prompt token
to the token fed now), the layout generation.relayout_cache makes; GQA where kv_heads < heads. One program per (row,
head) streams that stretch once in blocks of BLOCK_N positions, an online softmax in fp32, each key and value read once:
the bytes the step must read and no more. The products run on the tensor cores with the query repeated over 16 rows
(the smallest tl.dot tile; FlashAttention computes 128), so Triton software-pipelines the loads that feed them: 89% of
an H200's bandwidth at 204 rows of ~360 cached positions, against 65-72% for the same loop on the CUDA cores (dropped)
and 46% for FlashAttention's kernel (bench/decode_attention.py, session 10).

Why: FlashAttention's variable-length kernel (the flash engines' first kernel) computes one query row as a tile of 128,
and reached 42-47% of an H200's memory bandwidth on this work (bench/decode_attention.py, session 8), the largest item
of a decode step. Registered as an opaque torch.library custom op (llama_qa::decode_attention): torch.compile calls it
as it is (Inductor recompiling it failed on the GPU, session 10).

On a CPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, set before triton is first imported): the
tests check it there against attention written out by hand, and the engine against the static one.
"""

from __future__ import annotations

import functools

import torch

# (BLOCK_N, num_warps, num_stages): the best of bench/decode_attention.py's sweep at 204 rows (H200, session 10)
CONFIG = (64, 4, 3)
DOT_ROWS = 16  # the smallest tl.dot tile; row 0 is kept


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def dot_kernel(Q, K, V, Out, Starts, Lengths, scale_log2,
                   stride_qr, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_or, stride_oh,
                   GROUP: tl.constexpr, DIM: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
        row, head = tl.program_id(0), tl.program_id(1)
        kv_head = head // GROUP
        start = tl.load(Starts + row).to(tl.int64)
        length = tl.load(Lengths + row)
        d = tl.arange(0, DIM)
        q = tl.load(Q + row * stride_qr + head * stride_qh + tl.zeros([ROWS], tl.int32)[:, None] + d[None, :])  # ROWS copies
        k_base, v_base = K + kv_head * stride_kh, V + kv_head * stride_vh
        m = tl.full([ROWS], float("-inf"), tl.float32)
        den = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, DIM], tl.float32)
        for n0 in range(0, length, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            valid = n < length
            t = start + n
            k = tl.load(k_base + t[:, None] * stride_kt + d[None, :], mask=valid[:, None], other=0.0)
            v = tl.load(v_base + t[:, None] * stride_vt + d[None, :], mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale_log2  # (ROWS, BLOCK_N), fp32, scores in log2 units
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            den = den * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        out = acc / den[:, None]
        first = tl.arange(0, ROWS)[:, None] == 0
        tl.store(Out + row * stride_or + head * stride_oh + tl.zeros([ROWS], tl.int32)[:, None] + d[None, :],
                 out.to(Out.dtype.element_ty), mask=first)

    return dot_kernel


_FITTED: dict[tuple, tuple] = {}  # (config, dim, dtype, device) -> the config that fit the card's shared memory


def smaller_configs(config: tuple) -> list[tuple]:
    """config, then fewer pipeline stages, then half the positions per block: what to try on a card with less shared
    memory than an H100/H200 (3 stages of 64 keys and values x 128 dims in bf16 take 96 KB; an sm86/sm89 card has ~100)."""
    block_n, warps, stages = config
    tries = [(block_n, warps, s) for s in range(stages, 0, -1)]
    return tries + ([(block_n // 2, warps, 1)] if block_n > 16 else [])


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, scale: float,
            config: tuple) -> torch.Tensor:
    from triton.runtime.errors import OutOfResources

    rows, heads, dim = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    key = (config, dim, q.dtype, q.device)
    for block_n, warps, stages in [_FITTED[key]] if key in _FITTED else smaller_configs(config):
        try:
            _kernel()[(rows, heads)](
                q, k, v, out, starts, lengths, scale * 1.4426950408889634,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
                GROUP=heads // k.shape[1], DIM=dim, BLOCK_N=block_n, ROWS=DOT_ROWS, num_warps=warps, num_stages=stages)
        except OutOfResources:
            continue
        _FITTED[key] = (block_n, warps, stages)
        return out
    raise RuntimeError(f"decode_attention: no launch config from {config} fits this card's shared memory (head dim {dim})")


# An opaque custom op: torch.compile calls it as it is (Triton's own JIT), rather than recompiling the kernel in Inductor
@torch.library.custom_op("llama_qa::decode_attention", mutates_args=())
def _decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
                         scale: float, block_n: int, warps: int, stages: int) -> torch.Tensor:
    return _launch(q, k, v, starts, lengths, scale, (block_n, warps, stages))


@_decode_attention_op.register_fake
def _(q, k, v, starts, lengths, scale, block_n, warps, stages):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor) -> None:
    """The kernel's contract, said before it reads out of bounds (no host sync: shapes and dtypes only)."""
    rows, heads, dim = q.shape
    if k.dim() != 3 or k.shape != v.shape or k.shape[2] != dim or heads % k.shape[1]:
        raise ValueError(f"decode_attention: k and v must be (positions, kv_heads, {dim}) with heads ({heads}) a multiple of "
                         f"kv_heads (got k {tuple(k.shape)}, v {tuple(v.shape)})")
    if dim & (dim - 1):
        raise ValueError(f"decode_attention: head dim must be a power of two (got {dim})")
    if k.stride(2) != 1 or v.stride(2) != 1 or q.stride(2) != 1:
        raise ValueError("decode_attention: the head dim of q, k and v must be contiguous")
    if starts.shape[0] < rows or lengths.shape[0] != rows or starts.dtype != torch.int32 or lengths.dtype != torch.int32:
        raise ValueError(f"decode_attention: starts (>= {rows}) and lengths ({rows}) must be int32 per row "
                         f"(got {tuple(starts.shape)} {starts.dtype}, {tuple(lengths.shape)} {lengths.dtype})")


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
                     scale: float | None = None, config: tuple | None = None) -> torch.Tensor:
    """(rows, heads, dim): row r's query attending to k/v positions starts[r] .. starts[r] + lengths[r] (a row of length 0
    gives NaN: the callers always include the token fed now). scale None: 1 / sqrt(dim). config: (BLOCK_N, num_warps,
    num_stages), CONFIG by default."""
    check(q, k, v, starts, lengths)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _decode_attention_op(q, k, v, starts, lengths, scale, *(config or CONFIG))


def available() -> bool:
    """Whether Triton imports here (it comes with CUDA builds of torch and with liger-kernel)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
