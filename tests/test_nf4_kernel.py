"""nf4_kernel: W^T in e4m3 straight from bitsandbytes' packed NF4 weight (--dense-base fp8_backward_4bit's backward).

The kernels must write what fp8_backward's copy holds, bit for bit: quantize_rows(dequantize_4bit(W).to(dtype).t()).
On the CPU they run under Triton's interpreter, which must be switched on before triton is first imported: the checks
below run in a fresh process (this file run as a script with TRITON_INTERPRET=1). The gpu test runs them compiled.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fp8  # noqa: E402

# (out, in, weight dtype, gradient dtype, blocksize, double quantization): partial tiles both ways (48 x 80 against the
# two configs' 32 x 64 and 16 x 32 tiles), both roundings, bitsandbytes' default blocksize and another, with and without
# quantized absmax
CASES = [
    (96, 192, torch.bfloat16, torch.bfloat16, 64, True),
    (64, 128, torch.float32, torch.bfloat16, 64, True),
    (48, 80, torch.bfloat16, torch.float32, 64, False),
    (32, 256, torch.float32, torch.float32, 128, True),
]


def nf4_case(out_features, in_features, dtype, blocksize, nested, device="cpu", seed=0):
    """A weight with a zero row, a zero column, and rows 1e-3 and 100 times the rest: e4m3 subnormals."""
    from bitsandbytes import functional as F

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) * 0.05
    w[3], w[:, 5] = 0, 0
    w[7] *= 1e-3
    w[9] *= 100
    q, state = F.quantize_4bit(w.to(device, dtype), blocksize=blocksize, quant_type="nf4", compress_statistics=nested)
    import nf4_kernel

    return q, state, nf4_kernel.fp32_absmax(state)


def by_bitsandbytes(q, state, grad_dtype):
    """What fp8_backward's copy holds: bitsandbytes' 16-bit W, then quantize_rows of its transpose."""
    from bitsandbytes import functional as F

    wt_q, wt_scale = fp8.quantize_rows(F.dequantize_4bit(q, state).to(grad_dtype).t())
    return wt_q, wt_scale.reshape(1, -1)


def assert_bit_equal(got, want):
    assert got[0].dtype == want[0].dtype == torch.float8_e4m3fn and got[0].shape == want[0].shape
    assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8))
    assert got[1].shape == want[1].shape and torch.equal(got[1], want[1])


def interpreted_checks():
    """Run under TRITON_INTERPRET=1 (a fresh process): the kernels bit-equal to bitsandbytes + quantize_rows."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import nf4_kernel

    for out_features, in_features, dtype, grad_dtype, blocksize, nested in CASES:
        q, state, absmax = nf4_case(out_features, in_features, dtype, blocksize, nested)
        want = by_bitsandbytes(q, state, grad_dtype)
        weight = (q, absmax, state.code.float(), list(state.shape), blocksize)
        col_max = nf4_kernel.column_max(*weight)  # bitsandbytes' fp32 W on the CPU, unrounded (as at load)
        for config in (nf4_kernel.CONFIG, (16, 32, 2, 32)):  # the second: several programs per column (atomic maxima)
            assert torch.equal(nf4_kernel.column_max(*weight, config=config, native=False), col_max)  # the kernel's
            for given in (None, col_max):  # the maxima taken by the kernel in the launch, or given
                assert_bit_equal(nf4_kernel.launch(*weight, torch.bfloat16 in (dtype, grad_dtype), config=config,
                                                   col_max=given), want)
        assert_bit_equal(nf4_kernel.nf4_to_e4m3_t(*weight[:3], col_max, *weight[3:], dtype, grad_dtype), want)
        values = want[0].float()
        if not nested:  # (double quantization of the absmax loses row 7's scale: its values come out far larger)
            assert ((values != 0) & (values.abs() < 2**-6)).sum() >= 10  # e4m3 subnormals (row 7 of W)
        assert (values[:, 3] == 0).all() and (want[1][0, 5] == 1.0)  # a zero row of W; a zero column's scale is 1
    print("nf4 kernel interpreted checks passed")


def test_kernels_under_the_triton_interpreter_equal_bitsandbytes_and_quantize_rows():
    """Four weights (partial tiles, zero rows and columns, e4m3 subnormals, both roundings, two blocksizes,
    double quantization on and off): W^T and its scales bit-equal to what fp8_backward's copy holds."""
    pytest.importorskip("triton")
    env = os.environ | {"TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "nf4 kernel interpreted checks passed" in proc.stdout


def test_the_op_on_the_cpu_is_bitsandbytes_and_quantize_rows_and_traces_with_fake_tensors():
    """The op on the CPU is the torch path; traced with fake tensors (as torch.compile does) it gives the shapes."""
    pytest.importorskip("triton")
    import nf4_kernel

    q, state, absmax = nf4_case(48, 80, torch.bfloat16, 64, True)
    col_max = nf4_kernel.column_max(q, absmax, state.code.float(), [48, 80], 64)
    assert_bit_equal(nf4_kernel.nf4_to_e4m3_t(q, absmax, state.code.float(), col_max, [48, 80], 64, torch.bfloat16,
                                              torch.bfloat16), by_bitsandbytes(q, state, torch.bfloat16))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        wt_q, wt_scale = nf4_kernel.nf4_to_e4m3_t(mode.from_tensor(q), mode.from_tensor(absmax), mode.from_tensor(state.code),
                                                  mode.from_tensor(col_max), [48, 80], 64, torch.bfloat16, torch.bfloat16)
    assert (wt_q.shape, wt_q.dtype, wt_scale.shape, wt_scale.dtype) == ((80, 48), torch.float8_e4m3fn, (1, 80), torch.float32)


def test_kernels_compile_for_hopper_on_the_cpu():
    """Both kernels compile for an sm90 GPU here, without one (Triton's compiler, down to a cubin), in every combination of
    the flags the launches pass: the interpreter above runs code the GPU compiler may refuse (session 15 met a kernel the
    interpreter ran and the compiler rejected). NATIVE rounds W to bfloat16 with the GPU's own conversion (cvt.rn.bf16);
    the cast writes e4m3 with the GPU's saturating conversion either way."""
    pytest.importorskip("triton")
    import triton
    from triton.backends.compiler import GPUTarget

    import nf4_kernel

    types = {"Packed": "*u8", "Absmax": "*fp32", "Code": "*fp32", "ColMax": "*fp32", "Out": "*fp8e4nv", "Scale": "*fp32"}
    kernels = {nf4_kernel._cast_transposed: ("Packed Absmax Code ColMax Out Scale n_out n_in", {}),
               nf4_kernel._column_max: ("Packed Absmax Code ColMax n_out n_in", {"ROWS": 512})}
    for kernel, (names, extra) in kernels.items():
        for aligned in (0, 1):
            for native in (0, 1):
                round_bf16 = int(kernel is nf4_kernel._cast_transposed)  # the cast rounds (bfloat16); the maxima do not
                constexprs = dict(extra, BLOCKSIZE=64, ROUND=round_bf16, ALIGNED=aligned, NATIVE=native, BO=32, BI=64)
                signature = {n: types.get(n, "i32") for n in names.split()} | dict.fromkeys(constexprs, "constexpr")
                source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
                ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
                assert ("cvt.rn.bf16.f32" in ptx) == bool(native and round_bf16), (kernel.__name__, constexprs)
                assert ("cvt.rn.satfinite.e4m3x2.f32" in ptx) == (kernel is nf4_kernel._cast_transposed), kernel.__name__


@pytest.mark.gpu
def test_kernels_on_cuda_equal_bitsandbytes_at_llama_7b_shapes_and_beat_the_torch_cast():
    """Compiled on the GPU: bit-equal to bitsandbytes' dequantization + quantize_rows at Llama-2-7B's three weight
    shapes (launched directly, through the op, inside torch.compile; the GPU's own float conversions and the
    interpreter's rounding on the bits; one absmax per tile row and one per weight), and faster than that torch path
    (the reason the kernels exist); the cast alone, given the column maxima taken at load, faster still."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from bitsandbytes import functional as F

    import nf4_kernel

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    from nf4_cast import seconds_per_call

    compiled = torch.compile(nf4_kernel.nf4_to_e4m3_t, fullgraph=True)
    for out_features, in_features in ((4096, 4096), (11008, 4096), (4096, 11008)):
        q, state, absmax = nf4_case(out_features, in_features, torch.bfloat16, 64, True, device="cuda")
        weight = (q, absmax, state.code.float(), [out_features, in_features], 64)
        col_max = nf4_kernel.column_max(*weight)
        args = (*weight[:3], col_max, *weight[3:], torch.bfloat16, torch.bfloat16)
        want = by_bitsandbytes(q, state, torch.bfloat16)
        assert torch.equal(col_max, torch.ops.bitsandbytes.dequantize_4bit(*weight[:2], 64, "nf4", weight[3], torch.float32).abs().amax(0))
        got = {"both kernels": nf4_kernel.launch(*weight, True), "op": nf4_kernel.nf4_to_e4m3_t(*args),
               "compiled": compiled(*args), "cast, maxima given": nf4_kernel.launch(*weight, True, col_max=col_max),
               "rounded on the bits": nf4_kernel.launch(*weight, True, native=False),
               "unaligned tile": nf4_kernel.launch(*weight, True, config=(8, 128, 2, 256)),
               "aligned tile": nf4_kernel.launch(*weight, True, config=(16, 64, 2, 256))}
        times = {"both kernels": seconds_per_call(nf4_kernel.launch, *weight, True, calls=20),
                 "the cast, maxima given": seconds_per_call(functools.partial(nf4_kernel.launch, *weight, True, col_max=col_max), calls=20),
                 "compiled op": seconds_per_call(compiled, *args, calls=20),
                 "torch": seconds_per_call(by_bitsandbytes, q, state, torch.bfloat16, calls=20),
                 "bnb dequantize alone": seconds_per_call(F.dequantize_4bit, q, state, calls=20)}
        differ = {k: ((v[0].view(torch.uint8) != want[0].view(torch.uint8)).sum().item(), (v[1] != want[1]).sum().item())
                  for k, v in got.items()}
        print(f"nf4 -> e4m3 W^T {out_features}x{in_features} ({torch.cuda.get_device_name()}): "
              + ", ".join(f"{k} {t * 1e6:.0f} us" for k, t in times.items()) + f"; (values, scales) differing: {differ}")
        for v in got.values():
            assert_bit_equal(v, want)
        assert times["the cast, maxima given"] < times["both kernels"] < times["torch"]


if __name__ == "__main__":
    interpreted_checks()
