"""FP8 matmuls for the frozen base in training (--dense-base fp8, --dense-base fp8_backward).

Each base linear layer holds its weight twice in float8 e4m3, with one fp32 scale per row: W (out x in, a scale per
output row) for the forward pass, W^T (in x out, a scale per input column of W) for the input gradient, so both
products scale along the dimensions they keep and the 2 bytes per weight equal the 16-bit copy's. The layer's input
(forward) and its output gradient (backward) are cast to e4m3 with one scale per token row, and torch._scaled_mm
multiplies the two at FP8 rate (2x bf16's on Hopper), writing 16-bit results. Nothing per token is saved for the
backward pass (a frozen weight needs no input). The LoRA branch beside it stays 16-bit.

This is a change of numerics, not a copy: e4m3 keeps 3 mantissa bits, so W is the NF4 values rounded again (and the
inputs rounded too). BENCHMARKS.md has its loss against the 16-bit copy's.

--dense-base fp8_backward keeps the forward pass exact: the layer holds the 16-bit weight (the NF4 values) for the
forward product and only W^T in e4m3 for the input gradient, so the loss (and everything the forward computes) is the
16-bit copy's, and only the gradient flowing back through each frozen base weight is rounded (the product that is half
of the base's FLOPs). 3 bytes per base weight instead of 2.

--dense-base fp8_backward_4bit does the same over the 4-bit base itself, for cards where no copy fits: the forward pass
is bitsandbytes' own 4-bit product, and the backward pass casts W^T to e4m3 straight from the packed NF4 weight, bit-equal
to fp8_backward's copy (so the same rounded values), and multiplies in FP8. No bytes beyond the 4-bit weights; a cast of
each weight per backward pass instead: on CUDA two Triton kernels (nf4_kernel.py), elsewhere bitsandbytes'
dequantization and quantize_rows.
"""

from __future__ import annotations

import functools

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): t as contiguous e4m3 with one fp32 scale per row (shape [rows, 1]), t ~= q * scale. A row's largest
    magnitude maps to 448; an all-zero row gets scale 1."""
    amax = t.abs().amax(dim=-1, keepdim=True).float()
    # times the fp32 reciprocal, not divided by 448: what CUDA computes for a tensor / scalar (a reciprocal's product,
    # BinaryDivTrueKernel.cu), here on every device, so that the CPU, the GPU and nf4_kernel all give the same scales
    scale = torch.where(amax > 0, amax * (1.0 / E4M3_MAX), torch.ones_like(amax))
    # t times 1 / scale (one IEEE reciprocal per row), not t / scale: a product per element, as nf4_kernel computes it
    q = (t.float() * torch.reciprocal(scale)).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).contiguous()
    return q, scale


def fp8_matmul(a: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a [n, k] (16-bit) @ b.T, b given as b_q [m, k] e4m3 with b_scale [1, m]: a is cast to e4m3 row by row here."""
    a_q, a_scale = quantize_rows(a)
    return torch._scaled_mm(a_q, b_q.t(), scale_a=a_scale, scale_b=b_scale, out_dtype=out_dtype)


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_q, w_scale, wt_q, wt_scale):
        ctx.save_for_backward(wt_q, wt_scale)
        return fp8_matmul(x.reshape(-1, x.shape[-1]), w_q, w_scale, x.dtype).reshape(*x.shape[:-1], w_q.shape[0])

    @staticmethod
    def backward(ctx, grad):
        wt_q, wt_scale = ctx.saved_tensors
        grad_x = fp8_matmul(grad.reshape(-1, grad.shape[-1]), wt_q, wt_scale, grad.dtype)
        return grad_x.reshape(*grad.shape[:-1], wt_q.shape[0]), None, None, None, None


class _Fp8BackwardLinear(torch.autograd.Function):
    """x @ W.T exactly (16-bit); the input gradient in FP8 (W^T in e4m3 scaled per input column, the gradient per row)."""

    @staticmethod
    def forward(ctx, x, weight, wt_q, wt_scale):
        ctx.save_for_backward(wt_q, wt_scale)
        return torch.nn.functional.linear(x, weight)

    @staticmethod
    def backward(ctx, grad):
        wt_q, wt_scale = ctx.saved_tensors
        grad_x = fp8_matmul(grad.reshape(-1, grad.shape[-1]), wt_q, wt_scale, grad.dtype)
        return grad_x.reshape(*grad.shape[:-1], wt_q.shape[0]), None, None, None


class Fp8Linear(torch.nn.Module):
    """A frozen linear layer computing in FP8 (see the module docstring); built from a 16-bit weight [out, in].
    exact_forward=True (--dense-base fp8_backward): the forward product stays 16-bit with `weight` itself (kept, not
    copied), only the input gradient is FP8."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, exact_forward: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.exact_forward = exact_forward
        if self.in_features % 16 or self.out_features % 16:
            raise ValueError(f"FP8 matmuls need both sizes of a weight divisible by 16, got {tuple(weight.shape)}")
        with torch.no_grad():
            wt_q, wt_scale = quantize_rows(weight.t().contiguous())
            # buffers, not parameters: frozen, left out of state dicts and optimizers, and not mistaken by PEFT for the
            # dtype its LoRA weights should take
            if exact_forward:
                self.register_buffer("weight", weight.detach(), persistent=False)
            else:
                w_q, w_scale = quantize_rows(weight)
                self.register_buffer("weight_q", w_q, persistent=False)
                self.register_buffer("weight_scale", w_scale.reshape(1, -1), persistent=False)
        self.register_buffer("weight_t_q", wt_q, persistent=False)
        self.register_buffer("weight_t_scale", wt_scale.reshape(1, -1), persistent=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.exact_forward:
            y = _Fp8BackwardLinear.apply(x, self.weight, self.weight_t_q, self.weight_t_scale)
        else:
            y = _Fp8Linear.apply(x, self.weight_q, self.weight_scale, self.weight_t_q, self.weight_t_scale)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dequantized(self) -> torch.Tensor:
        """The weight the forward product multiplies by, in fp32 (for tests and error figures)."""
        if self.exact_forward:
            return self.weight.float()
        return self.weight_q.float() * self.weight_scale.reshape(-1, 1)

    def extra_repr(self) -> str:
        how = "16-bit forward, e4m3 input gradient" if self.exact_forward else "e4m3 row-scaled"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {how}"


@functools.cache
def _nf4_fp8_backward() -> type:
    """bitsandbytes' MatMul4Bit with its backward in FP8: the forward (its 4-bit product) unchanged, the input gradient
    from W^T in e4m3 per input column (nf4_kernel.nf4_to_e4m3_t, from the packed weight) times the gradient cast per row.
    Made on first use: importing bitsandbytes and triton is only needed here."""
    from bitsandbytes.autograd._functions import MatMul4Bit

    from nf4_kernel import fp32_absmax, nf4_to_e4m3_t  # registers the op (and imports triton): only here

    class Nf4Fp8Backward(MatMul4Bit):
        @staticmethod
        def forward(ctx, A, B, out, bias, quant_state, col_max):
            ctx.col_max = col_max  # W's column maxima (frozen), as bitsandbytes keeps B: not a saved activation
            return MatMul4Bit.forward(ctx, A, B, out, bias, quant_state)

        @staticmethod
        def backward(ctx, grad):
            if ctx.is_empty or ctx.needs_input_grad[3]:  # empty input, or a bias to train: bitsandbytes' own backward
                return *MatMul4Bit.backward(ctx, grad), None
            if not ctx.needs_input_grad[0]:
                return None, None, None, None, None, None
            state = ctx.state
            wt_q, wt_scale = nf4_to_e4m3_t(ctx.tensors[1].view(torch.uint8), fp32_absmax(state), state.code.float(),
                                           ctx.col_max, list(state.shape), state.blocksize, state.dtype, grad.dtype)
            grad_x = fp8_matmul(grad.reshape(-1, grad.shape[-1]), wt_q, wt_scale, grad.dtype)
            return grad_x.reshape(*grad.shape[:-1], wt_q.shape[0]), None, None, None, None, None

    return Nf4Fp8Backward


class Nf4Fp8BackwardLinear(torch.nn.Module):
    """A frozen bitsandbytes 4-bit linear layer (kept inside, its packed weight not copied) whose input gradient is
    computed in FP8 (--dense-base fp8_backward_4bit): the forward is Linear4bit.forward's training path, product for
    product."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer
        self.function = _nf4_fp8_backward()  # made here, not where torch.compile traces (it cannot trace a class statement)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        if self.in_features % 16 or self.out_features % 16:
            raise ValueError(f"FP8 matmuls need both sizes of a weight divisible by 16, got {(self.out_features, self.in_features)}")
        if layer.weight.quant_type != "nf4":
            raise ValueError(f"--dense-base fp8_backward_4bit reads NF4 weights, not {layer.weight.quant_type}")
        from nf4_kernel import column_max, fp32_absmax

        state = layer.weight.quant_state  # the frozen W's column maxima, taken once (each backward pass casts with them)
        self.register_buffer("col_max", column_max(layer.weight.data.view(torch.uint8), fp32_absmax(state), state.code.float(),
                                                   list(state.shape), state.blocksize), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if not layer.compute_type_is_set:
            layer.set_compute_type(x)
            layer.compute_type_is_set = True
        dtype = x.dtype
        x = x.to(layer.compute_dtype) if layer.compute_dtype is not None else x
        y = self.function.apply(x, layer.weight, None, None, layer.weight.quant_state, self.col_max)
        return (y if layer.bias is None else y + layer.bias.to(y.dtype)).to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, 4-bit forward, e4m3 input gradient"


def fp8_backward_4bit(model: torch.nn.Module) -> int:
    """Wrap every bitsandbytes 4-bit linear layer of `model` (LoRA's base layers) in an Nf4Fp8BackwardLinear; returns
    the count. Nothing is copied: each wrapper holds the layer itself."""
    import generation

    places = generation.linear4bit_modules(model)
    for parent, name, layer in places:
        setattr(parent, name, Nf4Fp8BackwardLinear(layer))
    return len(places)


def check_fp8_device(device: torch.device | str) -> str | None:
    """Why FP8 matmuls cannot run on `device` (None when they can): the CPU can (slowly); CUDA needs compute capability
    9.0 (Hopper) or newer for row-wise scaled FP8 products."""
    device = torch.device(device)
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"FP8 matmuls run on CUDA or the CPU, not {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (9, 0):
        name = torch.cuda.get_device_name(device)
        return f"{name} (compute capability {major}.{minor}) has no row-wise scaled FP8 matmul: it needs 9.0+ (Hopper)"
    return None


@torch.no_grad()
def to_fp8(model: torch.nn.Module, layers: list[torch.nn.Linear], exact_forward: bool = False) -> int:
    """Replace each of `layers` (frozen 16-bit linear layers, wherever they sit in `model`, e.g. as a LoRA layer's
    base_layer) by an Fp8Linear of its weight, one at a time so that only one layer's copies exist twice; returns the
    count. The list is emptied: the 16-bit weights are freed as their layers go (exact_forward: kept, in the new layer)."""
    wanted = {id(m) for m in layers}
    places = [(parent, name) for parent in model.modules() for name, child in parent.named_children() if id(child) in wanted]
    if len(places) != len(wanted):
        raise ValueError(f"to_fp8: found {len(places)} of the {len(wanted)} layers in the model")
    layers.clear()
    for parent, name in places:
        dense = getattr(parent, name)
        setattr(parent, name, Fp8Linear(dense.weight, dense.bias, exact_forward))
        del dense
    return len(places)
