"""FP8 primitives against float64 references, with bounds that follow from e4m3's precision
(derived in fp8_bounds.py)."""

import math
import weakref

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fp8_compile
from fp8_compile import ops
from fp8_compile.blockwise import quantize_weight_blocks

from fp8_bounds import dequantize, linear_bound, quantization_bound


@pytest.mark.parametrize("granularity", ["per_row", "per_tensor"])
def test_weight_quantization_error_is_within_one_rounding(granularity):
    w = torch.randn(48, 64, dtype=torch.bfloat16) * torch.logspace(-3, 2, 48)[:, None]
    q, scale = ops.quantize_weight(w, granularity)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert scale.shape == ((48, 1) if granularity == "per_row" else ())
    err = (dequantize(q, scale) - w.double()).abs()
    assert (err <= quantization_bound(w, scale)).all()
    # the largest magnitude of each scaled group lands on the top of the range
    top = q.float().abs().amax(dim=1) if granularity == "per_row" else q.float().abs().amax()
    assert (top == ops.FP8_MAX).all()


def test_zero_weight_and_activation_give_zeros_not_nan():
    q, scale = ops.quantize_weight(torch.zeros(16, 16), "per_row")
    assert torch.isfinite(scale).all() and (q.float() == 0).all()
    xq, x_scale = ops.quantize_activation(torch.zeros(4, 16, dtype=torch.bfloat16), "per_row")
    assert torch.isfinite(x_scale).all() and (xq.float() == 0).all()


def test_non_finite_weight_is_refused():
    w = torch.ones(16, 16)
    w[3, 4] = float("inf")
    with pytest.raises(ValueError, match="Inf or NaN"):
        ops.quantize_weight(w, "per_tensor")


class PeakNewMemory(TorchDispatchMode):
    """The most bytes of tensor storage created under this mode and alive at the same time."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(ret.alias_info for ret in func._schema.returns):  # views and in-place ops allocate nothing
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._release, storage.nbytes())
        return out

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes


@pytest.mark.parametrize("block_size", [None, (128, 128)])
def test_converting_a_large_layer_needs_little_memory_beyond_its_fp8_copy(block_size):
    """Conversion must fit beside the BF16 model (the benchmark issue allows 1 GB over it): the
    float32 working copies are bounded by the chunk, whatever the layer's size. Whole, this
    8192 x 4096 layer would take 13 bytes per element (436 MB) at once."""
    model = nn.Sequential(nn.Linear(8192, 4096, dtype=torch.bfloat16))
    options = {"weight_block_size": list(block_size)} if block_size else {}
    with PeakNewMemory() as memory:
        fp8_compile.quantize_(model, options)
    fp8_bytes = 8192 * 4096
    assert isinstance(model[0], fp8_compile.ScaledLinear)
    assert memory.peak <= fp8_bytes + 12 * ops.WEIGHT_CHUNK_ELEMENTS, memory.peak / 1e6


def test_weight_quantization_does_not_depend_on_the_chunk_size(monkeypatch):
    w = torch.randn(300, 520, dtype=torch.bfloat16) * torch.logspace(-3, 2, 300)[:, None]
    quantizers = {
        "per_row": lambda: ops.quantize_weight(w, "per_row"),
        "per_tensor": lambda: ops.quantize_weight(w, "per_tensor"),
        "blocks": lambda: quantize_weight_blocks(w, (32, 128)),
    }
    whole = {name: quantize() for name, quantize in quantizers.items()}
    monkeypatch.setattr(ops, "WEIGHT_CHUNK_ELEMENTS", 5000)  # chunks of 9 rows, or 32 for blocks
    for name, quantize in quantizers.items():
        (q, scale), (q_whole, scale_whole) = quantize(), whole[name]
        assert torch.equal(q.view(torch.uint8), q_whole.view(torch.uint8)), name
        assert torch.equal(scale, scale_whole), name


@pytest.mark.parametrize("granularity", ["per_row", "per_tensor"])
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_is_within_the_e4m3_bound_of_float64(granularity, bias):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16) * 3
    w = torch.randn(32, 64, dtype=torch.bfloat16) * 0.05
    b = torch.randn(32, dtype=torch.bfloat16) if bias else None
    wq, w_scale = ops.quantize_weight(w, granularity)
    out = ops.fp8_linear(x, wq, w_scale, b, granularity, fast_accum=False)
    assert out.shape == (3, 5, 32) and out.dtype == torch.bfloat16

    x2d, out2d = x.reshape(-1, 64), out.reshape(-1, 32)
    ref = x2d.double() @ w.double().T + (b.double() if bias else 0)
    _, x_scale = ops.quantize_activation(x2d, granularity)
    assert ((out2d.double() - ref).abs() <= linear_bound(x2d, w, x_scale, w_scale, b, out.dtype)).all()
    assert ((out2d.double() - ref).norm() / ref.norm()) < 0.08


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_fp8_matmul_scales_after_the_product_where_the_cpu_gemm_takes_one_scale(monkeypatch, out_dtype):
    """torch 2.11's CPU _scaled_mm takes one scale per operand: there fp8_matmul multiplies with
    unit scales and applies row and column scales and the bias after, the same numbers (float32
    sums in both; one output rounding apart at most)."""
    torch.manual_seed(0)
    x, w, bias = torch.randn(6, 64) * 3, torch.randn(32, 64) * 0.05, torch.randn(32)
    wq, w_scale = ops.quantize_weight(w, "per_row")
    xq, x_scale = ops.quantize_activation(x, "per_row")
    native = ops.fp8_matmul(xq, x_scale, wq, w_scale, bias.to(out_dtype), out_dtype, False)
    gemm_scales = []
    real_scaled_mm = torch._scaled_mm

    def one_scale_gemm(a, b, scale_a, scale_b, **kwargs):
        gemm_scales.append((scale_a.numel(), scale_b.numel()))
        return real_scaled_mm(a, b, scale_a, scale_b, **kwargs)

    monkeypatch.setattr(ops, "CPU_SCALED_MM_TAKES_VECTORS", False)
    monkeypatch.setattr(torch, "_scaled_mm", one_scale_gemm)
    after = ops.fp8_matmul(xq, x_scale, wq, w_scale, bias.to(out_dtype), out_dtype, False)
    assert gemm_scales == [(1, 1)] and after.dtype == out_dtype
    torch.testing.assert_close(after, native, rtol=2**-8 if out_dtype == torch.bfloat16 else 1e-5, atol=1e-5)


def test_nan_or_inf_activation_gives_nan_not_a_finite_value():
    w = torch.randn(16, 32, dtype=torch.bfloat16)
    wq, w_scale = ops.quantize_weight(w, "per_tensor")
    for bad in (float("nan"), float("inf")):
        x = torch.randn(4, 32, dtype=torch.bfloat16)
        x[1, 3] = bad
        out = ops.fp8_linear(x, wq, w_scale, None, "per_tensor", False)
        assert torch.isnan(out).all()  # one scale for the tensor: every row is poisoned
        out = ops.fp8_linear(x, *ops.quantize_weight(w, "per_row"), None, "per_row", False)
        assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2, 3]]).all()


@pytest.mark.parametrize("granularity", ["per_row", "per_tensor"])
def test_fp8_linear_of_no_tokens_is_empty(granularity):
    wq, scale = ops.quantize_weight(torch.randn(32, 64, dtype=torch.bfloat16), granularity)
    out = ops.fp8_linear(torch.randn(2, 0, 64, dtype=torch.bfloat16), wq, scale, torch.randn(32, dtype=torch.bfloat16), granularity, False)
    assert out.shape == (2, 0, 32) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("granularity", ["per_row", "per_tensor"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_weight_only_linear_matches_dequantized_reference(granularity, with_bias):
    torch.manual_seed(0)
    x = torch.randn(64, 64, dtype=torch.bfloat16)
    w = torch.randn(32, 64, dtype=torch.bfloat16) * torch.logspace(-1, 1, 32, dtype=torch.bfloat16)[:, None]
    bias = torch.randn(32, dtype=torch.bfloat16) if with_bias else None
    wq, scale = ops.quantize_weight(w, granularity)
    out = ops.weight_only_linear(x, wq, scale, bias)
    ref = x.double() @ dequantize(wq, scale).T + (bias.double() if with_bias else 0)
    # per output column: bf16 input and output roundings, ~2**-8
    assert ((out.double() - ref).norm(dim=0) / ref.norm(dim=0)).max() < 2**-7


@pytest.mark.parametrize("granularity", ["per_row", "per_tensor"])
def test_dequantized_chunks_mm_writes_every_slice_of_the_output(monkeypatch, granularity):
    """The compute-bound weight-only GEMM, cut into weight slices of 256 rows (600 = 256 + 256 + 88):
    each slice's columns must hold that slice's product and scale."""
    monkeypatch.setattr(ops, "DEQUANTIZED_CHUNK_ELEMENTS", 256 * 96)
    torch.manual_seed(1)
    x = torch.randn(40, 96, dtype=torch.bfloat16)
    w = torch.randn(600, 96, dtype=torch.bfloat16) * torch.linspace(0.1, 10, 600, dtype=torch.bfloat16)[:, None]
    wq, scale = ops.quantize_weight(w, granularity)
    out = torch.ops.fp8_compile.dequantized_chunks_mm(x, wq, scale)
    ref = x.double() @ dequantize(wq, scale).T
    column_err = (out.double() - ref).norm(dim=0) / ref.norm(dim=0)
    assert out.shape == (40, 600) and column_err.max() < 2**-7  # bf16 inputs and output


def test_chunk_rows_cuts_equal_slices_of_whole_tiles():
    assert ops.chunk_rows(3072, 3072, 1 << 23) == 1536  # 9.4M elements: two slices
    assert ops.chunk_rows(12288, 3072, 1 << 23) == 2560  # five slices, rounded up to 256 rows
    assert ops.chunk_rows(64, 4096, 1 << 23) == 64  # never more rows than the weight has
    assert ops.chunk_rows(600, 96, 1 << 40) == 600


@pytest.mark.parametrize("activation", ["none", "gelu_tanh", "gelu", "silu_mul"])
def test_row_activations_are_their_formulas(activation):
    """The activations quantize_rows fuses (and the GPU kernel is checked against), written out
    here: tanh-GELU and exact GELU differ by up to ~1e-3 around x = -2, far above the bound."""
    torch.manual_seed(0)
    x = torch.linspace(-8, 8, 2001).reshape(1, -1)
    gate = torch.randn(1, 2001)
    expected = {
        "none": x,
        "gelu_tanh": 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
        "gelu": 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
        "silu_mul": x / (1 + torch.exp(-x)) * gate,
    }[activation]
    out = ops.apply_row_activation(x, gate if activation == "silu_mul" else None, activation)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", ["none", "gelu_tanh", "gelu", "silu_mul"])
@pytest.mark.parametrize("with_prefix", [False, True])
def test_quantize_rows_is_the_activation_then_per_row_quantization(activation, with_prefix):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 48, dtype=torch.bfloat16) * 4
    gate = torch.randn(2, 5, 48, dtype=torch.bfloat16) if activation == "silu_mul" else None
    prefix = torch.randn(2, 5, 32, dtype=torch.bfloat16) if with_prefix else None
    q, scale = ops.quantize_rows(x, gate, prefix, activation)
    y = ops.apply_row_activation(x.reshape(10, 48), None if gate is None else gate.reshape(10, 48), activation)
    if with_prefix:
        y = torch.cat([prefix.reshape(10, 32).float(), y], dim=-1)
    ref_q, ref_scale = ops.quantize_activation(y, "per_row")
    assert q.shape == (10, 80 if with_prefix else 48) and scale.shape == (10, 1)
    assert torch.equal(q.float(), ref_q.float()) and torch.equal(scale, ref_scale)


def test_quantize_rows_reads_an_fp8_prefix_times_its_scale():
    """A prefix in FP8 (the attention output, with V's per-tensor scale) counts as its values
    times the scale: the same rows as the dequantized prefix in float32, and the scale is not
    optional (nor taken for a prefix that is not FP8)."""
    torch.manual_seed(0)
    x = torch.randn(10, 48, dtype=torch.bfloat16) * 4
    prefix8, prefix_scale = ops.quantize_activation(torch.randn(10, 32) * 100, "per_tensor")
    q, scale = ops.quantize_rows(x, None, prefix8, "gelu_tanh", prefix_scale)
    ref_q, ref_scale = ops.quantize_rows(x, None, ops.dequantize(prefix8, prefix_scale, torch.float32), "gelu_tanh")
    assert torch.equal(q.float(), ref_q.float()) and torch.equal(scale, ref_scale)
    with pytest.raises(ValueError, match="prefix_scale"):
        ops.quantize_rows(x, None, prefix8, "gelu_tanh")
    with pytest.raises(ValueError, match="prefix_scale"):
        ops.quantize_rows(x, None, prefix8.float(), "gelu_tanh", prefix_scale)


def test_packed_rows_lays_tensors_back_to_back_and_then_reads_them_without_a_copy():
    tensors = [torch.randn(n, 8) for n in (16, 32, 16)]
    values = [t.clone() for t in tensors]
    packed = ops.packed_rows(tensors)
    assert torch.equal(packed, torch.cat(values))
    # the same tensor objects, with the same values, now blocks of one storage
    assert all(torch.equal(t, v) for t, v in zip(tensors, values))
    assert [t.storage_offset() for t in tensors] == [0, 16 * 8, 48 * 8]
    assert ops.packed_rows(tensors).data_ptr() == tensors[0].data_ptr()  # a view now
    tensors[0].add_(1)  # written in place: the packed view reads it
    assert torch.equal(ops.packed_rows(tensors)[:16], values[0] + 1)


def test_packed_rows_never_repoints_a_tensor_listed_twice():
    t = torch.randn(16, 8)
    storage = t.untyped_storage().data_ptr()
    assert torch.equal(ops.packed_rows([t, t]), torch.cat([t, t]))
    assert t.untyped_storage().data_ptr() == storage and t.storage_offset() == 0
