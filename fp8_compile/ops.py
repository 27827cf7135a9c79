"""FP8 primitives: weight and activation quantization, the FP8 GEMM and the weight-only GEMM.

These are plain torch functions: the graph passes insert calls to them into the traced graph,
and Inductor traces through them and fuses their element-wise work into the surrounding kernels.
The ``fp8_compile::scaled_linear`` and ``weight_only_scaled_linear`` custom ops wrap the linear
layers for eager execution (a converted module run outside ``torch.compile``), and are what the
passes find in a traced graph; ``dequantized_chunks_mm``, the weight-only GEMM for many rows, is
an op so that Inductor keeps it whole, and ``packed_fp8_matmul``, the one GEMM of layers that read
the same activation, so that it checks where its operands lie at every call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.torch_version import TorchVersion

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0
# The weight dtypes a conversion quantizes; others (integer, already FP8) are left alone.
CONVERTIBLE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
GEMM_ALIGNMENT = 16  # FP8 GEMMs need K and N to be multiples of 16
# Floor for an amax so that an all-zero row or tensor gets a tiny scale instead of 0 (0/0 = NaN).
AMAX_FLOOR = 1e-12
# Weights are quantized this many elements at a time, so that the float32 working copies (up to
# 12 bytes per element of a chunk) stay small: done whole, Wan2.2's time_proj (5120 x 30720)
# needed 2 GB on top of the model during conversion.
WEIGHT_CHUNK_ELEMENTS = 1 << 22
# torch's CPU _scaled_mm takes row and column scales from 2.13 on; 2.11's takes one scale per
# operand (an internal assert otherwise), so there the scales are applied after the product
CPU_SCALED_MM_TAKES_VECTORS = TorchVersion(torch.__version__) >= "2.13"


def _amax(t: torch.Tensor, granularity: str, dim: int) -> torch.Tensor:
    # Reduced in float32: the same value, and Inductor's C++ backend fails to compile several
    # fused bfloat16 max-reductions in one kernel.
    t = t.float().abs()
    return t.amax(dim=dim, keepdim=True) if granularity == "per_row" else t.amax()


def abs_max(t: torch.Tensor) -> torch.Tensor:
    """The largest |element| of ``t`` (a complex element's modulus) as a float32 scalar."""
    return t.abs().amax().float()


def weight_row_chunks(rows: int, columns: int, multiple: int = 1) -> list[slice]:
    """Row ranges of a [rows, columns] weight of about WEIGHT_CHUNK_ELEMENTS each, every range
    but the last a multiple of ``multiple`` rows (a weight block's height)."""
    step = multiple * max(1, WEIGHT_CHUNK_ELEMENTS // (columns * multiple))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def all_finite(weight: torch.Tensor) -> bool:
    """Whether a [..., N, K] weight has no Inf or NaN, checked chunk by chunk (``torch.isfinite``
    of a whole weight makes temporaries of 5 bytes per element)."""
    rows = weight.detach().flatten(0, -2)
    return all(bool(torch.isfinite(rows[chunk]).all()) for chunk in weight_row_chunks(*rows.shape))


def quantize_weight(weight: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] weight -> (FP8 weight [N, K], float32 scale: [N, 1] per row, [] per tensor).

    Works through the weight in row chunks (WEIGHT_CHUNK_ELEMENTS), so converting a large layer
    needs little memory beyond its FP8 copy. Raises ValueError on a non-finite weight, which no
    scale can represent.
    """
    w = weight.detach()
    chunks = weight_row_chunks(*w.shape)
    amaxes = [_amax(w[rows], granularity, dim=1) for rows in chunks]
    amax = torch.cat(amaxes) if granularity == "per_row" else torch.stack(amaxes).amax()
    if not torch.isfinite(amax).all():
        raise ValueError("weight contains Inf or NaN")
    scale = amax.clamp_min(AMAX_FLOOR) / FP8_MAX
    quantized = torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device)
    for rows in chunks:
        chunk_scale = scale[rows] if granularity == "per_row" else scale
        scaled = w[rows].to(torch.float32, copy=True).div_(chunk_scale).clamp_(-FP8_MAX, FP8_MAX)
        quantized[rows] = scaled.to(FP8_DTYPE)
    return quantized, scale


def quantize_activation(x: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic scaling of a [M, K] activation: (FP8 [M, K], float32 scale [M, 1] or []).

    A NaN or Inf in the input makes its scale NaN or Inf, so the GEMM output is NaN there rather
    than a finite wrong value.
    """
    scale = _amax(x, granularity, dim=-1).clamp_min(AMAX_FLOOR) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def quantize_activation_static(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """Static scaling with a calibrated float32 ``input_scale``: no reduction, only a pointwise
    divide, clamp and cast, which Inductor fuses into the kernel that produces ``x``.

    Values beyond the calibrated range saturate at +-448; an Inf becomes NaN instead, so that
    it gives NaN out, as with dynamic scaling, rather than a finite wrong value.
    """
    scaled = (x.float() / input_scale).clamp(-FP8_MAX, FP8_MAX)
    return torch.where(x.isinf(), torch.nan, scaled).to(FP8_DTYPE)


def repeat_per_row(scale: torch.Tensor, x2d: torch.Tensor) -> torch.Tensor:
    """A per-tensor scale of the [M, K] activation ``x2d`` as the [M, 1] per-row scale that
    ``_scaled_mm`` takes next to per-row weight scales (it accepts no mix of the two)."""
    return scale.reshape(1, 1).expand(x2d.shape[0], 1).contiguous()


def static_activation_scale(input_scale: torch.Tensor, x2d: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """The static scale of the [M, K] activation ``x2d`` as ``_scaled_mm`` takes it: one per
    tensor next to a per-tensor weight scale, else one per row."""
    return input_scale if weight_scale.numel() == 1 else repeat_per_row(input_scale, x2d)


def dequantize(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """FP8 ``t`` times its float32 ``scale`` (broadcast), in ``dtype``."""
    return (t.float() * scale.float()).to(dtype)


def apply_row_activation(x: torch.Tensor, gate: torch.Tensor | None, activation: str) -> torch.Tensor:
    """The activations :func:`quantize_rows` fuses, computed in float32."""
    x = x.float()
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if activation == "gelu":
        return F.gelu(x)
    if activation == "silu_mul":
        return F.silu(x) * gate.float()
    return x


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., K] -> [M, K] with unit column stride (a view where the layout allows it)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def quantize_rows(
    x: torch.Tensor,
    gate: torch.Tensor | None,
    prefix: torch.Tensor | None,
    activation: str,
    prefix_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row FP8 quantization of ``cat([prefix, activation(x, gate)], -1)`` as [M, K] rows;
    a ``prefix`` given in FP8 comes with its per-tensor ``prefix_scale``.

    The same numbers as :func:`quantize_activation` applied to that tensor, except that the
    activation's output is not rounded to the input dtype first. On an NVIDIA GPU it is one
    Triton kernel that reads each row once; elsewhere it is computed from its definition.
    """
    if (prefix is not None and prefix.dtype == FP8_DTYPE) != (prefix_scale is not None):
        raise ValueError("quantize_rows: a prefix in FP8 needs its prefix_scale, and only such a prefix takes one")
    rows = [_as_rows(t) if t is not None else None for t in (x, gate, prefix)]
    if x.is_cuda:
        from fp8_compile.triton_kernels import quantize_rows as quantize_rows_kernel

        return quantize_rows_kernel(*rows, activation, prefix_scale)
    x2d, gate2d, prefix2d = rows
    y = apply_row_activation(x2d, gate2d, activation)
    if prefix2d is not None:
        prefix2d = dequantize(prefix2d, prefix_scale, torch.float32) if prefix_scale is not None else prefix2d.float()
        y = torch.cat([prefix2d, y], dim=-1)
    return quantize_activation(y, "per_row")


def fp8_matmul(
    x_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    weight_fp8: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    fast_accum: bool,
) -> torch.Tensor:
    """[M, K] x [N, K]^T in FP8 with the scales and the bias applied in the GEMM epilogue.

    A float32 output takes its bias afterwards: CUDA's ``_scaled_mm`` refuses a bias with a
    float32 output ("Bias is not supported when out_dtype is set to Float32")."""
    if x_fp8.device.type == "cpu" and not CPU_SCALED_MM_TAKES_VECTORS and (x_scale.numel() > 1 or weight_scale.numel() > 1):
        one = torch.ones((), device=x_fp8.device)
        product = torch._scaled_mm(x_fp8, weight_fp8.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
        out = product * x_scale * weight_scale.t()
        return (out if bias is None else out + bias).to(out_dtype)
    epilogue_bias = bias if out_dtype != torch.float32 else None
    out = torch._scaled_mm(
        x_fp8,
        weight_fp8.t(),
        scale_a=x_scale,
        scale_b=weight_scale.t(),
        bias=epilogue_bias,
        out_dtype=out_dtype,
        use_fast_accum=fast_accum,
    )
    return out if bias is None or epilogue_bias is not None else out + bias


def packed_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The concatenation of ``tensors`` along their first dim, without a copy where it can be.

    The layers of one fused GEMM keep their weights, scales and biases as blocks of rows of one
    storage, each tensor still its module's own (same object, shape and values), so the GEMM
    reads them as one tensor. Tensors not laid out that way (not yet, or moved or replaced since)
    are copied into one new storage and each re-pointed at its block with ``set_``: the
    model's tensors change address, never value. While a CUDA graph is captured nothing is
    re-pointed, and the concatenation is a copy.
    """
    first = tensors[0]
    packed_bytes = _back_to_back(tensors)
    if packed_bytes:
        rows = packed_bytes // (first.stride(0) * first.element_size())  # contiguous: a row is stride(0) elements
        return first.as_strided((rows, *first.shape[1:]), first.stride())
    packed = torch.cat(tensors)
    if len({id(t) for t in tensors}) < len(tensors) or (packed.is_cuda and torch.cuda.is_current_stream_capturing()):
        return packed
    offset = 0
    with torch.no_grad():
        for t in tensors:
            t.set_(packed.untyped_storage(), offset, t.shape, t.stride())
            offset += t.numel()
    return packed


def _back_to_back(tensors: list[torch.Tensor]) -> int:
    """The bytes of ``tensors`` if they are contiguous, of one dtype, one after the other in one
    storage in list order; else 0."""
    first = tensors[0]
    start = address = first.data_ptr()
    for t in tensors:
        if t.data_ptr() != address or t.dtype != first.dtype or not t.is_contiguous():
            return 0
        address += t.nbytes
    if first.untyped_storage().data_ptr() != tensors[-1].untyped_storage().data_ptr():
        return 0
    return address - start


def packed_fp8_matmul(
    x_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    weights: list[torch.Tensor],
    weight_scales: list[torch.Tensor],
    biases: list[torch.Tensor],
    out_dtype: torch.dtype,
    fast_accum: bool,
) -> torch.Tensor:
    """Several per-row FP8 layers that read the same quantized activation, as one GEMM over their
    packed weights (see :func:`packed_rows`): [M, K] x [N1 + N2 + ..., K]^T. Each layer's output
    is a block of columns of the result. ``biases`` is empty for layers without one."""
    bias = packed_rows(biases) if biases else None
    return fp8_matmul(x_fp8, x_scale, packed_rows(weights), packed_rows(weight_scales), bias, out_dtype, fast_accum)


# The op behind packed_fp8_matmul, which Inductor calls once per group of layers in every forward.
# Registered through torch.library.Library: its dispatch costs 6 us against a custom_op's 20 with
# these list arguments (best of 5 x 5000 calls on a 2-core CPU host).
_LIBRARY = torch.library.Library("fp8_compile", "FRAGMENT")
_LIBRARY.define(
    "packed_fp8_matmul(Tensor x_fp8, Tensor x_scale, Tensor[] weights, Tensor[] weight_scales, Tensor[] biases, "
    "ScalarType out_dtype, bool fast_accum) -> Tensor"
)
for _device in ("CPU", "CUDA"):
    _LIBRARY.impl("packed_fp8_matmul", packed_fp8_matmul, _device)


@torch.library.register_fake("fp8_compile::packed_fp8_matmul")
def _(x_fp8, x_scale, weights, weight_scales, biases, out_dtype, fast_accum):
    return x_fp8.new_empty(x_fp8.shape[0], sum(w.shape[0] for w in weights), dtype=out_dtype)


def fp8_linear(
    x: torch.Tensor,
    weight_fp8: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    granularity: str,
    fast_accum: bool,
    input_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear`` with an FP8 weight and the activation quantized with ``input_scale`` (static)
    or with scales computed on the fly (dynamic, when it is None): W8A8."""
    x2d = _as_rows(x)  # cuBLASLt multiplies only row-major activations (a transposed input is not)
    if x2d.shape[0] == 0:  # no tokens: neither _scaled_mm nor a per-tensor amax takes an empty input
        return x.new_empty(*x.shape[:-1], weight_fp8.shape[0])
    if input_scale is None:
        x_fp8, x_scale = quantize_activation(x2d, granularity)
    else:
        x_fp8 = quantize_activation_static(x2d, input_scale)
        x_scale = static_activation_scale(input_scale, x2d, weight_scale)
    out = fp8_matmul(x_fp8, x_scale, weight_fp8, weight_scale, bias, x.dtype, fast_accum)
    return out.reshape(*x.shape[:-1], weight_fp8.shape[0])


# From this many rows on, a weight-only GEMM is compute-bound, and cuBLAS on weight slices
# dequantized just before (dequantized_chunks_mm) beats the Triton GEMM that dequantizes inside
# its loop: on an H100, Triton's GEMM reached 0.67-0.82x of cuBLAS at FLUX's shapes even on BF16
# weights (benchmarks/weight_only_kernels.py). From 256 to 1024 rows neither is faster at every
# shape (0.40-0.72x of BF16 each, BENCHMARKS.md); there the Triton GEMM is kept.
DEQUANTIZED_GEMM_MIN_ROWS = 1024
# The weight slice dequantized at a time: at most 32M elements (64 MB in BF16), so that no
# full-size BF16 copy of a large weight is ever made. Smaller slices measured slower on an H100
# (8M elements: 0.64-0.75x of BF16 against 0.76-0.92x): cuBLAS runs narrow GEMMs less well than
# the L2 saves by keeping a slice on chip.
DEQUANTIZED_CHUNK_ELEMENTS = 1 << 25
CHUNK_ROW_MULTIPLE = 256  # a slice's rows: a multiple of cuBLAS's widest tile


def weight_only_linear(
    x: torch.Tensor,
    weight_fp8: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    input_silu: bool = False,
) -> torch.Tensor:
    """``F.linear`` with an FP8 weight dequantized to the activation's dtype (W8A16), of
    ``silu(x)`` with ``input_silu`` (the AdaLN modulation layers' input, computed where the GEMM
    loads it).

    On an NVIDIA GPU: few rows (memory-bound) run a Triton GEMM that dequantizes each weight
    tile as it loads it; many rows (compute-bound) run cuBLAS on weight slices dequantized one
    at a time. Elsewhere (the CPU reference) the weight is dequantized whole first.
    """
    if x.is_cuda:
        from fp8_compile.triton_kernels import weight_only_mm

        x2d = x.reshape(-1, x.shape[-1])
        if x2d.shape[0] >= DEQUANTIZED_GEMM_MIN_ROWS:
            x2d = F.silu(x2d) if input_silu else x2d
            out = torch.ops.fp8_compile.dequantized_chunks_mm(x2d, weight_fp8, weight_scale)
            # Added outside the op, where Inductor fuses it into the next element-wise kernel:
            # cuBLAS's bias epilogue needs a contiguous output, which a slice's columns are not
            # (an H100 GEMM took 0.29 ms with the bias into a column slice, 0.24 ms without).
            if bias is not None:
                out = out + bias
        else:
            out = weight_only_mm(x2d, weight_fp8, weight_scale, bias, input_silu)
        return out.reshape(*x.shape[:-1], weight_fp8.shape[0])
    return F.linear(F.silu(x) if input_silu else x, dequantize(weight_fp8, weight_scale, x.dtype), bias)


def chunk_rows(rows: int, columns: int, chunk_elements: int) -> int:
    """Weight rows per dequantized slice: the weight cut into slices of at most about
    ``chunk_elements``, of equal size (cuBLAS runs no small last GEMM), each a multiple of
    CHUNK_ROW_MULTIPLE rows."""
    chunks = -(-rows * columns // chunk_elements)
    step = -(-rows // chunks)
    return min(rows, -(-step // CHUNK_ROW_MULTIPLE) * CHUNK_ROW_MULTIPLE)


def _dequantize_rows_reference(weight: torch.Tensor, weight_scale: torch.Tensor, out: torch.Tensor) -> None:
    """``out[:] = weight * weight_scale`` in torch: the CPU's stand-in for the Triton kernel."""
    torch.mul(weight.float(), weight_scale.float(), out=out)


@torch.library.custom_op("fp8_compile::dequantized_chunks_mm", mutates_args=())
def dequantized_chunks_mm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """[M, K] x [N, K] FP8 weight^T: each slice of the weight's rows is dequantized into one
    reused buffer, then multiplied by cuBLAS straight into its columns of the output.

    An opaque op, so that Inductor neither schedules the slices' dequantizations together nor
    copies the per-slice products into the output."""
    M, K = x.shape
    N = weight.shape[0]
    out = x.new_empty(M, N)
    step = chunk_rows(N, K, DEQUANTIZED_CHUNK_ELEMENTS)
    buffer = x.new_empty(step, K)
    per_row = weight_scale.numel() > 1
    if x.is_cuda:
        from fp8_compile.triton_kernels import dequantize_rows_into
    else:
        dequantize_rows_into = _dequantize_rows_reference
    for start in range(0, N, step):
        rows = slice(start, min(start + step, N))
        w = buffer[: rows.stop - start]
        dequantize_rows_into(weight[rows], weight_scale.reshape(-1, 1)[rows] if per_row else weight_scale, w)
        torch.mm(x, w.t(), out=out[:, rows])
    return out


@dequantized_chunks_mm.register_fake
def _(x, weight, weight_scale):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("fp8_compile::scaled_linear", mutates_args=())
def scaled_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    granularity: str,
    fast_accum: bool,
    input_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    return fp8_linear(x, weight, weight_scale, bias, granularity, fast_accum, input_scale)


@scaled_linear.register_fake
def _(x, weight, weight_scale, bias, granularity, fast_accum, input_scale=None):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("fp8_compile::weight_only_scaled_linear", mutates_args=())
def weight_only_scaled_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return weight_only_linear(x, weight, weight_scale, bias)


@weight_only_scaled_linear.register_fake
def _(x, weight, weight_scale, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])
