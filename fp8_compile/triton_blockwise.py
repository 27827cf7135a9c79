"""Triton block-scaled FP8 GEMM for NVIDIA GPUs (imported only where CUDA is present).

Each program computes a [BLOCK_M, BLOCK_N] output tile. Its K loop walks one scale group
(``block_k`` columns) per step: the FP8 x FP8 product of the step's activation and weight tiles
is accumulated by the tensor cores in float32, multiplied by the activation group's scale
(one per row) and the weight block's scale (one per column of the tile: a tile may straddle two
weight blocks along N), and added to the float32 sum. Scaling every ``block_k`` step also
bounds the error of Hopper's reduced-precision FP8 accumulation, as in the block-FP8 kernels
these checkpoints were made for. Tiles and loads are masked, so no dimension has to divide by
the block. Without FP8 tensor cores (SM80-SM88) the tiles are converted to BF16 before the dot,
which is exact for e4m3 values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from fp8_compile.triton_kernels import grouped_tile


@triton.autotune(
    configs=[
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_stages=s, num_warps=w)
        for bm, bn, s, w in [(128, 128, 3, 8), (128, 64, 4, 4), (64, 128, 4, 4), (64, 64, 4, 4), (16, 64, 4, 4), (16, 128, 3, 4)]
    ],
    key=["M", "N", "K", "BLOCK_K"],
)
@triton.jit
def _block_fp8_mm_kernel(
    a_ptr, b_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, c_ptr, M, N, K,
    stride_am, stride_bn, stride_cm, stride_a_scale, stride_b_scale,
    SCALE_BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, FP8_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    a_scale_rows = a_scale_ptr + offs_m.to(tl.int64) * stride_a_scale
    b_scale_cols = b_scale_ptr + (offs_n // SCALE_BLOCK_N) * stride_b_scale
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kb = k0 // BLOCK_K  # the scale group of this step
        ks = k0 + offs_k
        a = tl.load(a_ptr + offs_m[:, None].to(tl.int64) * stride_am + ks[None, :], mask=mask_m[:, None] & (ks[None, :] < K), other=0.0)
        b = tl.load(b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + ks[:, None], mask=mask_n[None, :] & (ks[:, None] < K), other=0.0)
        if FP8_DOT:
            partial = tl.dot(a, b)
        else:
            partial = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
        a_scale = tl.load(a_scale_rows + kb, mask=mask_m, other=0.0)
        b_scale = tl.load(b_scale_cols + kb, mask=mask_n, other=0.0)
        acc += partial * a_scale[:, None] * b_scale[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    c = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton_op("fp8_compile::block_fp8_mm", mutates_args=())
def block_fp8_mm(
    x: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    block_n: int,
    block_k: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """[M, K] FP8 activation (scales [M, ceil(K/bk)]) x [N, K] FP8 weight^T (scales [ceil(N/bn), ceil(K/bk)])."""
    # the kernel walks the last dimension of every operand with unit stride
    x, weight, x_scale, weight_scale = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, weight, x_scale, weight_scale))
    M, K = x.shape
    N = weight.shape[0]
    out = torch.empty((M, N), dtype=out_dtype, device=x.device)
    fp8_dot = torch.cuda.get_device_capability(x.device) >= (8, 9)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    wrap_triton(_block_fp8_mm_kernel)[grid](
        x, weight, x_scale, weight_scale, bias if bias is not None else x_scale, out, M, N, K,
        x.stride(0), weight.stride(0), out.stride(0), x_scale.stride(0), weight_scale.stride(0),
        SCALE_BLOCK_N=block_n, BLOCK_K=block_k, HAS_BIAS=bias is not None, FP8_DOT=fp8_dot,
    )
    return out
