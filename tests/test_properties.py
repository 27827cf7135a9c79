"""Property tests (hypothesis): the FP8 primitives and linear layers on random shapes, dtypes,
magnitudes and granularities, against float64 with the bounds of fp8_bounds.py.

Shapes include 1, odd sizes and sizes that are not multiples of 16 (the layer is then kept in
BF16 and reported so); magnitudes run from 1e-6 to 1e4, with up to six decades of spread inside
a row, so that many scaled values land in e4m3's subnormal range or round to zero.
"""

import pytest
import torch
import torch.nn as nn

pytest.importorskip("hypothesis")  # the GPU machine may lack it: skip, still collect the suite
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fp8_compile  # noqa: E402
from fp8_compile import Decision, ScaledLinear, ops  # noqa: E402

from fp8_bounds import dequantize, gemm_rounding_bound, linear_bound, quantization_bound  # noqa: E402

# The suite's autouse fixture resets Dynamo once per test, not per example, which is what it is
# meant to do here; nothing is written to a .hypothesis database in the checkout.
PROPERTY = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

DTYPES = st.sampled_from([torch.bfloat16, torch.float16])
GRANULARITIES = st.sampled_from(["per_row", "per_tensor"])
LEADING_DIMS = st.lists(st.sampled_from([1, 2, 3, 5, 7, 16, 17]), min_size=1, max_size=3)  # batch, sequence, ...
GEMM_SIZE = st.integers(1, 8).map(lambda n: 16 * n)  # K or N that the FP8 GEMM takes
ANY_SIZE = st.integers(1, 80)
MAGNITUDE = st.floats(-6, 4)  # log10 of the largest magnitude
SPREAD = st.floats(0, 6)  # decades of magnitude inside the tensor
ZERO_ROWS = st.sampled_from(["none", "some", "all"])
SEED = st.integers(0, 2**31 - 1)


def random_tensor(shape, dtype, magnitude: float, spread: float, seed: int) -> torch.Tensor:
    """Values up to 10**magnitude, each scaled down by a random 0..spread decades."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1
    decades = torch.rand(shape, generator=generator, dtype=torch.float64) * spread
    return (values * 10.0 ** (magnitude - decades)).to(dtype)


def zero_out_rows(t: torch.Tensor, which: str) -> torch.Tensor:
    rows = t.reshape(-1, t.shape[-1])
    if which == "all":
        rows.zero_()
    elif which == "some":
        rows[::2] = 0
    return t


def weight_magnitude(dtype: torch.dtype, x_magnitude: float, w_magnitude: float) -> float:
    # In fp16, x @ w.T over K <= 128 terms must stay below its 65504 maximum, as it must for the
    # fp16 layer itself: keep |x||w| <= 1e2.
    return min(w_magnitude, 2 - x_magnitude) if dtype == torch.float16 else w_magnitude


@settings(PROPERTY, max_examples=150)
@given(
    rows=ANY_SIZE, cols=ANY_SIZE, dtype=DTYPES, granularity=GRANULARITIES, magnitude=MAGNITUDE,
    spread=SPREAD, zeros=ZERO_ROWS, seed=SEED, operand=st.sampled_from(["weight", "activation"]),
)
def test_quantization_moves_each_value_by_at_most_one_e4m3_rounding(
    rows, cols, dtype, granularity, magnitude, spread, zeros, seed, operand
):
    x = zero_out_rows(random_tensor((rows, cols), dtype, magnitude, spread, seed), zeros)
    quantize = ops.quantize_weight if operand == "weight" else ops.quantize_activation
    q, scale = quantize(x, granularity)
    assert q.dtype == ops.FP8_DTYPE and q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == ((rows, 1) if granularity == "per_row" else ())
    # zero rows and tensors: a positive finite scale, zeros out, no 0/0
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert not q.float().isnan().any() and (q.float().abs() <= ops.FP8_MAX).all()
    assert ((dequantize(q, scale) - x.double()).abs() <= quantization_bound(x, scale)).all()
    # each group's largest magnitude lands exactly on +-448 with its sign (below the amax floor,
    # groups are scaled as if their amax were the floor)
    groups = (x, q) if granularity == "per_row" else (x.reshape(1, -1), q.reshape(1, -1))
    top = groups[0].float().abs().argmax(dim=1, keepdim=True)
    x_top, q_top = groups[0].float().gather(1, top), groups[1].float().gather(1, top)
    saturated = x_top.abs() >= ops.AMAX_FLOOR
    assert (q_top[saturated] == ops.FP8_MAX * x_top[saturated].sign()).all()
    assert (q_top[x_top == 0] == 0).all()


@settings(PROPERTY, max_examples=100)
@given(
    rows=ANY_SIZE, cols=ANY_SIZE, dtype=DTYPES, magnitude=MAGNITUDE, spread=SPREAD, seed=SEED,
    log_scale=st.floats(-6, 4),
)
def test_static_quantization_saturates_at_448_and_rounds_the_rest(rows, cols, dtype, magnitude, spread, seed, log_scale):
    x = random_tensor((rows, cols), dtype, magnitude, spread, seed)
    scale = torch.tensor(10.0**log_scale, dtype=torch.float32)
    q = ops.quantize_activation_static(x, scale).float()
    assert not q.isnan().any() and (q.abs() <= ops.FP8_MAX).all()
    scaled = x.double() / scale.double()
    beyond = scaled.abs() >= ops.FP8_MAX
    assert (q[beyond] == ops.FP8_MAX * scaled[beyond].sign()).all()
    error = (dequantize(q, scale) - x.double()).abs()
    assert (error[~beyond] <= quantization_bound(x, scale)[~beyond]).all()


def _linear_inputs(lead, k, n, dtype, x_magnitude, w_magnitude, spread, bias, seed):
    w_magnitude = weight_magnitude(dtype, x_magnitude, w_magnitude)
    x = random_tensor((*lead, k), dtype, x_magnitude, spread, seed)
    w = random_tensor((n, k), dtype, w_magnitude, spread, seed + 1)
    b = random_tensor((n,), dtype, x_magnitude + w_magnitude, 0, seed + 2) if bias else None
    return x, w, b


def _reference(x2d, w, b):
    return x2d.double() @ w.double().T + (b.double() if b is not None else 0)


@settings(PROPERTY, max_examples=80)
@given(
    lead=LEADING_DIMS, k=GEMM_SIZE, n=GEMM_SIZE, dtype=DTYPES, granularity=GRANULARITIES, bias=st.booleans(),
    x_magnitude=MAGNITUDE, w_magnitude=MAGNITUDE, spread=st.floats(0, 3), zeros=ZERO_ROWS, seed=SEED,
)
def test_fp8_linear_is_within_the_e4m3_bound_of_float64(
    lead, k, n, dtype, granularity, bias, x_magnitude, w_magnitude, spread, zeros, seed
):
    x, w, b = _linear_inputs(lead, k, n, dtype, x_magnitude, w_magnitude, spread, bias, seed)
    zero_out_rows(x, zeros)
    wq, w_scale = ops.quantize_weight(w, granularity)
    out = ops.fp8_linear(x, wq, w_scale, b, granularity, fast_accum=False)
    assert out.shape == (*lead, n) and out.dtype == dtype

    x2d, out2d = x.reshape(-1, k), out.reshape(-1, n).double()
    xq, x_scale = ops.quantize_activation(x2d, granularity)
    assert ((out2d - _reference(x2d, w, b)).abs() <= linear_bound(x2d, w, x_scale, w_scale, b, dtype)).all()
    # Given its quantized operands, the FP8 GEMM is exact up to float32 accumulation and the
    # output rounding: this tighter check catches a scale applied to the wrong row or channel.
    x_hat, w_hat = dequantize(xq, x_scale), dequantize(wq, w_scale)
    rounding = gemm_rounding_bound(x_hat.abs() @ w_hat.abs().T, k, b, dtype)
    assert ((out2d - _reference(x_hat, w_hat, b)).abs() <= rounding).all()
    if zeros == "all":
        assert torch.equal(out2d, (b.double() if bias else torch.zeros(n, dtype=torch.float64)).expand_as(out2d))


@settings(PROPERTY, max_examples=60)
@given(
    lead=LEADING_DIMS, k=ANY_SIZE, n=ANY_SIZE, dtype=DTYPES, granularity=GRANULARITIES, bias=st.booleans(),
    x_magnitude=MAGNITUDE, w_magnitude=MAGNITUDE, seed=SEED,
)
def test_scaled_linear_is_within_the_bound_or_reported_as_kept_in_bf16(
    lead, k, n, dtype, granularity, bias, x_magnitude, w_magnitude, seed
):
    x, w, b = _linear_inputs(lead, k, n, dtype, x_magnitude, w_magnitude, 1.0, bias, seed)
    model = nn.Sequential(nn.Linear(k, n, bias=bias, dtype=dtype))
    with torch.no_grad():
        model[0].weight.copy_(w)
        if bias:
            model[0].bias.copy_(b)
        before = model(x)
    [layer] = fp8_compile.quantize_(model, {"granularity": granularity}).layers
    with torch.no_grad():
        out = model(x)

    if k % 16 or n % 16:
        dim, size = ("K", k) if k % 16 else ("N", n)
        assert layer.decision is Decision.BF16 and layer.reason == f"{dim}={size} not a multiple of 16"
        assert type(model[0]) is nn.Linear and torch.equal(out, before)
        return
    assert layer.decision is Decision.FP8 and isinstance(model[0], ScaledLinear)
    x2d = x.reshape(-1, k)
    _, x_scale = ops.quantize_activation(x2d, granularity)
    bound = linear_bound(x2d, w, x_scale, model[0].weight_scale, b, dtype)
    assert ((out.reshape(-1, n).double() - _reference(x2d, w, b)).abs() <= bound).all()


@settings(PROPERTY, max_examples=6)
@given(
    lead=LEADING_DIMS, k=st.sampled_from([16, 48, 80, 144]), n=GEMM_SIZE, dtype=DTYPES,
    granularity=GRANULARITIES, bias=st.booleans(), x_magnitude=MAGNITUDE, w_magnitude=MAGNITUDE, seed=SEED,
)
def test_compiled_scaled_linear_is_within_the_bound(lead, k, n, dtype, granularity, bias, x_magnitude, w_magnitude, seed):
    """The same through the backend, where Inductor generates the quantization kernels (odd row
    counts and K beyond one vector width exercise their tails)."""
    torch._dynamo.reset()
    x, w, b = _linear_inputs(lead, k, n, dtype, x_magnitude, w_magnitude, 1.0, bias, seed)
    layer = nn.Linear(k, n, bias=bias, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(w)
        if bias:
            layer.bias.copy_(b)
    model = nn.Sequential(layer)
    fp8_compile.quantize_(model, {"granularity": granularity})
    with torch.no_grad():
        out = torch.compile(model, backend="omni_fp8")(x)
    x2d = x.reshape(-1, k)
    _, x_scale = ops.quantize_activation(x2d, granularity)
    bound = linear_bound(x2d, w, x_scale, layer.weight_scale, b, dtype)
    assert ((out.reshape(-1, n).double() - _reference(x2d, w, b)).abs() <= bound).all()
