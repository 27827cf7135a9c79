"""The Triton weight-only GEMM against a float64 reference (CUDA only)."""

import pytest
import torch

from fp8_compile import ops

from conftest import CUDA

pytestmark = CUDA


@pytest.mark.parametrize("m", [1, 2, 7, 64, 300])
@pytest.mark.parametrize("n, k", [(3072, 3072), (64, 4096), (1000, 520)])
@pytest.mark.parametrize("granularity", ["per_row", "per_tensor"])
def test_weight_only_matches_float64(m, n, k, granularity):
    torch.manual_seed(m + n + k)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    wq, scale = ops.quantize_weight(w, granularity)
    out = ops.weight_only_linear(x, wq, scale, bias)
    ref = x.double() @ (wq.double() * scale.double()).T + bias.double()
    # bf16 activations and output: ~2**-8 relative; the weight is used exactly as quantized
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 2**-7
