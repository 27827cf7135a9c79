"""Error bounds of FP8 (e4m3) quantization, derived from its precision, for tests against float64.

e4m3 keeps 3 mantissa bits: rounding a normal value moves it by at most 2**-4 of itself; below
the smallest normal (2**-6, after scaling) the grid is absolute, 2**-9 apart, so rounding moves
a value by at most 2**-10 (times the scale). Values are scaled so that the amax lands on 448.
The scaling division happens in float32, one more rounding of 2**-24 relative.
"""

from __future__ import annotations

import torch

REL = 2.0**-4  # largest relative rounding error of a normal e4m3 value
SUBNORMAL = 2.0**-10  # largest absolute rounding error below e4m3's normal range, in units of the scale
FP32 = 2.0**-24  # unit roundoff of float32: the scaling division, the GEMM's accumulation and epilogue
ROUNDING = REL + 2 * FP32  # relative error of one quantization of a normal value, division included


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.double() * scale.double()


def quantization_bound(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Largest ``|dequantize(quantize(x)) - x|`` per element; ``scale`` broadcasts against ``x``."""
    return ROUNDING * x.double().abs() + SUBNORMAL * scale.double()


def linear_bound(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    x_scale: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Largest ``|fp8 linear - (x2d @ weight.T + bias)|`` per output element, [M, N].

    ``x_scale`` is [M, 1] or [], ``weight_scale`` [N, 1] or []. With each operand moved by at
    most ``e = ROUNDING |v| + SUBNORMAL * scale``, ``|x^ w^ - x w| <= (|x| + e_x)(|w| + e_w) - |x||w|``
    per product, summed over K; then the rounding of the GEMM itself.
    """
    abs_x, abs_w = x2d.double().abs(), weight.double().abs()
    x_error = ROUNDING * abs_x + SUBNORMAL * x_scale.double().reshape(-1, 1)
    w_error = ROUNDING * abs_w + SUBNORMAL * weight_scale.double().reshape(-1, 1)
    magnitude = (abs_x + x_error) @ (abs_w + w_error).T
    quantization = magnitude - abs_x @ abs_w.T
    return quantization + gemm_rounding_bound(magnitude, x2d.shape[-1], bias, out_dtype)


def gemm_rounding_bound(
    magnitude: torch.Tensor, k: int, bias: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """Largest error of an FP8 GEMM against the exact product of its dequantized operands.

    ``magnitude`` is ``|x^| @ |w^|.T``. The float32 accumulation and the two scale
    multiplications add (K + 2) float32 roundings of it; the output is rounded to ``out_dtype``
    at most twice (the product, then its sum with the bias), each time by half an ulp or, below
    the normal range, half the smallest subnormal.
    """
    accumulation = (k + 2) * FP32 * magnitude
    info = torch.finfo(out_dtype)
    unit = info.eps / 2
    abs_bias = bias.double().abs() if bias is not None else 0.0
    output = 2 * unit * (1 + unit) * (magnitude + accumulation + abs_bias) + info.smallest_normal * info.eps
    return accumulation + output
