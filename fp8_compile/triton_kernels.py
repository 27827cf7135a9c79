"""Triton kernels for NVIDIA GPUs.

**Weight-only FP8 GEMM.** The FP8 weight tile is converted to the activation's dtype inside
the kernel, right after it is loaded, so no full-size BF16 copy of the weight is ever written
to memory. Two shapes of work: few rows (the conditioning GEMVs, M <= 8), which are
memory-bound and run as a multiply-and-reduce over weight tiles; and more rows (up to
``ops.DEQUANTIZED_GEMM_MIN_ROWS``; beyond, cuBLAS on dequantized weight slices is faster),
which run as a tiled ``tl.dot`` GEMM.

**Weight dequantization** into a BF16 buffer, one pass: the slices that cuBLAS multiplies.

**Row-wise quantization with its producer's activation.** One program per row: a first pass
takes the amax of the activation's output (GELU, SiLU-gating), a second pass re-reads the row
from L2, applies the activation and writes it scaled to FP8. The activation's BF16 output is
never written, and the row leaves HBM once. The kernel is bound by its arithmetic, not by
memory, so the first pass of a GELU row takes only the row's largest input (GELU increases
past its small negative minimum) and the second multiplies by the scale's reciprocal.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton
from triton.language.extra import libdevice

GEMV_MAX_ROWS = 8


@triton.autotune(
    configs=[
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
        for bn, bk, w in [(16, 256, 4), (32, 256, 4), (64, 128, 4), (32, 512, 8), (64, 256, 8)]
    ],
    key=["N", "K", "M"],
)
@triton.jit
def _weight_only_gemv_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, M, N, K,
    stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, ROW_SCALE: tl.constexpr, INPUT_SILU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        ks = k + offs_k
        x = tl.load(x_ptr + m * stride_xm + ks, mask=ks < K, other=0.0).to(tl.float32)
        if INPUT_SILU:  # silu(0) = 0: the masked tail stays 0
            x = x * tl.sigmoid(x)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + ks[None, :], mask=(offs_n[:, None] < N) & (ks[None, :] < K), other=0.0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    if ROW_SCALE:
        acc *= tl.load(scale_ptr + offs_n, mask=offs_n < N, other=0.0)
    else:
        acc *= tl.load(scale_ptr)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + offs_n, acc.to(out_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """The (row, column) output tile of program ``pid``, in groups of GROUP_M tile rows, so that
    neighbouring programs share weight tiles in L2."""
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    return first_m + (pid % (GROUP_M * num_n)) % group_size, (pid % (GROUP_M * num_n)) // group_size


@triton.autotune(
    configs=[
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
        for bn, bm, bk, s, w in [
            (128, 128, 64, 4, 8), (128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 128, 3, 8),
            (128, 256, 32, 4, 8), (128, 128, 32, 4, 4), (64, 256, 64, 3, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4),
        ]
    ],
    key=["M", "N", "K"],
)
@triton.jit
def _weight_only_mm_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, M, N, K,
    stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, ROW_SCALE: tl.constexpr, INPUT_SILU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # The product is computed transposed, out^T = W x^T: the converted weight tile is the left
    # operand, which Hopper's wgmma may take from registers (the right one must come from shared
    # memory). Measured on an H100, FLUX.1-dev forward with every layer on this kernel: 201.9 ms
    # with the weight on the right, 178.8 ms like this; 0.53-0.69x of cuBLAS BF16 (BENCHMARKS.md).
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        ks = k + offs_k
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + ks[None, :], mask=(offs_n[:, None] < N) & (ks[None, :] < K), other=0.0)
        x = tl.load(x_ptr + offs_m[None, :] * stride_xm + ks[:, None], mask=(offs_m[None, :] < M) & (ks[:, None] < K), other=0.0)
        if INPUT_SILU:
            x_float = x.to(tl.float32)
            x = (x_float * tl.sigmoid(x_float)).to(x.dtype)
        acc = tl.dot(w.to(x.dtype), x, acc)
    if ROW_SCALE:
        acc *= tl.load(scale_ptr + offs_n, mask=offs_n < N, other=0.0)[:, None]
    else:
        acc *= tl.load(scale_ptr)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
    tl.store(out_ptr + offs_m[None, :] * stride_om + offs_n[:, None], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton_op("fp8_compile::weight_only_mm", mutates_args=())
def weight_only_mm(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, input_silu: bool = False
) -> torch.Tensor:
    """[M, K] activation (``silu`` of it with ``input_silu``) x [N, K] FP8 weight^T, scaled per
    output channel or per tensor, plus bias."""
    x = x.contiguous()
    M, K = x.shape
    N = weight.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    scale = weight_scale.reshape(-1)
    args = (x, weight, scale, bias if bias is not None else scale, out, M, N, K, x.stride(0), weight.stride(0), out.stride(0))
    flags = dict(HAS_BIAS=bias is not None, ROW_SCALE=scale.numel() > 1, INPUT_SILU=input_silu)
    if M <= GEMV_MAX_ROWS:
        wrap_triton(_weight_only_gemv_kernel)[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), M)](*args, **flags)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        wrap_triton(_weight_only_mm_kernel)[grid](*args, **flags)
    return out


@triton.jit
def _dequantize_rows_kernel(w_ptr, scale_ptr, out_ptr, N, K, ROW_SCALE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    offsets = offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
    w = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + offs_n, mask=offs_n < N, other=0.0)[:, None] if ROW_SCALE else tl.load(scale_ptr)
    tl.store(out_ptr + offsets, (w * scale).to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_rows_into(weight: torch.Tensor, weight_scale: torch.Tensor, out: torch.Tensor) -> None:
    """``out[:] = weight * weight_scale`` for an [N, K] FP8 weight into a contiguous ``out``, in one pass."""
    weight = weight.contiguous()
    N, K = weight.shape
    scale = weight_scale.reshape(-1)
    grid = (triton.cdiv(N, 32), triton.cdiv(K, 256))
    _dequantize_rows_kernel[grid](weight, scale, out, N, K, ROW_SCALE=scale.numel() > 1, BLOCK_N=32, BLOCK_K=256, num_warps=8)


# activation applied to a row before it is quantized; "silu_mul" is SwiGLU's silu(x) * gate
ROW_ACTIVATIONS = {"none": 0, "gelu_tanh": 1, "gelu": 2, "silu_mul": 3}
# above every |GELU(x)| for x < 0 (both forms reach their minimum, -0.1700, near x = -0.752)
GELU_NEGATIVE_BOUND = tl.constexpr(0.171)


@triton.jit
def _activate(x, gate, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:  # tanh-approximated GELU: 0.5 x (1 + tanh(z)) = x * sigmoid(2z)
        x = x * tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))
    elif ACTIVATION == 2:
        x = 0.5 * x * (1.0 + libdevice.erf(x * 0.7071067811865476))
    elif ACTIVATION == 3:
        x = x * tl.sigmoid(x) * gate
    return x


@triton.jit
def _row_chunk(x_ptr, gate_ptr, row, stride_x, stride_gate, cols, K, ACTIVATION: tl.constexpr):
    x = tl.load(x_ptr + row * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
    gate = x
    if ACTIVATION == 3:
        gate = tl.load(gate_ptr + row * stride_gate + cols, mask=cols < K, other=0.0).to(tl.float32)
    return _activate(x, gate, ACTIVATION)


@triton.jit
def _nan_aware_max(v):
    # tl.max may skip NaNs, so they are counted apart
    return tl.where(tl.sum((v != v).to(tl.int32), 0) > 0, float("nan"), tl.max(v, 0))


@triton.jit
def _nan_aware_max_2d(v):
    return tl.where(tl.sum(tl.sum((v != v).to(tl.int32), 1), 0) > 0, float("nan"), tl.max(tl.max(v, 1), 0))


@triton.jit
def _activation_amax(x_ptr, gate_ptr, row, stride_x, stride_gate, K, cols, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    """max |activation(x)| over one row, NaN if any element is NaN."""
    top = 0.0
    shortcut = False
    if ACTIVATION == 1 or ACTIVATION == 2:
        # GELU increases above its minimum (-0.17 near x = -0.75), so where GELU(max x) is at
        # least GELU_NEGATIVE_BOUND it is the row's amax: one max per element instead of a GELU.
        # Rows of small values, NaN or -inf take the full pass below.
        high = tl.full((BLOCK,), float("-inf"), tl.float32)
        low = tl.full((BLOCK,), float("inf"), tl.float32)
        for k in range(0, K, BLOCK):
            c = k + cols
            x = tl.load(x_ptr + row * stride_x + c, mask=c < K, other=float("-inf")).to(tl.float32)
            high = tl.maximum(high, x, propagate_nan=tl.PropagateNan.ALL)
            low = tl.minimum(low, tl.where(c < K, x, float("inf")))
        top = _activate(_nan_aware_max(high), 0.0, ACTIVATION)
        shortcut = (top >= GELU_NEGATIVE_BOUND) & (tl.min(low, 0) > float("-inf"))
    if not shortcut:
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k in range(0, K, BLOCK):
            v = _row_chunk(x_ptr, gate_ptr, row, stride_x, stride_gate, k + cols, K, ACTIVATION)
            amax = tl.maximum(amax, tl.abs(v), propagate_nan=tl.PropagateNan.ALL)
        top = _nan_aware_max(amax)
    return top


@triton.autotune(
    configs=[triton.Config({"BLOCK": b}, num_warps=w) for b, w in [(1024, 4), (2048, 8), (4096, 8), (1024, 8)]],
    key=["K", "K_PREFIX", "ACTIVATION"],
)
@triton.jit
def _quantize_rows_kernel(
    x_ptr, gate_ptr, prefix_ptr, prefix_scale_ptr, out_ptr, scale_ptr, K, K_PREFIX,
    stride_x, stride_gate, stride_prefix, stride_out,
    ACTIVATION: tl.constexpr, PREFIX_SCALED: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    row_amax = _activation_amax(x_ptr, gate_ptr, row, stride_x, stride_gate, K, cols, ACTIVATION, BLOCK)
    # a prefix in FP8 (the attention output) is read as its FP8 values times its per-tensor scale
    prefix_scale = 1.0
    if PREFIX_SCALED:
        prefix_scale = tl.load(prefix_scale_ptr)
    if K_PREFIX > 0:
        prefix_amax = _activation_amax(prefix_ptr, prefix_ptr, row, stride_prefix, 0, K_PREFIX, cols, 0, BLOCK)
        row_amax = tl.maximum(row_amax, prefix_amax * prefix_scale, propagate_nan=tl.PropagateNan.ALL)
    # NaN propagates into the scale, and from it into the whole row of the GEMM output
    scale = tl.maximum(row_amax, 1e-12, propagate_nan=tl.PropagateNan.ALL) / 448.0
    tl.store(scale_ptr + row, scale)
    # a multiply by the reciprocal, not a division per element: this kernel is bound by its
    # arithmetic, and the two differ by an ulp of float32, far below e4m3's step
    inverse = 1.0 / scale
    out_row = out_ptr + row * stride_out
    prefix_inverse = prefix_scale * inverse
    for k in range(0, K_PREFIX, BLOCK):
        c = k + cols
        v = _row_chunk(prefix_ptr, prefix_ptr, row, stride_prefix, 0, c, K_PREFIX, 0)
        q = tl.clamp(v * prefix_inverse, -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
        tl.store(out_row + c, q.to(tl.float8e4nv), mask=c < K_PREFIX)
    for k in range(0, K, BLOCK):
        c = k + cols
        v = _row_chunk(x_ptr, gate_ptr, row, stride_x, stride_gate, c, K, ACTIVATION)
        q = tl.clamp(v * inverse, -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
        tl.store(out_row + K_PREFIX + c, q.to(tl.float8e4nv), mask=c < K)


@triton_op("fp8_compile::quantize_rows", mutates_args=())
def quantize_rows(
    x: torch.Tensor,
    gate: torch.Tensor | None,
    prefix: torch.Tensor | None,
    activation: str,
    prefix_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row FP8 quantization of ``cat([prefix (x prefix_scale), act(x[, gate])], -1)``; 2-D
    inputs with unit column stride."""
    M, K = x.shape
    k_prefix = prefix.shape[1] if prefix is not None else 0
    out = torch.empty((M, k_prefix + K), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    gate_arg = gate if gate is not None else x
    prefix_arg = prefix if prefix is not None else x
    wrap_triton(_quantize_rows_kernel)[(M,)](
        x, gate_arg, prefix_arg, prefix_scale if prefix_scale is not None else scale, out, scale, K, k_prefix,
        x.stride(0), gate_arg.stride(0), prefix_arg.stride(0), out.stride(0),
        ACTIVATION=ROW_ACTIVATIONS[activation], PREFIX_SCALED=prefix_scale is not None,
    )
    return out, scale


# heads a program of the fused q/k kernel covers (8 of FLUX's 24: each cos/sin row read 3 times, not 24)
ROTARY_HEADS_PER_PROGRAM = 8


@triton.jit
def _pairs(t, SHAPE: tl.constexpr):
    """[..., D_PAD] of shape SHAPE -> its even and odd channels, each [..., D_PAD // 2]."""
    return tl.split(tl.reshape(t, SHAPE[:-1] + (SHAPE[-1] // 2, 2)))


@triton.autotune(
    configs=[triton.Config({"BLOCK_S": b}, num_warps=w) for b, w in [(2, 4), (4, 4), (4, 8), (8, 8)]],
    key=["D", "H", "SECOND", "HEADS"],
)
@triton.jit
def _rms_norm_rotary_fp8_kernel(
    first_ptr, second_ptr, w_first_ptr, w_second_ptr, cos_ptr, sin_ptr, bound_ptr, out_ptr, scale_ptr,
    total_tokens, S, S_FIRST, H, D,
    stride_first_b, stride_first_s, stride_first_h, stride_second_b, stride_second_s, stride_second_h,
    stride_cos, stride_sin, eps_first, eps_second, bound_factor, BOUND_ROWS, BOUND_PARTS,
    SECOND: tl.constexpr, WEIGHTS: tl.constexpr, BOUND_TENSOR: tl.constexpr, BOUND_PARTS_PAD: tl.constexpr,
    HEADS: tl.constexpr, D_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One program: BLOCK_S tokens x HEADS heads, so that each token's cos and sin rows (float32,
    as large as the operand's bf16 rows) are read once for HEADS heads."""
    # float arguments may arrive as float64 (Inductor passes them so): the arithmetic is float32
    eps_first = tl.cast(eps_first, tl.float32)
    eps_second = tl.cast(eps_second, tl.float32)
    bound_factor = tl.cast(bound_factor, tl.float32)
    cols = tl.arange(0, D_PAD)
    in_row = cols < D
    # the scale, from the bound |y| <= sqrt(D) max|w| (max|cos| + max|sin|) (bound_factor: sqrt(D)
    # times the tables' bound where it is a number): every program computes it from the norm
    # weights (D values each) and the tables' partial maxima, program 0 also writes it out
    w_first = tl.full((D_PAD,), 1.0, tl.float32)
    w_second = w_first
    if WEIGHTS:
        w_first = tl.load(w_first_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        if SECOND:
            w_second = tl.load(w_second_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    w_max = tl.maximum(_nan_aware_max(tl.abs(w_first)), _nan_aware_max(tl.abs(w_second)), propagate_nan=tl.PropagateNan.ALL)
    bound = w_max * bound_factor
    if BOUND_TENSOR:
        # [BOUND_ROWS, BOUND_PARTS] partial maxima (rotary_table_maxima's): the sum of the rows' maxima
        parts = tl.arange(0, BOUND_PARTS_PAD)
        partials = tl.load(
            bound_ptr + tl.arange(0, 2)[:, None] * BOUND_PARTS + parts[None, :],
            mask=(tl.arange(0, 2) < BOUND_ROWS)[:, None] & (parts < BOUND_PARTS)[None, :],
            other=0.0,
        )
        table_bound = tl.sum(tl.max(partials, 1), 0)
        bound *= tl.where(tl.sum(tl.sum((partials != partials).to(tl.int32), 1), 0) > 0, float("nan"), table_bound)
    scale = tl.maximum(bound, 1e-12, propagate_nan=tl.PropagateNan.ALL) / 448.0
    if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
        tl.store(scale_ptr, scale)
    inverse = 1.0 / scale

    tokens = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    heads = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
    b = tokens // S
    s = tokens % S
    first = s < S_FIRST
    live = tokens < total_tokens
    mask = live[:, None, None] & (heads < H)[None, :, None] & in_row[None, None, :]
    channels = heads[None, :, None] * stride_first_h + cols[None, None, :]
    x_first = first_ptr + (b * stride_first_b + s * stride_first_s)[:, None, None] + channels
    if SECOND:
        is_first = first[:, None, None]
        second_channels = heads[None, :, None] * stride_second_h + cols[None, None, :]
        x_second = second_ptr + (b * stride_second_b + (s - S_FIRST) * stride_second_s)[:, None, None] + second_channels
        x = tl.where(
            is_first, tl.load(x_first, mask=mask & is_first, other=0.0), tl.load(x_second, mask=mask & ~is_first, other=0.0)
        ).to(tl.float32)
        eps = tl.where(first, eps_first, eps_second)[:, None]
        w = tl.where(first[:, None], w_first[None, :], w_second[None, :])[:, None, :]
    else:
        x = tl.load(x_first, mask=mask, other=0.0).to(tl.float32)
        eps = eps_first
        w = w_first[None, None, :]
    rstd = tl.rsqrt(tl.sum(x * x, axis=2) / D + eps)
    y = x * rstd[:, :, None] * w
    table_mask = live[:, None] & in_row[None, :]
    cos = tl.load(cos_ptr + s[:, None] * stride_cos + cols[None, :], mask=table_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + s[:, None] * stride_sin + cols[None, :], mask=table_mask, other=0.0).to(tl.float32)
    # pairs (y0, y1) -> (y0 cos0 - y1 sin0, y1 cos1 + y0 sin1), diffusers' apply_rotary_emb
    y_even, y_odd = _pairs(y, (BLOCK_S, HEADS, D_PAD))
    cos_even, cos_odd = _pairs(cos, (BLOCK_S, D_PAD))
    sin_even, sin_odd = _pairs(sin, (BLOCK_S, D_PAD))
    cos_even, cos_odd, sin_even, sin_odd = cos_even[:, None, :], cos_odd[:, None, :], sin_even[:, None, :], sin_odd[:, None, :]
    rotated = tl.reshape(
        tl.join(y_even * cos_even - y_odd * sin_even, y_odd * cos_odd + y_even * sin_odd), (BLOCK_S, HEADS, D_PAD)
    )
    q = tl.clamp(rotated * inverse, -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
    q = tl.where(tl.abs(rotated) == float("inf"), float("nan"), q)  # as quantize_activation_static
    out = out_ptr + ((tokens * H)[:, None, None] + heads[None, :, None]) * D + cols[None, None, :]
    tl.store(out, q.to(tl.float8e4nv), mask=mask)


@triton_op("fp8_compile::rms_norm_rotary_fp8", mutates_args=())
def rms_norm_rotary_fp8(
    first: torch.Tensor,
    second: torch.Tensor | None,
    weight_first: torch.Tensor | None,
    weight_second: torch.Tensor | None,
    eps_first: float,
    eps_second: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rotary_bound: torch.Tensor | None,
    rotary_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`fp8_compile.attention.rms_norm_rotary_fp8`: [B, S_i, H, D] inputs with a unit
    last stride, [S, D] tables with a unit last stride, ``rotary_bound`` a contiguous float32
    [R <= 2, P] tensor of partial maxima (or None: ``rotary_factor`` is the bound).

    A ``triton_op``, so that Inductor launches the kernel from its own code (an opaque custom op
    cost ~200 us of host per call, 23 ms of a FLUX forward). Inductor must see that the kernel
    writes only ``out`` and ``scale``: where its analysis fails it assumes every input written
    and copies Q, K and the tables around each call, so the kernel keeps to what torch 2.11's
    analysis reads (float arguments cast with ``tl.cast``: the analysis passes them as Python
    numbers, which have no ``.to``)."""
    B, S, H, D = first.shape
    S += second.shape[1] if second is not None else 0
    out = torch.empty((B, S, H, D), dtype=torch.float8_e4m3fn, device=first.device)
    # the scale in a 1-element buffer, returned as a 0-dim view: Inductor lowers a 0-dim
    # empty() as a kernel that writes it (one launch per call)
    scale = torch.empty(1, dtype=torch.float32, device=first.device)
    other = second if second is not None else first
    heads = min(ROTARY_HEADS_PER_PROGRAM, triton.next_power_of_2(H))

    bound_rows, bound_parts = rotary_bound.shape if rotary_bound is not None else (0, 1)

    def grid(meta):
        return (triton.cdiv(B * S, meta["BLOCK_S"]), triton.cdiv(H, heads))

    wrap_triton(_rms_norm_rotary_fp8_kernel)[grid](
        first, other, weight_first if weight_first is not None else first, weight_second if weight_second is not None else first,
        cos, sin, rotary_bound if rotary_bound is not None else cos, out, scale,
        B * S, S, first.shape[1], H, D,
        first.stride(0), first.stride(1), first.stride(2), other.stride(0), other.stride(1), other.stride(2),
        cos.stride(0), sin.stride(0), eps_first, eps_second, math.sqrt(D) * rotary_factor, bound_rows, bound_parts,
        SECOND=second is not None, WEIGHTS=weight_first is not None, BOUND_TENSOR=rotary_bound is not None,
        BOUND_PARTS_PAD=triton.next_power_of_2(bound_parts), HEADS=heads, D_PAD=triton.next_power_of_2(D),
    )
    return out, scale.view(())


# programs (and partial maxima per table) of rotary_table_maxima: each fused q/k program reads
# them all, 2 x 128 floats from L2, instead of a second reduction kernel
TABLE_PARTS = 128


@triton.jit
def _table_maxima_kernel(cos_ptr, sin_ptr, out_ptr, S, D, stride_cos, stride_sin, ROWS: tl.constexpr, D_PAD: tl.constexpr):
    """Program p: max |cos| and max |sin| over its range of table rows, into out[0, p] and out[1, p]."""
    part = tl.program_id(0)
    parts = tl.num_programs(0)
    per_part = tl.cdiv(S, parts)
    start = part * per_part
    end = tl.minimum(start + per_part, S)
    cols = tl.arange(0, D_PAD)
    top_cos = tl.zeros((ROWS, D_PAD), tl.float32)
    top_sin = tl.zeros((ROWS, D_PAD), tl.float32)
    for first_row in range(start, end, ROWS):
        rows = first_row + tl.arange(0, ROWS)
        mask = (rows < end)[:, None] & (cols < D)[None, :]
        cos = tl.load(cos_ptr + rows[:, None] * stride_cos + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + rows[:, None] * stride_sin + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        top_cos = tl.maximum(top_cos, tl.abs(cos), propagate_nan=tl.PropagateNan.ALL)
        top_sin = tl.maximum(top_sin, tl.abs(sin), propagate_nan=tl.PropagateNan.ALL)
    tl.store(out_ptr + part, _nan_aware_max_2d(top_cos))
    tl.store(out_ptr + parts + part, _nan_aware_max_2d(top_sin))


@triton_op("fp8_compile::rotary_table_maxima", mutates_args=())
def rotary_table_maxima(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """[2, P] float32: partial maxima of |cos| (row 0) and |sin| (row 1) of two [S, D] tables with
    a unit last stride, over P ranges of rows."""
    S, D = cos.shape
    out = torch.empty((2, max(1, min(TABLE_PARTS, S))), dtype=torch.float32, device=cos.device)
    wrap_triton(_table_maxima_kernel)[(out.shape[1],)](cos, sin, out, S, D, cos.stride(0), sin.stride(0), ROWS=4, D_PAD=triton.next_power_of_2(D))
    return out
