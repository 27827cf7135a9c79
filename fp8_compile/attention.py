"""FP8 attention (option ``fp8_attention``): Q, K and V scaled per tensor into e4m3 and
multiplied on cuDNN's FP8 flash-attention kernel (NVIDIA's ``nvidia-cudnn-frontend`` package).

One scale per tensor, because that is what cuDNN's FP8 attention takes. The output needs no
amax of its own: each output row is a convex combination of V's rows (softmax weights are
non-negative and sum to 1), so |O| <= max|V| and V's scale fits O too. The probabilities are
quantized before they multiply V, as exp(S - rowmax) <= 1 times 448, and divided by their row
sum afterwards, as a flash-attention kernel does.

:func:`fp8_attention` is a plain function the ``QuantizeAttention`` pass puts in place of
``scaled_dot_product_attention``: Inductor fuses its quantizations into the kernels that make Q,
K and V (the norm and rotary embedding) and its dequantization into the kernel that reads the
output; ``fp8_compile::fp8_sdpa`` is the opaque op between them. On the CPU that op is a
reference written in torch that rounds where cuDNN rounds, for tests and development.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from fp8_compile import ops

# exp(S - rowmax) <= 1 is scaled to e4m3's largest value before it is cast
PROBABILITY_SCALE = ops.FP8_MAX
# the shapes cuDNN's FP8 attention supports (head dims up to 128, multiples of 16)
MAX_HEAD_DIM = 128
HEAD_DIM_MULTIPLE = 16
MIN_CAPABILITY = (9, 0)  # cuDNN runs FP8 attention on Hopper and newer
INSTALL_HINT = "pip install 'fp8-compile[fp8-attention]' (NVIDIA's nvidia-cudnn-frontend)"


def fp8_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``scaled_dot_product_attention(query, key, value, scale=scale)`` with FP8 operands: the
    output of :func:`fp8_attention_quantized` (same arguments) dequantized to V's dtype."""
    out8, out_scale = fp8_attention_quantized(query, key, value, *args, **kwargs)
    return ops.dequantize(out8, out_scale, value.dtype)


def fp8_attention_quantized(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float | None = None,
    query_bound: torch.Tensor | float | None = None,
    key_bound: torch.Tensor | float | None = None,
    query_scale: torch.Tensor | None = None,
    key_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with FP8 operands: its FP8 output [B, H, S, D] and the output's float32
    per-tensor scale (V's), which a layer that reads FP8 takes as it is (``FeedFp8AttentionOutput``).

    ``query_bound`` / ``key_bound``: a number no element's magnitude exceeds (from the graph, see
    ``passes/magnitude_bound.py``), which scales the operand without measuring its amax.
    ``query_scale`` / ``key_scale``: the per-tensor scale of a query / key given already in FP8
    (by :func:`rms_norm_rotary_fp8`)."""
    if scale is None:  # SDPA's default
        scale = 1.0 / math.sqrt(query.shape[-1])
    q8, q_scale = _quantize(query, query_bound, query_scale)
    k8, k_scale = _quantize(key, key_bound, key_scale)
    v8, v_scale = _quantize(value, None, None)
    # the output's scale is V's (see above); its reciprocal fuses into V's quantization kernel
    return fp8_sdpa(q8, k8, v8, q_scale, k_scale, v_scale, v_scale.reciprocal(), scale), v_scale


def output_as_activation(out8_2d: torch.Tensor, out_scale: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP8 attention output seen as a linear layer's [M, K] input, as ``quantize_activation``
    would return it: (FP8 rows in row-major order, its scale: V's, repeated per row next to
    per-row weight scales)."""
    rows = out8_2d.contiguous()
    return rows, out_scale if granularity == "per_tensor" else ops.repeat_per_row(out_scale, rows)


def _quantize(
    t: torch.Tensor, bound: torch.Tensor | float | None, scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor FP8 and its scale: ``t`` itself when it is FP8 already (its ``scale`` given);
    from ``bound`` when given (a pointwise cast that fuses into the kernel making ``t``); else
    from the measured amax (a reduction over ``t`` first)."""
    if t.dtype == ops.FP8_DTYPE:
        if scale is None:
            raise ValueError("fp8_attention: an operand given in FP8 needs its scale (query_scale / key_scale)")
        return t, scale
    if bound is None:
        return ops.quantize_activation(t, "per_tensor")
    scale = bound_scale(torch.as_tensor(bound, dtype=torch.float32, device=t.device))
    return ops.quantize_activation_static(t, scale), scale


def bound_scale(bound: torch.Tensor) -> torch.Tensor:
    """The per-tensor scale that maps a bound on |x| to e4m3's largest value."""
    return bound.clamp_min(ops.AMAX_FLOOR) / ops.FP8_MAX


def rms_norm_rotary_fp8(
    first: torch.Tensor,
    second: torch.Tensor | None,
    weight_first: torch.Tensor | None,
    weight_second: torch.Tensor | None,
    eps_first: float,
    eps_second: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rotary_bound: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A query or key as FP8 attention takes it, made in one pass: the RMSNorm over the head dim
    of ``first`` [B, S1, H, D] (and of ``second`` [B, S2, H, D], the tokens after it, with their own
    weight and eps), diffusers' rotary embedding (``apply_rotary_emb`` with real [S, D] tables,
    channel pairs rotated), and per-tensor FP8 scaled from the bound sqrt(D) max|w| x
    ``rotary_bound`` (a bound on |cos| + |sin|: a number, or a float32 tensor of partial maxima
    whose rows' maxima add up to it, as :func:`rotary_table_maxima` gives; a scalar tensor is
    one such row). Returns (FP8 [B, S, H, D], float32 scale).

    The numbers are those of the unfused ops followed by :func:`_quantize` with that bound (one
    Triton kernel on NVIDIA GPUs, which keeps float32 where the model rounds to its dtype between
    steps; those ops elsewhere)."""
    if second is not None and (weight_first is None) != (weight_second is None):
        raise ValueError("rms_norm_rotary_fp8: give both parts a norm weight or neither (the GPU kernel takes one for each or none)")
    head_dim = first.shape[-1]
    tables = _table_rows(cos, sin, head_dim)
    if isinstance(rotary_bound, torch.Tensor):
        rotary_bound = torch.atleast_2d(rotary_bound.float()).contiguous()
        if rotary_bound.dim() != 2 or rotary_bound.shape[0] > 2:
            raise ValueError(f"rms_norm_rotary_fp8: rotary_bound of shape {list(rotary_bound.shape)} (a number, or [R <= 2, P] partial maxima)")
    if first.is_cuda:
        from fp8_compile.triton_kernels import rms_norm_rotary_fp8 as kernel

        bound_tensor, factor = (rotary_bound, 1.0) if isinstance(rotary_bound, torch.Tensor) else (None, float(rotary_bound))
        operands = [t if t is None or t.stride(-1) == 1 else t.contiguous() for t in (first, second)]
        return kernel(*operands, weight_first, weight_second, eps_first, eps_second, *tables, bound_tensor, factor)
    if isinstance(rotary_bound, torch.Tensor):
        rotary_bound = rotary_bound.amax(dim=-1).sum()
    parts = [(first, weight_first, eps_first)] + ([(second, weight_second, eps_second)] if second is not None else [])
    x = torch.cat([F.rms_norm(part, (head_dim,), weight, eps) for part, weight, eps in parts], dim=1)
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    cos, sin = (t.reshape(1, -1, 1, head_dim) for t in tables)
    y = (x.float() * cos + rotated.float() * sin).to(x.dtype)
    weight_bounds = [ops.abs_max(w) if w is not None else torch.ones((), device=x.device) for _, w, _ in parts]
    scale = bound_scale(functools.reduce(torch.maximum, weight_bounds) * math.sqrt(head_dim) * rotary_bound)
    return ops.quantize_activation_static(y, scale), scale


def rotary_table_maxima(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """max |cos| and max |sin| of rotary tables ([1, S, 1, D] or [S, D]) as partial maxima, a
    float32 [2, P] tensor whose rows' maxima are the two (P = 1 on the CPU): the bound on
    |cos| + |sin| that :func:`rms_norm_rotary_fp8` takes, made by one small kernel on NVIDIA GPUs
    (Inductor reduced each table in two, and added them in a third) and finished inside the
    fused kernel."""
    tables = _table_rows(cos, sin, cos.shape[-1])
    if cos.is_cuda:
        from fp8_compile.triton_kernels import rotary_table_maxima as kernel

        return kernel(*tables)
    return torch.stack([ops.abs_max(t) for t in tables]).reshape(2, 1)


def _table_rows(cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> list[torch.Tensor]:
    """The tables as [S, D] rows with a unit last stride, as the kernels read them."""
    tables = [t.reshape(-1, head_dim) for t in (cos, sin)]
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tables]


@torch.library.custom_op("fp8_compile::fp8_sdpa", mutates_args=())
def fp8_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_scale: torch.Tensor,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    out_inverse_scale: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of FP8 [batch, heads, tokens, head_dim] operands with float32 per-tensor scales;
    the output is FP8, multiplied by ``out_inverse_scale`` (1 / V's scale)."""
    if q.is_cuda:
        return _cudnn_sdpa(q, k, v, q_scale, k_scale, v_scale, out_inverse_scale, scale)
    return _reference_sdpa(q, k, v, q_scale, k_scale, v_scale, out_inverse_scale, scale)


@fp8_sdpa.register_fake
def _(q, k, v, q_scale, k_scale, v_scale, out_inverse_scale, scale):
    return _output_for(q, v)


def _output_for(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The op's FP8 output, [batch, heads, tokens, head_dim] stored token-major (as the output
    projection reads it), whatever the operands' layout: the real implementations must return
    exactly the strides the fake one promises Inductor."""
    batch, heads, tokens, head_dim = q.shape[0], q.shape[1], q.shape[2], v.shape[-1]
    size, stride = (batch, heads, tokens, head_dim), (tokens * heads * head_dim, head_dim, heads * head_dim, 1)
    return torch.empty_strided(size, stride, dtype=ops.FP8_DTYPE, device=q.device)


def unsupported_reason(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> str | None:
    """Why these operands cannot take the FP8 kernel, or None when they can."""
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return f"operands of {query.dim()} dimensions (4 needed: batch, heads, tokens, head_dim)"
    if key.shape != value.shape or query.shape[:2] != key.shape[:2] or query.shape[-1] != key.shape[-1]:
        return (
            f"shapes q {list(query.shape)}, k {list(key.shape)}, v {list(value.shape)} (the FP8 kernel needs "
            "one batch, one head count and one head dim for all three)"
        )
    head_dim = query.shape[-1]
    if head_dim > MAX_HEAD_DIM or head_dim % HEAD_DIM_MULTIPLE:
        return f"head dim {head_dim} (cuDNN's FP8 attention takes multiples of {HEAD_DIM_MULTIPLE} to {MAX_HEAD_DIM})"
    if not query.dtype.is_floating_point or query.dtype.itemsize == 1:
        return f"dtype {query.dtype}"
    return None


def prepare_device(device: torch.device) -> None:
    """Raise, naming the option, where FP8 attention cannot run (the CPU runs the reference);
    on a GPU, create cuDNN's handle and the op's constant tensors now, at compile time: made
    during the first call, they would live in the private memory pool of a CUDA-graph
    recording, which refuses allocations that outlive it."""
    if device.type == "cpu":
        return
    if device.type != "cuda" or torch.version.hip is not None:
        raise RuntimeError(f"omni_fp8 option 'fp8_attention' runs on NVIDIA GPUs (cuDNN) and the CPU, not on {device}")
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise RuntimeError(
            f"omni_fp8 option 'fp8_attention' needs compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+ "
            f"(cuDNN's FP8 attention); {torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}. "
            "Leave 'fp8_attention' off: the linear layers still run in FP8"
        )
    _cudnn()
    index = device.index if device.index is not None else torch.cuda.current_device()
    _handle(index)
    _constants(index)


@functools.cache
def _cudnn():
    try:
        import cudnn
    except ImportError as error:
        raise RuntimeError(f"omni_fp8 option 'fp8_attention' needs cuDNN's Python frontend: {INSTALL_HINT}") from error
    return cudnn


def _reference_sdpa(q, k, v, q_scale, k_scale, v_scale, out_inverse_scale, scale):
    """What the cuDNN kernel computes, in float32 torch: FP8 probabilities, FP8 output. It holds
    every [query, key] logit at once, so on the CPU it is for small shapes (tests, development)."""
    logits = (q.float() * q_scale) @ (k.float() * k_scale).transpose(-2, -1) * scale
    probabilities = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
    quantized = (probabilities * PROBABILITY_SCALE).to(ops.FP8_DTYPE).float() / PROBABILITY_SCALE
    out = quantized @ (v.float() * v_scale) / probabilities.sum(dim=-1, keepdim=True)
    return _output_for(q, v).copy_((out * out_inverse_scale).clamp(-ops.FP8_MAX, ops.FP8_MAX))


class _Plan(NamedTuple):
    graph: Any
    uids: dict[str, int]  # the graph's tensors by name: the keys of the pointers ``execute`` takes
    workspace_bytes: int


@functools.cache
def _handle(device_index: int):
    with torch.cuda.device(device_index):
        return _cudnn().create_handle()


@functools.cache
def _constants(device_index: int) -> dict[str, torch.Tensor]:
    """The probability scales."""

    def scalar(value: float) -> torch.Tensor:
        return torch.full((1, 1, 1, 1), value, dtype=torch.float32, device=f"cuda:{device_index}")

    return {"scale_s": scalar(PROBABILITY_SCALE), "descale_s": scalar(1.0 / PROBABILITY_SCALE)}


@functools.lru_cache(maxsize=256)
def _plan(
    device_index: int, q_layout: tuple, k_layout: tuple, v_layout: tuple, out_layout: tuple, scale: float
) -> _Plan:
    """cuDNN's FP8 attention graph for these (shape, strides) layouts, built once."""
    cudnn = _cudnn()
    e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    graph = cudnn.pygraph(
        io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32, handle=_handle(device_index)
    )
    tensors = {
        name: graph.tensor(name=name, dim=list(shape), stride=list(stride), data_type=e4m3)
        for name, (shape, stride) in zip("qkv", (q_layout, k_layout, v_layout))
    }
    for name in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"):
        tensors[name] = graph.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=fp32)
    out, _, amax_s, amax_o = graph.sdpa_fp8(
        q=tensors["q"], k=tensors["k"], v=tensors["v"],
        descale_q=tensors["descale_q"], descale_k=tensors["descale_k"], descale_v=tensors["descale_v"],
        descale_s=tensors["descale_s"], scale_s=tensors["scale_s"], scale_o=tensors["scale_o"],
        is_inference=True, attn_scale=scale, use_causal_mask=False, name="fp8_sdpa",
    )  # fmt: skip
    out.set_output(True).set_dim(list(out_layout[0])).set_stride(list(out_layout[1])).set_data_type(e4m3)
    # the amax of the probabilities and of the output, unused here, stay inside the graph: as
    # outputs cuDNN zeroed them before each call, two memsets (GPU nodes) per attention layer
    for amax in (amax_s, amax_o):
        amax.set_output(False).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(fp32)
    tensors["out"] = out
    try:
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
    except Exception as error:
        raise RuntimeError(
            f"omni_fp8 option 'fp8_attention': cuDNN {cudnn.backend_version()} has no FP8 attention kernel for "
            f"q {list(q_layout[0])}, k {list(k_layout[0])} (strides: q {list(q_layout[1])}, out "
            f"{list(out_layout[1])}): {error}. "
            "Leave 'fp8_attention' off for this model"
        ) from error
    return _Plan(graph, {name: t.get_uid() for name, t in tensors.items()}, graph.get_workspace_size())


def _cudnn_sdpa(q, k, v, q_scale, k_scale, v_scale, out_inverse_scale, scale):
    cudnn = _cudnn()
    device_index = q.device.index
    out = _output_for(q, v)
    # cuDNN takes any strides but a unit stride along the head dim
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    layouts = [(tuple(t.shape), tuple(t.stride())) for t in (q, k, v, out)]
    plan = _plan(device_index, *layouts, float(scale))
    scales = {"q_scale": q_scale, "k_scale": k_scale, "v_scale": v_scale, "out_inverse_scale": out_inverse_scale}
    for name, t in scales.items():  # cuDNN reads one float32 at each pointer, unchecked
        if t.dtype != torch.float32 or t.device != q.device or t.numel() != 1:
            got = f"{t.dtype} {list(t.shape)} on {t.device}"
            raise ValueError(f"fp8_sdpa: {name} must be one float32 on {q.device}, got {got}")
    # raw device pointers, the cheapest thing execute() takes (this op runs once per attention
    # layer per step, and its host time adds up)
    operands = {
        "q": q, "k": k, "v": v, "out": out, "descale_q": q_scale, "descale_k": k_scale, "descale_v": v_scale,
        "scale_o": out_inverse_scale, **_constants(device_index),
    }  # fmt: skip
    pointers = {plan.uids[name]: t.data_ptr() for name, t in operands.items()}
    workspace = torch.empty(plan.workspace_bytes, dtype=torch.uint8, device=q.device) if plan.workspace_bytes else None
    handle = _handle(device_index)
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(q.device).cuda_stream)
    plan.graph.execute(pointers, 0 if workspace is None else workspace.data_ptr(), handle=handle)
    return out
