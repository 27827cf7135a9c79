"""The Triton block-scaled FP8 GEMM and the grouped FP8 expert GEMM on a GPU (CUDA only).

Both are compared with the CPU reference path on the same quantized operands, in float64:
only float32 accumulation order and the bf16 output rounding differ (2**-8 relative).
"""

import pytest
import torch

from fp8_compile.blockwise import block_fp8_linear, expand_block_scales, quantize_activation_groups, quantize_weight_blocks
from fp8_compile.moe import grouped_fp8_linear, has_grouped_fp8_gemm, quantize_expert_weight
from fp8_compile.ops import quantize_activation

from conftest import CUDA

pytestmark = CUDA


def dequantize(q, scale, block):
    return q.double() * expand_block_scales(scale.double(), tuple(q.shape), block)


@pytest.mark.parametrize("m", [1, 16, 300])
@pytest.mark.parametrize("n, k", [(3072, 3072), (64, 4096), (1000, 520)])
@pytest.mark.parametrize("bias", [False, True])
def test_triton_block_gemm_matches_float64(m, n, k, bias):
    torch.manual_seed(m + n + k)
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda") * 2
    w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
    b = torch.randn(n, dtype=torch.bfloat16, device="cuda") if bias else None
    wq, w_scale = quantize_weight_blocks(w, (128, 128))
    out = block_fp8_linear(x, wq, w_scale, b, 128, 128)  # the Triton kernel on CUDA
    xq, x_scale = quantize_activation_groups(x, 128)
    exact = dequantize(xq, x_scale, (1, 128)) @ dequantize(wq, w_scale, (128, 128)).T + (b.double() if bias else 0)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    assert ((out.double() - exact).norm() / exact.norm()).item() < 2**-7


@pytest.mark.parametrize("grouped", [False, True])
def test_expert_gemm_matches_float64(grouped):
    if grouped and not has_grouped_fp8_gemm(torch.device("cuda")):
        pytest.skip("torch._scaled_grouped_mm needs an SM90 GPU")
    torch.manual_seed(0)
    experts, n, k = 8, 512, 256
    counts = torch.tensor([0, 37, 5, 64, 0, 1, 100, 13])  # empty experts and odd group sizes
    offsets = torch.cumsum(counts, 0).to(torch.int32).cuda()
    x = torch.randn(int(counts.sum()), k, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(experts, n, k, dtype=torch.bfloat16, device="cuda") * 0.05
    wq, scale = quantize_expert_weight(w)
    out = grouped_fp8_linear(x, wq, scale, offsets, fast_accum=False, grouped=grouped)
    expert_of_row = torch.repeat_interleave(torch.arange(experts), counts).cuda()
    xq, x_scale = quantize_activation(x, "per_row")
    w_rows = (wq.double() * scale.double()[..., None])[expert_of_row]  # [S, N, K]
    exact = torch.einsum("sk,snk->sn", xq.double() * x_scale.double(), w_rows)
    assert ((out.double() - exact).norm() / exact.norm()).item() < 2**-7
