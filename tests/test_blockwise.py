"""Block-wise FP8 (weight_block_size): quantization, the block-scaled GEMM, models, the compiled path.

Bounds: every block and every activation group is scaled so that its amax lands on 448, so
each element is rounded once to e4m3 (2**-4 relative, or 2**-10 of its scale below e4m3's
normal range); the GEMM of two such operands is bounded per term as in test_ops.py. Against
the float64 product of the *dequantized* operands (the same numbers the kernel multiplies) only
the float32 accumulation and the final bf16 rounding remain: 2**-8 relative.
"""

import re

import pytest
import torch
import torch.nn as nn
from torch._inductor.utils import run_and_get_code

import fp8_compile
from fp8_compile.blockwise import (
    BlockScaledLinear,
    block_fp8_linear,
    expand_block_scales,
    quantize_activation_groups,
    quantize_weight_blocks,
)

from conftest import build, first_output, rel_error

REL = 2.0**-4
SUBNORMAL = 2.0**-10


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    return q.double() * expand_block_scales(scale.double(), tuple(q.shape), block)


@pytest.mark.parametrize("shape", [(256, 384), (80, 208)])  # the second divides by no block
def test_weight_blocks_are_within_one_rounding(shape):
    torch.manual_seed(0)
    # a range of magnitudes across blocks, so a block's own scale matters
    w = torch.randn(shape, dtype=torch.bfloat16) * torch.logspace(-3, 2, shape[0])[:, None]
    q, scale = quantize_weight_blocks(w, (64, 128))
    assert q.shape == shape and q.dtype == torch.float8_e4m3fn
    assert scale.shape == (-(-shape[0] // 64), -(-shape[1] // 128)) and scale.dtype == torch.float32
    err = (dequantize(q, scale, (64, 128)) - w.double()).abs()
    slack = SUBNORMAL * expand_block_scales(scale.double(), shape, (64, 128))
    assert (err <= REL * w.double().abs() + slack + 1e-30).all()
    # every block's largest magnitude sits on the top of the range
    blocks = torch.nn.functional.pad(q.float().abs(), (0, scale.shape[1] * 128 - shape[1], 0, scale.shape[0] * 64 - shape[0]))
    assert (blocks.view(scale.shape[0], 64, scale.shape[1], 128).amax(dim=(1, 3)) == 448).all()


def test_activation_groups_are_per_token_and_per_group():
    x = torch.randn(5, 200, dtype=torch.bfloat16)
    x[2, 130] = 1000.0  # an outlier costs precision only in its own group of its own token
    q, scale = quantize_activation_groups(x, 128)
    assert q.shape == (5, 200) and scale.shape == (5, 2)
    assert scale[2, 1] > 100 * scale[2, 0] and scale[2, 1] > 100 * scale[3, 1]
    err = (dequantize(q, scale, (1, 128)) - x.double()).abs()
    assert (err <= REL * x.double().abs() + SUBNORMAL * expand_block_scales(scale.double(), (5, 200), (1, 128))).all()
    assert torch.isnan(quantize_activation_groups(torch.full((1, 64), float("nan")), 32)[1]).all()


@pytest.mark.parametrize("n, k", [(256, 384), (80, 208)])
@pytest.mark.parametrize("block", [(128, 128), (128, 64), (64, 128)])  # non-square: block_n != block_k
def test_block_linear_matches_float64_with_block_scales(n, k, block):
    torch.manual_seed(n + k)
    block_n, block_k = block
    x = torch.randn(3, 7, k, dtype=torch.bfloat16) * 3
    # magnitudes 100x apart along K and N, so that every block's scale matters
    magnitude = torch.logspace(-1, 1, n)[:, None] * torch.logspace(1, -1, k)[None, :]
    w = (torch.randn(n, k) * 0.05 * magnitude).to(torch.bfloat16)
    b = torch.randn(n, dtype=torch.bfloat16)
    wq, w_scale = quantize_weight_blocks(w, block)
    out = block_fp8_linear(x, wq, w_scale, b, block_n, block_k)
    assert out.shape == (3, 7, n) and out.dtype == torch.bfloat16

    xq, x_scale = quantize_activation_groups(x.reshape(-1, k), block_k)
    exact = dequantize(xq, x_scale, (1, block_k)) @ dequantize(wq, w_scale, block).T + b.double()
    assert ((out.reshape(-1, n).double() - exact).abs() <= 2**-8 * exact.abs() + 1e-4).all()

    ref = x.double() @ w.double().T + b.double()
    bound = (2 * REL + REL**2) * (x.double().abs() @ w.double().abs().T) + 2**-8 * ref.abs() + 1e-3
    assert ((out.double() - ref).abs() <= bound).all()
    assert ((out.double() - ref).norm() / ref.norm()) < 0.08


def test_model_with_block_weights_reports_and_stays_close():
    model, inputs = build("flux")
    with torch.no_grad():
        reference = first_output(model(**inputs))
    report = fp8_compile.quantize_(model, {"weight_block_size": [128, 128]})
    fp8 = report.by_decision(fp8_compile.Decision.FP8)
    assert fp8 and all(isinstance(model.get_submodule(layer.name), BlockScaledLinear) for layer in fp8)
    # tiny FLUX's widths (64 .. 512) leave partial blocks in most layers: reported, not refused
    reasons = {layer.name: layer.reason for layer in fp8}
    assert reasons["transformer_blocks.0.attn.to_q"] == "block 128x128, partial edge blocks (N=64, K=64)"
    assert reasons["single_transformer_blocks.0.proj_mlp"] == "block 128x128, partial edge blocks (N=256, K=64)"
    assert model.transformer_blocks[0].ff.net[2].weight_scale.shape == (1, 2)
    with torch.no_grad():
        out = first_output(model(**inputs))
    assert rel_error(out, reference) < 0.15


@pytest.mark.parametrize("block", [[128, 128], [64, 128]])
def test_compiled_block_layers_run_the_block_gemm(block):
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(256), nn.Linear(256, 128)).to(torch.bfloat16)
    with torch.no_grad():  # output rows 100x apart, so that each block row's scale matters
        model[1].weight.mul_(torch.logspace(-1, 1, 128, dtype=torch.bfloat16)[:, None])
    x = torch.randn(4, 16, 256, dtype=torch.bfloat16)
    fp8_compile.quantize_(model, {"weight_block_size": block})
    with torch.no_grad():
        eager = model(x)
        out, (code, *_) = run_and_get_code(torch.compile(model, backend="omni_fp8"), x)
    assert "block_scaled_linear" not in code, "the layer was not lowered"
    # the group quantization (a per-group amax) is fused into the LayerNorm's kernel
    assert len(re.findall(r"\bcpp_fused_\w*native_layer_norm\w*amax\w*\b|\bcpp_fused_\w*amax\w*native_layer_norm\w*\b", code)) >= 1
    assert rel_error(out, eager) < 2**-6


def test_consecutive_block_layers_compile():
    """A block layer fed by another (no op between them) reads the shape of a node the lowering
    made: compiling such a model failed with KeyError 'example_value'."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 128)).to(torch.bfloat16)
    x = torch.randn(4, 16, 256, dtype=torch.bfloat16)
    fp8_compile.quantize_(model, {"weight_block_size": [128, 128]})
    with torch.no_grad():
        assert rel_error(torch.compile(model, backend="omni_fp8")(x), model(x)) < 2**-6
