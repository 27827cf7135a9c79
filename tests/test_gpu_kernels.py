"""Triton kernels (weight-only GEMM, row quantization), the persistent-reduction choice, eager
W8A8 corner cases and FP8 attention, on CUDA."""

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

from fp8_compile import attention, ops
from fp8_compile.zoo import DITS

from conftest import CUDA, SMALL, first_output, rel_error

pytestmark = CUDA


@pytest.mark.parametrize("m", [1, 2, 7, 64, 300, 1100])  # 1100: cuBLAS on dequantized slices
@pytest.mark.parametrize("n, k", [(3072, 3072), (64, 4096), (1000, 520)])
@pytest.mark.parametrize("granularity", ["per_row", "per_tensor"])
def test_weight_only_matches_float64(m, n, k, granularity, monkeypatch):
    # slices of 256 rows, so that the sliced path (m = 1100) cuts every weight above 256 rows
    monkeypatch.setattr(ops, "DEQUANTIZED_CHUNK_ELEMENTS", 256 * k)
    torch.manual_seed(m + n + k)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    # rows 100x apart in magnitude: a slice given another slice's scales fails
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * torch.logspace(-1, 1, n, device="cuda")[:, None].bfloat16()
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    wq, scale = ops.quantize_weight(w, granularity)
    out = ops.weight_only_linear(x, wq, scale, bias)
    ref = x.double() @ (wq.double() * scale.double()).T + bias.double()
    # bf16 activations and output: ~2**-8 relative; the weight is used exactly as quantized
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 2**-7
    if m >= 64:  # each output column (weight row) on its own, also the small ones
        assert ((out.double() - ref).norm(dim=0) / ref.norm(dim=0)).max().item() < 2**-7


@pytest.mark.parametrize("m", [1, 64, 1100])  # the GEMV, the Triton GEMM, cuBLAS on slices
def test_weight_only_computes_its_inputs_silu(m):
    """linear(silu(x)) with the SiLU in the kernel (the AdaLN modulation layers): against float64
    math on the same FP8 weight; the kernels keep SiLU's output in float32 (GEMV) or round it to
    bf16 as the model does (GEMMs), within the bf16 bound of the test above."""
    torch.manual_seed(m)
    x = torch.randn(m, 3072, device="cuda", dtype=torch.bfloat16) * 3
    wq, scale = ops.quantize_weight(torch.randn(9216, 3072, device="cuda", dtype=torch.bfloat16), "per_row")
    bias = torch.randn(9216, device="cuda", dtype=torch.bfloat16)
    out = ops.weight_only_linear(x, wq, scale, bias, input_silu=True)
    ref = F.silu(x.double()) @ (wq.double() * scale.double()).T + bias.double()
    assert ((out.double() - ref).norm() / ref.norm()).item() < 2**-7


@pytest.mark.parametrize("activation", ["none", "gelu_tanh", "gelu", "silu_mul"])
@pytest.mark.parametrize("k, k_prefix", [(3072, 0), (12288, 3072), (1000, 24)])
def test_quantize_rows_kernel_matches_the_reference(activation, k, k_prefix):
    torch.manual_seed(k)
    x = torch.randn(37, k, device="cuda", dtype=torch.bfloat16) * 3
    # rows whose GELU amax is not GELU(largest value): all negative, and all small
    x[3] = -x[3].abs()
    x[4] *= 0.01
    gate = torch.randn(37, k, device="cuda", dtype=torch.bfloat16) if activation == "silu_mul" else None
    prefix = torch.randn(37, k_prefix, device="cuda", dtype=torch.bfloat16) if k_prefix else None
    q, scale = ops.quantize_rows(x, gate, prefix, activation)
    ref_q, ref_scale = ops.quantize_rows(*(t.cpu() if t is not None else None for t in (x, gate, prefix)), activation)
    assert torch.allclose(scale.cpu(), ref_scale, rtol=1e-5)
    # the GPU evaluates GELU/SiLU with other float32 roundings: a value on a rounding boundary
    # may land one e4m3 step (2**-3 relative) away; such flips must stay rare
    ratio = (q.cpu().float() - ref_q.float()).abs() / ref_q.float().abs().clamp_min(2.0**-6)
    assert (ratio <= 2.0**-3 + 1e-6).all() and (ratio > 0).float().mean() < 1e-3
    x[5, 7] = float("nan")
    x[6, 9] = float("-inf")
    q, scale = ops.quantize_rows(x, gate, prefix, activation)
    assert torch.isnan(scale[5]).all() and torch.isfinite(scale[[4, 7]]).all()
    ref_scale = ops.quantize_rows(*(t.cpu() if t is not None else None for t in (x, gate, prefix)), activation)[1]
    torch.testing.assert_close(scale.cpu(), ref_scale, rtol=1e-5, atol=0, equal_nan=True)


@pytest.mark.parametrize("k, k_prefix", [(12288, 3072), (1000, 24)])
def test_quantize_rows_kernel_reads_an_fp8_prefix_with_its_scale(k, k_prefix):
    """FLUX's single-block rows [attention output in FP8 with V's scale, GELU(MLP)]: the kernel
    against the CPU reference. The prefix's values are up to 100x the MLP's, so a kernel that
    dropped the scale (1/448 of their amax) would get every row's scale wrong."""
    torch.manual_seed(k)
    x = torch.randn(37, k, device="cuda", dtype=torch.bfloat16) * 3
    prefix8, prefix_scale = ops.quantize_activation(torch.randn(37, k_prefix, device="cuda") * 300, "per_tensor")
    q, scale = ops.quantize_rows(x, None, prefix8, "gelu_tanh", prefix_scale)
    ref_q, ref_scale = ops.quantize_rows(x.cpu(), None, prefix8.cpu(), "gelu_tanh", prefix_scale.cpu())
    assert torch.allclose(scale.cpu(), ref_scale, rtol=1e-5)
    ratio = (q.cpu().float() - ref_q.float()).abs() / ref_q.float().abs().clamp_min(2.0**-6)
    assert (ratio <= 2.0**-3 + 1e-6).all() and (ratio > 0).float().mean() < 1e-3


@pytest.mark.parametrize("head_dim, two_parts, weights", [(128, True, True), (64, False, True), (80, True, False)])
def test_rms_norm_rotary_kernel_matches_the_reference(head_dim, two_parts, weights):
    """The fused q/k kernel against exact (float64) math, on strided inputs, batch 2, a head dim
    that is no power of 2 (80): the same scale as the CPU reference (the model's ops), and every
    value within half an e4m3 step of the exact one (the kernel keeps float32 throughout). The
    reference rounds to bf16 after the norm and after the rotation, which moves values where the
    rotation cancels: against it the kernel is close on the whole, and no further from exact."""
    torch.manual_seed(head_dim)
    heads, eps = 3, 1e-6
    parts = [torch.randn(2, tokens, heads, 2 * head_dim, device="cuda", dtype=torch.bfloat16)[..., :head_dim] * 3 for tokens in (24, 40)]
    if not two_parts:
        parts = parts[1:]
    norm_weights = [(0.5 + torch.rand(head_dim, device="cuda")).bfloat16() if weights else None for _ in parts]
    tokens = sum(p.shape[1] for p in parts)
    angles = torch.rand(tokens, head_dim // 2, device="cuda") * 6
    cos, sin = (t.repeat_interleave(2, dim=-1)[None, :, None] for t in (angles.cos(), angles.sin()))
    # the tables' bound as partial maxima (measured, as under regional compile), a tensor or a number
    rotary_bound = {128: attention.rotary_table_maxima(cos, sin), 64: 2.0, 80: torch.tensor(2.0, device="cuda")}[head_dim]
    args = [*parts, None][:2] + [*norm_weights, None][:2] + [eps, eps, cos, sin, rotary_bound]
    q8, scale = attention.rms_norm_rotary_fp8(*args)
    ref_q8, ref_scale = attention.rms_norm_rotary_fp8(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
    assert q8.shape == ref_q8.shape and q8.is_contiguous()
    assert scale.item() == pytest.approx(ref_scale.item(), rel=1e-6)
    x = torch.cat([F.rms_norm(p.double(), (head_dim,), None if w is None else w.double(), eps) for p, w in zip(parts, norm_weights)], 1)
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    exact = (x * cos.double() + torch.stack([-pairs[..., 1], pairs[..., 0]], -1).flatten(3) * sin.double()).cpu()
    exact_fp8_units = exact / scale.item()
    assert exact_fp8_units.abs().max() <= 448  # the bound holds
    # round to nearest: half a step, 2^-4 relative for normal values, 2^-10 for subnormals
    half_step = (2.0**-4 * exact_fp8_units.abs()).clamp_min(2.0**-10) + 1e-4
    assert ((q8.cpu().double() - exact_fp8_units).abs() <= half_step).all()
    assert rel_error(q8.cpu(), ref_q8) < 0.03
    kernel_error = rel_error(q8.cpu().double() * scale.item(), exact)
    assert kernel_error <= rel_error(ref_q8.double() * ref_scale.item(), exact)


@pytest.mark.parametrize("tokens, head_dim", [(4608, 128), (77, 80), (3, 64)])
def test_rotary_table_maxima_kernel(tokens, head_dim):
    """Partial maxima whose rows' maxima are max|cos| and max|sin| exactly (tables of FLUX's
    size, an odd one, fewer rows than partials; strided), and NaN where a table has one."""
    torch.manual_seed(tokens)
    cos, sin = (torch.randn(tokens, 2 * head_dim, device="cuda")[:, :head_dim] * scale for scale in (1.0, 3.0))
    maxima = attention.rotary_table_maxima(cos[None, :, None], sin[None, :, None])
    assert maxima.shape == (2, min(tokens, 128))
    assert torch.equal(maxima.amax(-1).cpu(), torch.stack([cos.abs().max(), sin.abs().max()]).cpu())
    sin[tokens // 2, head_dim - 1] = float("nan")
    maxima = attention.rotary_table_maxima(cos, sin)
    assert torch.isnan(maxima[1]).any() and not torch.isnan(maxima[0]).any()


def test_inductor_sees_what_the_fused_q_k_kernels_write():
    """The fused q/k kernel and the rotary tables' maxima kernel are triton_ops that Inductor
    launches itself; its analysis of what each kernel writes must succeed (where it fails, as
    torch 2.11's did on a float argument's ``.to()``, Inductor assumes every input written and
    copies Q, K and the tables around each call). Compiled, the query is the eager one, and no
    kernel is spent on the 0-dim scale."""
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("torch._higher_order_ops.triton_kernel_wrap")
    logger.addHandler(handler)
    torch.manual_seed(0)
    text, image = (torch.randn(1, t, 24, 128, device="cuda", dtype=torch.bfloat16) for t in (32, 96))
    weights = [torch.rand(128, device="cuda", dtype=torch.bfloat16) + 0.5 for _ in range(2)]
    angles = torch.rand(128, 64, device="cuda") * 6
    cos, sin = (t.repeat_interleave(2, dim=-1)[None, :, None] for t in (angles.cos(), angles.sin()))

    def query(text, image, cos, sin):
        return attention.rms_norm_rotary_fp8(text, image, *weights, 1e-6, 1e-6, cos, sin, attention.rotary_table_maxima(cos, sin))

    try:
        torch._dynamo.reset()
        compiled, (code,) = run_and_get_code(torch.compile(query, fullgraph=True), text, image, cos, sin)
    finally:
        logger.removeHandler(handler)
    assert not [r for r in records if "assuming every input is mutated" in r.getMessage()]
    assert code.count("_rms_norm_rotary_fp8_kernel") >= 1 and "fp8_compile.rms_norm_rotary_fp8" not in code
    assert not re.search(r"def triton_\w+_empty", code)
    eager = query(text, image, cos, sin)
    assert compiled[1].shape == eager[1].shape == ()
    assert torch.equal(compiled[0].float(), eager[0].float()) and torch.equal(compiled[1], eager[1])


def test_only_reductions_that_write_fp8_are_forced_persistent():
    """Rows of 5120 (Wan2.2's width): the norm + quantize kernel keeps the row on chip (one
    pass); a norm that writes BF16 keeps Inductor's choice (forced persistent, Wan2.2's q/k
    RMSNorm + RoPE ran 22x slower)."""
    x = torch.randn(4096, 5120, device="cuda", dtype=torch.bfloat16)

    def norm_then_quantize(x):
        return ops.quantize_activation(F.rms_norm(x, (5120,)) * 2, "per_row")

    def norm_only(x):
        return (F.rms_norm(x, (5120,)) * 2).sin()

    torch._dynamo.reset()
    _, (code,) = run_and_get_code(torch.compile(norm_then_quantize, backend="omni_fp8"), x)
    assert re.search(r"def triton_per_\w+", code) and not re.search(r"def triton_red_\w+", code)
    _, (code,) = run_and_get_code(torch.compile(norm_only, backend="omni_fp8"), x)
    assert re.search(r"def triton_red_\w+", code) and not re.search(r"def triton_per_\w+", code)


def test_fp8_linear_takes_float32_activations_with_a_bias():
    """CUDA's _scaled_mm refuses a bias with a float32 output; the bias is added after it."""
    torch.manual_seed(0)
    x = torch.randn(64, 256, device="cuda")
    w = torch.randn(128, 256, device="cuda")
    bias = torch.randn(128, device="cuda")
    wq, scale = ops.quantize_weight(w, "per_row")
    out = ops.fp8_linear(x, wq, scale, bias, "per_row", False)
    xq, x_scale = ops.quantize_activation(x, "per_row")
    ref = (xq.double() * x_scale.double()) @ (wq.double() * scale.double()).T + bias.double()
    # Hopper's FP8 tensor cores accumulate below float32 precision (1.3e-4 measured on an H100);
    # a bias left out would be off by ~6% (|bias| ~1 against outputs ~16)
    assert out.dtype == torch.float32 and ((out.double() - ref).norm() / ref.norm()).item() < 1e-3


def test_fp8_linear_takes_a_transposed_activation():
    """A column-major view (a transposed input) reaches cuBLASLt as row-major rows."""
    torch.manual_seed(0)
    x = torch.randn(1, 256, 64, device="cuda", dtype=torch.bfloat16).transpose(1, 2)  # [1, 64, 256]
    wq, scale = ops.quantize_weight(torch.randn(128, 256, device="cuda", dtype=torch.bfloat16), "per_row")
    out = ops.fp8_linear(x, wq, scale, None, "per_row", True)
    assert torch.equal(out, ops.fp8_linear(x.contiguous(), wq, scale, None, "per_row", True))


def test_fp8_attention_matches_its_reference():
    """cuDNN's FP8 attention against the CPU's reference of it (the same FP8 operands, the
    probabilities and the output rounded to FP8 where cuDNN rounds them) and against exact
    attention, on FLUX-like operands stored token-major as a linear layer writes them."""
    pytest.importorskip("cudnn")
    if torch.cuda.get_device_capability() < attention.MIN_CAPABILITY:
        pytest.skip("cuDNN's FP8 attention needs Hopper or newer")
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 1024, 4, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    q, k = q * 1.5, k * 1.5  # logits spread as after a q/k RMSNorm
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    out = attention.fp8_attention(q, k, v, 128**-0.5)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape and out.stride() == q.stride()
    (q8, sq), (k8, sk), (v8, sv) = (ops.quantize_activation(t, "per_tensor") for t in (q, k, v))
    reference = attention._reference_sdpa(q8, k8, v8, sq, sk, sv, sv.reciprocal(), 128**-0.5).double() * sv
    error, reference_error = rel_error(out.double(), exact), rel_error(reference, exact)
    print(f"fp8 attention error {error:.4f}, reference {reference_error:.4f}, apart {rel_error(out.double(), reference):.4f}")
    # FP8's 3 mantissa bits give each rounding ~3.6% rms; both land at ~9% of exact attention
    assert error < 0.12 and abs(error - reference_error) < 0.02
    # where they round differently (cuDNN's running row max) they differ by about one FP8 step
    assert rel_error(out.double(), reference) < 0.05


def test_fp8_attention_refuses_a_scale_cudnn_would_misread():
    """cuDNN is handed raw pointers and reads one float32 at each: a bfloat16 scale is refused,
    naming the argument, instead of being read as garbage."""
    pytest.importorskip("cudnn")
    if torch.cuda.get_device_capability() < attention.MIN_CAPABILITY:
        pytest.skip("cuDNN's FP8 attention needs Hopper or newer")
    q8 = torch.randn(1, 2, 128, 64, device="cuda").to(ops.FP8_DTYPE)
    one = torch.ones((), device="cuda")
    with pytest.raises(ValueError, match="k_scale must be one float32"):
        attention.fp8_sdpa(q8, q8, q8, one, one.bfloat16(), one, one, 0.125)


def test_compiled_flux_with_fp8_attention_replays_as_cuda_graphs():
    """Tiny FLUX (head dim 64) through Inductor with FP8 attention and CUDA graphs: cuDNN's op
    is captured and replayed, the output moves (attention really is quantized), and its error
    against the float32 model stays at that of the FP8 linears alone (1.3x, as on the CPU)."""
    pytest.importorskip("cudnn")
    if torch.cuda.get_device_capability() < attention.MIN_CAPABILITY:
        pytest.skip("cuDNN's FP8 attention needs Hopper or newer")
    spec = DITS["flux"]
    torch.manual_seed(0)
    model = spec.build("tiny", torch.float32, "cuda", attention_head_dim=64, axes_dims_rope=(16, 24, 24))
    torch.manual_seed(1)
    inputs = spec.inputs(model, SMALL, torch.float32, "cuda")
    outputs = {}
    with torch.no_grad():
        expected = first_output(model(**inputs))
        for fp8_attention in (False, True):
            torch._dynamo.reset()
            # strict: an Inductor failure would run the op uncompiled, without CUDA graphs
            options = {"fp8_attention": fp8_attention, "cudagraphs": True, "strict": True}
            compiled = torch.compile(copy.deepcopy(model), backend="omni_fp8", options=options)
            for _ in range(3):  # warm-up, record, replay
                outputs[fp8_attention] = first_output(compiled(**inputs)).clone()
    assert rel_error(outputs[True], outputs[False]) > 1e-3
    assert rel_error(outputs[True], expected) < 1.3 * rel_error(outputs[False], expected)
