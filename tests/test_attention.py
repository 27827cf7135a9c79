"""FP8 attention (option ``fp8_attention``): the op's CPU reference, the pass, the errors."""

import copy
import logging
import math
import sys

import pytest
import torch
import torch.nn.functional as F

import fp8_compile
from fp8_compile import attention, ops
from fp8_compile.backend import FP8_PASSES
from fp8_compile.config import Fp8Config
from fp8_compile.passes import FeedFp8AttentionOutput, FuseNormRotaryQuantization, PassManager

from conftest import build, first_output, rel_error
from test_passes import count, traced_after_passes

FP8_ATTENTION = Fp8Config(fp8_attention=True)
# the passes without the fused norm + rotation + cast, which hands the attention FP8 operands:
# the bounds are checked against the values they bound
UNFUSED_PASSES = PassManager([p for p in FP8_PASSES.passes if not isinstance(p, FuseNormRotaryQuantization)])


def operands(heads=2, tokens=256, head_dim=64, seed=0):
    """Stored token-major (as a linear layer writes them), viewed as [batch, heads, tokens, dim];
    q and k scaled so that the logits spread as after a q/k RMSNorm."""
    torch.manual_seed(seed)
    q, k, v = (torch.randn(1, tokens, heads, head_dim).transpose(1, 2) for _ in range(3))
    return q * 1.5, k * 1.5, v


def test_fp8_attention_error_is_fp8_sized():
    """Against exact attention the error is FP8's (3 mantissa bits: ~3.6% rms per rounding, of
    Q, K, V, the probabilities and the output: 6-12% in all, 8.3% measured for cuDNN on an H100);
    against exact attention of the already quantized Q, K, V it must be clearly smaller (only the
    probabilities and the output are rounded): a kernel that skipped the operands' scales would
    not be."""
    q, k, v = operands()
    out = attention.fp8_attention(q, k, v, 64**-0.5)
    assert out.dtype == q.dtype and out.shape == q.shape and out.stride() == q.stride()
    error = rel_error(out, F.scaled_dot_product_attention(q.double(), k.double(), v.double()))
    assert 0.03 < error < 0.12
    dequantized = [q8.double() * s for q8, s in (ops.quantize_activation(t, "per_tensor") for t in (q, k, v))]
    assert rel_error(out, F.scaled_dot_product_attention(*dequantized)) < 0.6 * error


def test_fp8_attention_rounds_where_the_kernel_rounds():
    """One query, two keys, values worked out by hand. Q, K, V are exact in FP8 (each amax maps
    to 448). With scale = -ln(0.3) the logits are [0, -1.204], so the unnormalised probabilities
    are [1, 0.3]; times 448 that is [448, 134.4], and e4m3 (steps of 16 from 128 to 256) rounds
    134.4 to 128: P = [1, 2/7]. Divided by the unrounded row sum 1.3, the output is [0.769,
    0.220]; in V's scale (1/448) that is [344.6, 98.5], rounded to e4m3 [352, 96]. Without the
    probability rounding the second value would be 104/448; with scale 1/sqrt(16) another
    softmax altogether."""
    d = 16
    q = torch.zeros(1, 1, 1, d)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, 2, d)
    k[0, 0, 1, 0] = -1.0
    v = torch.zeros(1, 1, 2, d)
    v[0, 0, 0, 0] = v[0, 0, 1, 1] = 1.0
    out = attention.fp8_attention(q, k, v, -math.log(0.3))
    expected = torch.zeros(1, 1, 1, d)
    expected[..., 0], expected[..., 1] = 352 / 448, 96 / 448
    # float32 rounding of the scales only: one e4m3 step here is 32/448 or 8/448
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-7)


def test_fp8_attention_output_scale_is_v_scale():
    """V 1000x larger, or 1000x smaller, gives the same relative error: the output's FP8 scale
    follows V's, so it neither overflows nor sinks into e4m3's subnormals."""
    q, k, v = operands()
    errors = []
    for factor in (1e-3, 1.0, 1e3):
        out = attention.fp8_attention(q, k, v * factor, 64**-0.5)
        errors.append(rel_error(out, F.scaled_dot_product_attention(q.double(), k.double(), v.double() * factor)))
    assert max(errors) - min(errors) < 1e-3 and max(errors) < 0.12


@pytest.mark.parametrize(
    "shapes, reason",
    [
        (([1, 2, 16, 256], [1, 2, 16, 256], [1, 2, 16, 256]), "head dim 256"),
        (([1, 2, 16, 40], [1, 2, 16, 40], [1, 2, 16, 40]), "head dim 40"),
        (([1, 4, 16, 64], [1, 2, 16, 64], [1, 2, 16, 64]), "one head count"),
        (([2, 16, 64], [2, 16, 64], [2, 16, 64]), "3 dimensions"),
    ],
)
def test_unsupported_operands_are_named(shapes, reason):
    assert reason in attention.unsupported_reason(*(torch.empty(s) for s in shapes))


def test_flux_attention_runs_in_fp8_when_asked():
    """Tiny FLUX: its 4 attention calls (2 double, 2 single blocks) become FP8 attention with
    the option and stay SDPA without it."""
    model, inputs = build("flux")
    fp8_compile.quantize_(model)
    graph = traced_after_passes(model, inputs, config=FP8_ATTENTION)
    fp8_calls = count(graph, attention.fp8_attention) + count(graph, attention.fp8_attention_quantized)
    assert fp8_calls == 4 and count(graph, F.scaled_dot_product_attention) == 0
    graph = traced_after_passes(model, inputs)
    assert count(graph, attention.fp8_attention_quantized) == 0 and count(graph, F.scaled_dot_product_attention) == 4


@pytest.mark.parametrize("heads, norm_size, weight_spread", [(24, 128, 0.0), (40, 5120, 2.0)])
def test_a_bound_instead_of_the_amax_costs_no_accuracy(heads, norm_size, weight_spread):
    """Q and K scaled from their RMSNorm bound, sqrt(d) max|w| (times 2 for a rotary embedding),
    instead of their amax: 5x above the amax for FLUX's per-head norm with unit weights, 56x for
    a Wan-like norm over all 5120 channels with log-normal weights (e^(2 z)). e4m3 keeps 3 mantissa
    bits down to 2^-6 of the scale, so the error against exact attention stays that of the amax
    scale (within 5%). A scale that forgot to divide the bound by 448 would lose everything."""
    torch.manual_seed(0)
    weight = torch.exp(weight_spread * torch.randn(norm_size))
    head_dim, tokens = 128, 256

    def normalized():
        x = torch.randn(1, tokens, heads * head_dim).unflatten(-1, (-1, norm_size))
        x = F.rms_norm(x, (norm_size,), weight, 1e-6)
        return x.reshape(1, tokens, heads, head_dim).transpose(1, 2).bfloat16()

    q, k = normalized(), normalized()
    v = torch.randn(1, tokens, heads, head_dim).transpose(1, 2).bfloat16()
    bound = 2 * math.sqrt(norm_size) * weight.max().item()
    assert bound > 4 * q.abs().max().item()
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    amax_error = rel_error(attention.fp8_attention(q, k, v), exact)
    bound_error = rel_error(attention.fp8_attention(q, k, v, None, bound, torch.tensor(bound)), exact)
    assert bound_error < 1.05 * amax_error


def test_an_operand_given_in_fp8_needs_its_scale():
    """A query handed over already in FP8 (by the fused norm + rotation kernel) comes with its
    scale; without one there is nothing to tell cuDNN, and the call says which argument is missing."""
    q, k, v = operands()
    q8, q_scale = ops.quantize_activation(q, "per_tensor")
    with pytest.raises(ValueError, match="query_scale / key_scale"):
        attention.fp8_attention(q8, k, v)
    torch.testing.assert_close(attention.fp8_attention(q8, k, v, query_scale=q_scale), attention.fp8_attention(q, k, v))


def test_a_bound_below_the_data_saturates_instead_of_overflowing():
    """Should a bound ever be wrong, the values above it saturate at 448 (a finite, clipped
    output), rather than becoming NaN or Inf."""
    q, k, v = operands()
    out = attention.fp8_attention(q, k, v, None, 0.5 * q.abs().max(), 0.5 * k.abs().max())
    assert out.isfinite().all()


def test_a_bound_sets_the_scale(monkeypatch):
    """Q and K given bounds are scaled by bound / 448; V, given none, by its amax / 448."""
    q, k, v = operands()
    scales = {}

    def recording(q8, k8, v8, q_scale, k_scale, v_scale, *rest):
        scales.update(q=q_scale.item(), k=k_scale.item(), v=v_scale.item())
        return attention._reference_sdpa(q8, k8, v8, q_scale, k_scale, v_scale, *rest)

    monkeypatch.setattr(attention, "fp8_sdpa", recording)
    attention.fp8_attention(q, k, v, None, 30.0, torch.tensor(50.0))
    assert scales["q"] == pytest.approx(30 / 448) and scales["k"] == pytest.approx(50 / 448)
    assert scales["v"] == pytest.approx(v.abs().max().item() / 448)


def bounds_seen(graph):
    """Run the traced graph, recording each FP8 attention call's (amax, bound) for Q and for K."""
    seen = []

    def recorded(call):
        def recording(q, k, v, scale=None, query_bound=None, key_bound=None):
            for t, bound in ((q, query_bound), (k, key_bound)):
                seen.append((t.abs().max().item(), None if bound is None else float(bound)))
            return call(q, k, v, scale, query_bound, key_bound)

        return recording

    for node in graph.gm.graph.nodes:
        if node.target in (attention.fp8_attention, attention.fp8_attention_quantized):
            node.target = recorded(node.target)
    graph.gm.recompile()
    with torch.no_grad():
        graph.gm(*graph.example_inputs)
    return seen


@pytest.mark.parametrize(
    "name, calls, bounded", [("flux", 4, 4), ("flux2_klein", 3, 3), ("wan", 4, 4), ("glm_image", 2, 0)]
)
def test_q_and_k_of_the_models_are_scaled_from_a_bound_that_holds(name, calls, bounded, caplog):
    """The converted calls of these models get their Q and K bound from the graph (their RMSNorm,
    FLUX's rotary embedding, Wan's written into a buffer, Wan's cross-attention to the text), the
    bound holds for the values, and it is no looser than the norm's worst case predicts: tiny
    models normalize 32 or 64 channels, sqrt(64) x 2 (rotary) = 16 against amaxes of ~3.5.
    GLM-Image writes its rotary embedding into part of the normalized Q and K in place, which
    the bounds do not follow: its calls measure their amax."""
    model, inputs = build(name)
    fp8_compile.quantize_(model)
    with caplog.at_level(logging.INFO, logger="fp8_compile"):
        graph = traced_after_passes(model, inputs, config=FP8_ATTENTION, passes=UNFUSED_PASSES)
    message = f"Q scaled from its normalization's bound (no amax pass) in {bounded}, K in {bounded} of {calls}"
    assert any(message in r.getMessage() for r in caplog.records)
    seen = bounds_seen(graph)
    assert len(seen) == 2 * calls and sum(bound is not None for _, bound in seen) == 2 * bounded
    for amax, bound in seen:
        assert bound is None or (amax <= bound * (1 + 2**-7) and bound < 8 * amax), (amax, bound)


def test_a_normalized_query_written_in_place_gets_no_bound():
    """``q = rms_norm(q); q.mul_(100)``: the norm's bound no longer holds, and a graph that
    writes in place gets no bounds at all (K neither), so both measure their amax (a bound kept
    would saturate nearly every value of Q at 448). The in-place multiply stays in the graph
    (FX's dead-code elimination counts no method call as a side effect): the output is that of
    FP8 attention on the multiplied Q, to float32 rounding."""

    def call(q, k, v):
        q = F.rms_norm(q, (64,))
        q.mul_(100)
        return F.scaled_dot_product_attention(q, F.rms_norm(k, (64,)), v)

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8, 256, 64) for _ in range(3))
    graph = traced_after_passes(SelfAttention(call), {"q": q, "k": k, "v": v}, FP8_ATTENTION)
    (query, query_bound), (_, key_bound) = bounds_seen(graph)
    assert query == pytest.approx(100 * F.rms_norm(q, (64,)).abs().max().item())
    assert query_bound is None and key_bound is None
    with torch.no_grad():
        expected = attention.fp8_attention(F.rms_norm(q, (64,)) * 100, F.rms_norm(k, (64,)), v)
        torch.testing.assert_close(graph.gm(q, k, v)[0], expected, rtol=1e-5, atol=1e-5)


def _scaled_in_place(q, k):
    q = F.rms_norm(q, (64,))
    alias = q.transpose(1, 2).transpose(1, 2)
    q *= 100
    return alias


@pytest.mark.parametrize(
    "query",
    [
        pytest.param(lambda q, k: q * torch.rsqrt(q.pow(2).mean(-2, keepdim=True) + 1e-6), id="mean-over-tokens"),
        pytest.param(lambda q, k: q * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + 1e-6), id="rms-of-another-tensor"),
        pytest.param(
            lambda q, k: q * torch.rsqrt(torch.add(q.pow(2).mean(-1, keepdim=True), 0.99, alpha=-1)), id="alpha"
        ),
        pytest.param(
            lambda q, k: q * torch.rsqrt(q.to(torch.int32).float().pow(2).mean(-1, keepdim=True) + 1e-6),
            id="rms-of-an-integer-cast",
        ),
        pytest.param(lambda q, k: F.layer_norm(q, (64,), eps=-0.5), id="negative-eps"),
        pytest.param(lambda q, k: F.rms_norm(q, (64,)).view(torch.int32).float(), id="view-as-another-dtype"),
        pytest.param(_scaled_in_place, id="scaled-in-place-through-an-alias"),
        pytest.param(lambda q, k: F.rms_norm(q, (64,)).narrow(-1, 0, 64).mul_(100), id="in-place-on-a-narrowed-view"),
    ],
)
def test_what_does_not_bound_q_gives_no_bound(query):
    """Look-alikes of a normalization, reinterpreted bits and writes through aliases: Q measures
    its amax. (Any of these bounded by sqrt(64) = 8 would clip Q, whose amax here is 8.7-435.)"""

    def call(q, k, v):
        return F.scaled_dot_product_attention(query(q, k), F.rms_norm(k, (64,)), v)

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8, 256, 64) for _ in range(3))
    graph = traced_after_passes(SelfAttention(call), {"q": q, "k": k, "v": v}, FP8_ATTENTION)
    assert bounds_seen(graph)[0][1] is None


class NormRotaryAttention(torch.nn.Module):
    """Qwen-Image's and Z-Image's way: RMSNorm spelled out (x * rsqrt(mean(x^2) + eps), then the
    weight) and a complex rotary embedding, on Q and K; V unnormalized."""

    def __init__(self, head_dim=64):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + torch.rand(head_dim))

    def norm(self, x):
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        return x.to(self.weight.dtype) * self.weight

    def rotate(self, x, freqs):
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * freqs).flatten(3).type_as(x)

    def forward(self, q, k, v, freqs):
        q, k = (self.rotate(self.norm(t), freqs) for t in (q, k))
        return F.scaled_dot_product_attention(q, k, v)


def test_a_norm_spelled_out_and_a_complex_rotation_are_bounded_and_v_is_not(caplog):
    torch.manual_seed(0)
    # 8 heads: the rotary table (256 x 32) is small enough next to Q and K to be reduced
    q, k, v = (torch.randn(1, 8, 256, 64) for _ in range(3))
    freqs = torch.polar(torch.ones(256, 32), torch.rand(256, 32) * 6)
    with caplog.at_level(logging.INFO, logger="fp8_compile"):
        graph = traced_after_passes(NormRotaryAttention(), {"q": q, "k": k, "v": v, "freqs": freqs}, FP8_ATTENTION)
    assert any("bound (no amax pass) in 1, K in 1 of 1" in r.getMessage() for r in caplog.records)
    for amax, bound in bounds_seen(graph):
        assert amax <= bound * (1 + 2**-7) and bound < 8 * amax, (amax, bound)
    # V (and here Q and K without the norm) have no bound: they measure their amax
    unnormalized = SelfAttention(lambda q, k, v: F.scaled_dot_product_attention(q, k, v))
    assert bounds_seen(traced_after_passes(unnormalized, {"q": q, "k": k, "v": v}, FP8_ATTENTION)) == [
        (q.abs().max().item(), None),
        (k.abs().max().item(), None),
    ]


class SelfAttention(torch.nn.Module):
    """One SDPA call spelled as ``call`` says, on [batch, heads, tokens, head_dim] operands."""

    def __init__(self, call):
        super().__init__()
        self.call = call

    def forward(self, q, k, v):
        return self.call(q, k, v)


@pytest.mark.parametrize(
    "call, reason",
    [
        (lambda q, k, v: F.scaled_dot_product_attention(q, k, v), None),
        (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, None, 0.0, False, scale=0.3), None),
        (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), None),  # heads equal
        (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, None, 0.0, True), "is_causal=True"),
        (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.1), "dropout_p=0.1"),
        (lambda q, k, v: F.scaled_dot_product_attention(q, k[:, :1], v[:, :1], enable_gqa=True), "one head count"),
    ],
)
def test_sdpa_spellings_and_what_stays(call, reason, caplog):
    """Positional and keyword arguments are read alike; a softmax scale given is kept (0.3, not
    1/sqrt(64): the result must match SDPA with that scale); what the kernel cannot take stays,
    with its reason logged. Cross-attention (8 queries, 24 keys), batch 2."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 8, 64), torch.randn(2, 2, 24, 64), torch.randn(2, 2, 24, 64)
    with caplog.at_level(logging.INFO, logger="fp8_compile"):
        graph = traced_after_passes(SelfAttention(call), {"q": q, "k": k, "v": v}, config=FP8_ATTENTION)
    messages = " ".join(r.getMessage() for r in caplog.records)
    if reason is not None:
        assert count(graph, attention.fp8_attention) == 0 and reason in messages
        return
    assert count(graph, attention.fp8_attention) == 1 and count(graph, F.scaled_dot_product_attention) == 0
    with torch.no_grad():
        error = rel_error(graph.gm(q, k, v)[0], call(q, k, v))
    assert error < 0.12, error


def test_a_graph_without_sdpa_says_so(caplog):
    """Attention through another backend (here: a matmul softmax) is not SDPA: nothing is
    converted, and the log says the option found nothing, rather than nothing at all."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 8, 64), torch.randn(1, 2, 8, 64), torch.randn(1, 2, 8, 64)
    call = lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1) / 8, dim=-1) @ v  # noqa: E731
    with caplog.at_level(logging.INFO, logger="fp8_compile"):
        graph = traced_after_passes(SelfAttention(call), {"q": q, "k": k, "v": v}, config=FP8_ATTENTION)
    assert count(graph, attention.fp8_attention) == 0
    assert any("calls no scaled_dot_product_attention" in r.getMessage() for r in caplog.records)


def test_masked_attention_stays_and_the_log_says_why(caplog):
    """Qwen-Image masks its text padding; cuDNN's FP8 attention takes no mask, so those calls
    are left as they are, and the log names the reason."""
    model, inputs = build("qwen_image")
    fp8_compile.quantize_(model)
    with caplog.at_level(logging.INFO, logger="fp8_compile"):
        graph = traced_after_passes(model, inputs, config=FP8_ATTENTION)
    assert count(graph, attention.fp8_attention) == 0 and count(graph, F.scaled_dot_product_attention) == 2
    messages = [r.getMessage() for r in caplog.records]
    assert "omni_fp8: 0 of 2 attention calls in FP8" in messages
    assert sum("stays in its dtype: an attention mask" in m for m in messages) == 2


def test_compiled_flux_with_fp8_attention_stays_close(tiny_flux_fp32):
    """Compiled through Inductor (CPU) with FP8 attention: the output moves (attention really
    is quantized), and its error against the float32 model stays at that of the FP8 linears
    alone (0.049 and 0.050 measured; FLUX.1-dev on an H100: 0.0550 and 0.0551)."""
    model, inputs, original = tiny_flux_fp32
    with torch.no_grad():
        expected = first_output(original(**inputs))
        # strict: an Inductor failure would run the same numerics uncompiled, unnoticed
        linears_only = first_output(torch.compile(model, backend="omni_fp8", options={"strict": True})(**inputs))
        torch._dynamo.reset()
        options = {"fp8_attention": True, "strict": True}
        with_attention = first_output(torch.compile(model, backend="omni_fp8", options=options)(**inputs))
    assert rel_error(with_attention, linears_only) > 1e-3
    assert rel_error(with_attention, expected) < 1.3 * rel_error(linears_only, expected)


def test_fp8_attention_is_refused_with_the_weight_only_lowering():
    with pytest.raises(ValueError, match="'fp8_attention'.*'lowering'='weight_only'"):
        Fp8Config(fp8_attention=True, lowering="weight_only")
    with pytest.raises(ValueError, match="'fp8_attention' must be True or False"):
        Fp8Config(fp8_attention="yes")


def test_gpus_without_fp8_attention_are_refused_naming_the_option(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40S")
    with pytest.raises(RuntimeError, match="'fp8_attention' needs compute capability 9.0.*L40S is 8.9"):
        attention.prepare_device(torch.device("cuda", 0))


@pytest.mark.parametrize("device, hip", [(torch.device("mps"), None), (torch.device("cuda", 0), "6.2")])
def test_devices_other_than_nvidia_and_the_cpu_are_refused_naming_the_option(device, hip, monkeypatch):
    monkeypatch.setattr(torch.version, "hip", hip)
    with pytest.raises(RuntimeError, match="'fp8_attention' runs on NVIDIA GPUs .* and the CPU, not on"):
        attention.prepare_device(device)


def test_a_missing_cudnn_frontend_is_named_with_the_install_command(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setitem(sys.modules, "cudnn", None)  # makes `import cudnn` fail
    attention._cudnn.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"'fp8_attention' needs cuDNN's Python frontend: pip install"):
            attention.prepare_device(torch.device("cuda", 0))
    finally:
        attention._cudnn.cache_clear()



def _unfused_query(parts, cos, sin):
    """FLUX's attention processor from the norms to the rotated query, as diffusers writes it."""
    x = torch.cat([F.rms_norm(t, (t.shape[-1],), w, 1e-6) for t, w in parts], dim=1)
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos[None, :, None] + rotated.float() * sin[None, :, None]).to(x.dtype)


def _rotary_tables(tokens, head_dim, seed=0):
    torch.manual_seed(seed)
    angles = torch.rand(tokens, head_dim // 2) * 6
    return (t.repeat_interleave(2, dim=-1) for t in (angles.cos(), angles.sin()))


def test_fused_norm_rotary_quantization_is_the_unfused_ops_then_the_bound_scale():
    """rms_norm_rotary_fp8 (the CPU reference the GPU kernel is tested against) is the model's own
    ops, text and image tokens with their own norm weights, cast with the scale from the bound
    sqrt(D) max|w| (|cos| + |sin|); the bound holds for the values (none saturates)."""
    torch.manual_seed(0)
    text, image = torch.randn(1, 16, 4, 64).bfloat16(), torch.randn(1, 48, 4, 64).bfloat16()
    w_text, w_image = (1 + torch.rand(64)).bfloat16(), (0.5 * torch.rand(64)).bfloat16()
    cos, sin = _rotary_tables(64, 64)
    q8, scale = attention.rms_norm_rotary_fp8(text, image, w_text, w_image, 1e-6, 1e-6, cos, sin, 2.0)
    y = _unfused_query([(text, w_text), (image, w_image)], cos, sin)
    bound = 8 * max(w_text.float().abs().max(), w_image.float().abs().max()) * 2.0
    assert scale.dtype == torch.float32 and scale.item() == pytest.approx(bound.item() / 448, rel=1e-6)
    assert y.abs().max() <= bound
    torch.testing.assert_close(q8.float(), ops.quantize_activation_static(y, scale).float(), rtol=0, atol=0)
    # the tables' bound reduced in the graph (a tensor, as under regional compile)
    q8_tensor_bound, _ = attention.rms_norm_rotary_fp8(text, image, w_text, w_image, 1e-6, 1e-6, cos, sin, torch.tensor(2.0))
    assert torch.equal(q8_tensor_bound.float(), q8.float())
    # or as partial maxima, whose rows' maxima add up to the bound (the GPU's rotary_table_maxima)
    partials = torch.tensor([[0.25, 1.0, 0.5], [1.0, 0.75, 0.0]])
    q8_partials, _ = attention.rms_norm_rotary_fp8(text, image, w_text, w_image, 1e-6, 1e-6, cos, sin, partials)
    assert torch.equal(q8_partials.float(), q8.float())


def test_rotary_table_maxima_are_the_tables_amaxes():
    cos, sin = _rotary_tables(64, 64)
    maxima = attention.rotary_table_maxima(cos[None, :, None] * 0.5, -sin[None, :, None])
    assert torch.equal(maxima.amax(-1), torch.stack([cos.abs().max() * 0.5, sin.abs().max()]))


@pytest.mark.parametrize("name, fused, calls", [("flux", 8, 4), ("flux2_klein", 6, 3), ("wan", 0, 4), ("glm_image", 0, 2)])
def test_queries_and_keys_of_the_models_are_fused_where_they_match(name, fused, calls, caplog):
    """FLUX.1 and FLUX.2 (torch.nn.RMSNorm, diffusers' real rotary tables; double blocks with
    text and image norms concatenated) get every query and key from the fused op; Wan (its own
    rotary form) and GLM-Image (in place) keep Inductor's kernels. The graph's output moves by
    no more than rounding between the two (the bound is summed in another order: a scale one
    float32 ulp apart flips rare values by one e4m3 step)."""
    model, inputs = build(name)
    fp8_compile.quantize_(model)
    with caplog.at_level(logging.INFO, logger="fp8_compile"):
        graph = traced_after_passes(model, inputs, config=FP8_ATTENTION)
    message = f"{fused} of {2 * calls} FP8 attention queries and keys normalized, rotated and cast in one kernel"
    assert any(message in r.getMessage() for r in caplog.records)
    assert count(graph, attention.rms_norm_rotary_fp8) == fused
    unfused = traced_after_passes(model, inputs, config=FP8_ATTENTION, passes=UNFUSED_PASSES)
    with torch.no_grad():
        out, reference = first_output(graph.gm(*graph.example_inputs)), first_output(unfused.gm(*unfused.example_inputs))
    assert rel_error(out, reference) < 2e-3


def _rotated(x, order="odd_first", odd=torch.neg, exchanged=False):
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    if exchanged:
        x_real, x_imag = x_imag, x_real
    odd = odd(x_imag)
    return torch.stack([odd, x_real] if order == "odd_first" else [x_real, odd], dim=-1).flatten(3)


class FluxLikeAttention(torch.nn.Module):
    """FLUX's attention processor from the projections on ([B, S, H, D] text and image parts, each
    with its own RMSNorm, then one rotary embedding), and look-alikes of it (``variant``)."""

    def __init__(self, variant="flux", head_dim=64, eps=1e-6, text_weights=True):
        super().__init__()
        self.variant = variant
        affine = (text_weights, True, text_weights, True)
        self.norms = torch.nn.ModuleList(torch.nn.RMSNorm(head_dim, eps=eps, elementwise_affine=a) for a in affine)
        for norm in self.norms:
            if norm.weight is not None:
                torch.nn.init.uniform_(norm.weight, 0.5, 1.5)

    def operand(self, text, image, text_norm, image_norm, cos, sin):
        variant = self.variant
        if variant == "norm_over_all_heads":  # one RMSNorm over [H, D]: another bound, another kernel
            x = torch.cat([F.rms_norm(t, t.shape[2:]) for t in (text, image)], dim=1)
        else:
            x = torch.cat([text_norm(text), image_norm(image)], dim=2 if variant == "cat_heads" else 1)
        rotated = {
            "pairs_swapped": lambda: _rotated(x, order="even_first"),
            "sign_flipped": lambda: _rotated(x, odd=lambda t: t),
            "odd_flipped": lambda: _rotated(x, odd=lambda t: t.flip(-1)),
            "other_tensor": lambda: _rotated(x.flip(1)),
            "halves_exchanged": lambda: _rotated(x, exchanged=True),
        }.get(variant, lambda: _rotated(x))()
        if variant == "tables_per_head":  # [1, S, H, D]: the kernel reads one table row per token
            scales = torch.linspace(0.5, 1.0, x.shape[2])[None, None, :, None]
            cos, sin = cos * scales, sin * scales
        return (x.float() * cos + rotated.float() * sin).to(x.dtype)

    def forward(self, text_q, image_q, text_k, image_k, value, cos, sin):
        q = self.operand(text_q, image_q, self.norms[0], self.norms[1], cos, sin)
        k = self.operand(text_k, image_k, self.norms[2], self.norms[3], cos, sin)
        out = F.scaled_dot_product_attention(*(t.permute(0, 2, 1, 3) for t in (q, k, value)))
        return out.permute(0, 2, 1, 3)


@pytest.mark.parametrize(
    "variant, fused",
    [
        ("flux", 2),
        ("pairs_swapped", 0),
        ("sign_flipped", 0),
        ("odd_flipped", 0),
        ("other_tensor", 0),
        ("halves_exchanged", 0),
        ("cat_heads", 0),
        ("norm_over_all_heads", 0),
        ("tables_per_head", 0),
    ],
)
def test_only_the_flux_form_is_fused(variant, fused):
    """The fused kernel computes FLUX's form and nothing else, so each look-alike (channel pairs
    the other way round, the other sign, another op than the negation, a rotation of another tensor, of x with
    each pair's halves exchanged, parts joined along the heads, one norm over all heads, tables that differ per head) must keep
    the graph's own ops: fused, any of them would give
    other numbers. Checked by the output against the graph without the pass (rounding apart)."""
    torch.manual_seed(0)
    heads, head_dim, text, image = 8, 64, 16, 240
    # tables a little larger than 1 (no cos/sin identity assumed): bounds come from their amax
    cos, sin = (1.2 * t[None, :, None] for t in _rotary_tables(text + image, head_dim))
    if variant == "cat_heads":
        cos, sin = cos[:, :image], sin[:, :image]
        text = image
    inputs = {
        "text_q": torch.randn(1, text, heads, head_dim), "image_q": torch.randn(1, image, heads, head_dim),
        "text_k": torch.randn(1, text, heads, head_dim), "image_k": torch.randn(1, image, heads, head_dim),
        "value": torch.randn(1, cos.shape[1], 2 * heads if variant == "cat_heads" else heads, head_dim),
        "cos": cos, "sin": sin,
    }  # fmt: skip
    model = FluxLikeAttention(variant, head_dim)
    graph = traced_after_passes(model, inputs, FP8_ATTENTION)
    assert count(graph, attention.rms_norm_rotary_fp8) == fused
    assert count(graph, attention.fp8_attention) == 1
    # the tables, inputs here as in a block compiled alone, are reduced once for the query and the key
    assert count(graph, attention.rotary_table_maxima) == min(fused, 1)
    unfused = traced_after_passes(model, inputs, FP8_ATTENTION, passes=UNFUSED_PASSES)
    with torch.no_grad():
        out, reference = graph.gm(*graph.example_inputs)[0], unfused.gm(*unfused.example_inputs)[0]
    assert rel_error(out, reference) < 1e-3


def _flux_like_inputs(heads=8, head_dim=64, text=16, image=240, scale=1.0, dtype=torch.float32):
    torch.manual_seed(0)
    cos, sin = (t[None, :, None].to(dtype) for t in _rotary_tables(text + image, head_dim))
    operands = {
        name: scale * torch.randn(1, tokens, heads, head_dim, dtype=dtype)
        for name, tokens in (("text_q", text), ("image_q", image), ("text_k", text), ("image_k", image))
    }
    return {**operands, "value": torch.randn(1, text + image, heads, head_dim, dtype=dtype), "cos": cos, "sin": sin}


def test_a_norm_with_torchs_default_eps_keeps_it():
    """torch.nn.RMSNorm(eps=None) on bf16 uses float32's eps (1.2e-7), not bf16's (0.0078): with
    the wrong one, rows of small values (an RMS of 0.05 here) come out 2x too small."""
    model = FluxLikeAttention(eps=None).bfloat16()
    inputs = _flux_like_inputs(scale=0.05, dtype=torch.bfloat16)
    graph = traced_after_passes(model, inputs, FP8_ATTENTION)
    assert count(graph, attention.rms_norm_rotary_fp8) == 2
    unfused = traced_after_passes(model, inputs, FP8_ATTENTION, passes=UNFUSED_PASSES)
    with torch.no_grad():
        out, reference = graph.gm(*graph.example_inputs)[0], unfused.gm(*unfused.example_inputs)[0]
    assert rel_error(out, reference) < 1e-2


def test_parts_with_and_without_a_norm_weight_are_not_fused():
    """The GPU kernel takes a norm weight for both parts or for neither: text normalized without
    a weight next to image with one stays in the graph's ops, and the op refuses the mix."""
    model = FluxLikeAttention(text_weights=False)
    graph = traced_after_passes(model, _flux_like_inputs(), FP8_ATTENTION)
    assert count(graph, attention.rms_norm_rotary_fp8) == 0 and count(graph, attention.fp8_attention) == 1
    text, image = torch.randn(1, 4, 2, 64), torch.randn(1, 6, 2, 64)
    cos, sin = _rotary_tables(10, 64)
    with pytest.raises(ValueError, match="both parts a norm weight or neither"):
        attention.rms_norm_rotary_fp8(text, image, None, torch.ones(64), 1e-6, 1e-6, cos, sin, 2.0)


def test_a_rotary_bound_of_more_than_two_rows_of_partial_maxima_is_refused():
    """The fused kernel sums at most two rows of partial maxima (|cos| and |sin|)."""
    text, image = torch.randn(1, 4, 2, 64), torch.randn(1, 6, 2, 64)
    cos, sin = _rotary_tables(10, 64)
    with pytest.raises(ValueError, match=r"rotary_bound of shape \[3, 4\]"):
        attention.rms_norm_rotary_fp8(text, image, None, None, 1e-6, 1e-6, cos, sin, torch.ones(3, 4))


WITHOUT_FEED = PassManager([p for p in FP8_PASSES.passes if not isinstance(p, FeedFp8AttentionOutput)])


@pytest.mark.parametrize(
    "name, granularity, fed_calls, fed_layers, fed_prefixes",
    [("flux", "per_row", 4, 4, 2), ("wan", "per_row", 4, 4, 0), ("flux", "per_tensor", 2, 4, 0)],
)
def test_the_layer_after_fp8_attention_reads_its_fp8_output(name, granularity, fed_calls, fed_layers, fed_prefixes, caplog):
    """FLUX's to_out / to_add_out and Wan's to_out take the attention's FP8 output with V's scale
    (through FLUX's split into text and image, Wan's type_as; per tensor, V's scale as it is),
    FLUX's single blocks quantize it as an FP8 prefix of [attention, MLP] (per row only: per
    tensor, their concatenation is quantized by Inductor). No dequantize and requantize. The
    output really changes, and stays as close to the float32 model as with the requantization
    (one rounding fewer; the two differ by ~1% of the error, measured 0.0506 / 0.0501 FLUX,
    0.0357 / 0.0355 Wan, 0.0521 / 0.0521 FLUX per tensor)."""
    model, inputs = build(name, dtype=torch.float32)
    original = copy.deepcopy(model)
    fp8_compile.quantize_(model, {"granularity": granularity})
    with caplog.at_level(logging.INFO, logger="fp8_compile"):
        fed = traced_after_passes(model, inputs, FP8_ATTENTION)
    assert any(f"{fed_calls} of 4 FP8 attention outputs read in FP8" in r.getMessage() for r in caplog.records)
    assert [n.args[2] for n in fed.gm.graph.nodes if n.target is attention.output_as_activation] == [granularity] * fed_layers
    prefixed = [n for n in fed.gm.graph.nodes if n.target is ops.quantize_rows and "prefix_scale" in n.kwargs]
    assert len(prefixed) == fed_prefixes
    requantized = traced_after_passes(model, inputs, FP8_ATTENTION, passes=WITHOUT_FEED)
    with torch.no_grad():
        expected = first_output(original(**inputs))
        out_fed = fed.gm(*fed.example_inputs)[0]
        out_requantized = requantized.gm(*requantized.example_inputs)[0]
    assert rel_error(out_fed, out_requantized) > 1e-3
    assert rel_error(out_fed, expected) < 1.03 * rel_error(out_requantized, expected)


class AttentionThenLayers(torch.nn.Module):
    """Attention whose output reaches a linear layer in the ways given, and a residual."""

    def __init__(self, reader, dim=64):
        super().__init__()
        self.reader = reader
        self.out = torch.nn.Linear(dim, dim)
        self.gate = torch.nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, q, k, v):
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        if self.reader == "gated":  # an element-wise op before the layer: not a regrouping
            return self.out(out * self.gate)
        if self.reader == "reinterpreted":  # bits viewed as another dtype: not the same values in FP8
            return self.out(out.view(torch.int32).view(out.dtype))
        if self.reader == "gathered":  # a gather by an index tensor
            return self.out(out[:, torch.arange(out.shape[1] - 1, -1, -1)])
        if self.reader == "cast":  # x.float(): a cast, regrouping nothing
            return self.out(out.float().to(out.dtype))
        return self.out(out) + out  # "residual": the layer reads FP8, the residual BF16


@pytest.mark.parametrize("reader, fed", [("residual", 1), ("cast", 1), ("gated", 0), ("reinterpreted", 0), ("gathered", 0)])
def test_only_regroupings_of_the_attention_output_are_read_in_fp8(reader, fed):
    """What is not a plain regrouping of the attention output keeps its requantization; a
    residual next to the fed layer reads the output dequantized. Either way the numbers are the
    graph's without the pass, up to the requantization's rounding."""
    torch.manual_seed(0)
    model = AttentionThenLayers(reader)
    fp8_compile.quantize_(model)
    q, k, v = (torch.randn(1, 2, 48, 32) for _ in range(3))
    inputs = {"q": q, "k": k, "v": v}
    graph = traced_after_passes(model, inputs, FP8_ATTENTION)
    assert count(graph, attention.output_as_activation) == fed
    requantized = traced_after_passes(model, inputs, FP8_ATTENTION, passes=WITHOUT_FEED)
    with torch.no_grad():
        out, expected = (g.gm(*g.example_inputs)[0] for g in (graph, requantized))
    assert (rel_error(out, expected) > 0) == bool(fed) and rel_error(out, expected) < 2**-5


def test_a_flux_block_compiled_alone_reduces_its_rotary_tables_once():
    """Under regional compile FLUX's blocks take the rotary tables as inputs (viewed as [1, S, 1, D]
    inside): one rotary_table_maxima for the query and the key of each block, and no other
    reduction of the tables. (Blocks of 8 heads: the tables must be far smaller than Q and K to
    be reduced for a bound, as FLUX.1's 24 heads make them.)"""
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    torch.manual_seed(0)
    text, image, dim = 16, 64, 128
    cos, sin = _rotary_tables(text + image, 16)
    inputs = {
        "hidden_states": torch.randn(1, image, dim), "encoder_hidden_states": torch.randn(1, text, dim),
        "temb": torch.randn(1, dim), "image_rotary_emb": (cos, sin),
    }  # fmt: skip
    for block in (FluxTransformerBlock(dim, 8, 16), FluxSingleTransformerBlock(dim, 8, 16)):
        fp8_compile.quantize_(block)
        graph = traced_after_passes(block, inputs, FP8_ATTENTION)
        name = type(block).__name__
        assert count(graph, attention.rms_norm_rotary_fp8) == 2, name
        assert count(graph, attention.rotary_table_maxima) == 1 and count(graph, ops.abs_max) == 0, name
        torch._dynamo.reset()
