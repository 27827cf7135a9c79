"""FP8 experts of mixture-of-experts blocks: matmuls against 3-D expert weights, not nn.Linear.

transformers keeps the experts of a MoE block (Qwen3-Omni's thinker, Qwen3-MoE, ...) as one
module with two 3-D parameters, ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I], that
its forward multiplies slice by slice (or with a grouped GEMM). Such a module is converted in
place, like a linear layer: each weight becomes an FP8 buffer of the same name and shape with a
float32 ``<name>_scale`` of one scale per expert and output channel [E, N]; the activation rows
routed to an expert are quantized per row on the fly. The product runs as one grouped FP8 GEMM
(``torch._scaled_grouped_mm``) on Hopper, and as one ``_scaled_mm`` per expert elsewhere.

Each of the two weights is decided like a linear layer named ``<module>.gate_up_proj`` /
``<module>.down_proj``: ``ignored_layers`` and the vision/audio towers keep it BF16, as do
widths that are not multiples of 16. Only the layout above (not transposed, no bias, gated)
is converted; other expert modules are left alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from fp8_compile import ops
from fp8_compile.config import DEFAULT_TOWER_LAYERS, Fp8Config
from fp8_compile.modules import moving_only
from fp8_compile.ops import CONVERTIBLE_DTYPES, GEMM_ALIGNMENT
from fp8_compile.patterns import LayerPatterns
from fp8_compile.report import Decision, LayerReport, QuantizationReport, tensor_bytes

logger = logging.getLogger("fp8_compile")

EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


def is_experts_module(module: nn.Module) -> bool:
    """A module holding [E, 2I, H] / [E, H, I] expert weights in the layout this file computes."""
    if isinstance(module, Fp8Experts):
        return False
    weights = [module._parameters.get(name) for name in EXPERT_WEIGHTS]
    return (
        all(w is not None and w.dim() == 3 for w in weights)
        and weights[0].shape[0] == weights[1].shape[0]
        and weights[0].shape[2] == weights[1].shape[1]
        and weights[0].shape[1] == 2 * weights[1].shape[2]
        and not getattr(module, "is_transposed", False)
        and not getattr(module, "has_bias", False)
        and getattr(module, "has_gate", True)
    )


@dataclass
class ExpertsPlan:
    name: str
    module: nn.Module
    decisions: dict[str, tuple[Decision, str]] = field(default_factory=dict)  # weight name -> (decision, reason)


def _decide(full_name: str, weight: torch.Tensor, ignored: LayerPatterns, towers: LayerPatterns) -> tuple[Decision, str]:
    pattern = ignored.first_match(full_name)
    if pattern is not None:
        return Decision.BF16, f"ignored by {pattern!r}"
    if towers.first_match(full_name) is not None:
        return Decision.BF16, "vision/audio tower"
    if weight.dtype not in CONVERTIBLE_DTYPES:
        return Decision.BF16, f"weight dtype {weight.dtype}"
    _, n, k = weight.shape
    for dim, size in (("K", k), ("N", n)):
        if size % GEMM_ALIGNMENT:
            return Decision.BF16, f"{dim}={size} not a multiple of {GEMM_ALIGNMENT}"
    return Decision.FP8, "expert weights, scaled per expert and channel"


def plan_experts(named_modules: Iterable[tuple[str, nn.Module]], config: Fp8Config) -> list[ExpertsPlan]:
    """Decide each expert weight among ``named_modules``; nothing is changed yet.

    Raises ValueError, naming the weight, when one to be quantized holds Inf or NaN.
    """
    ignored = LayerPatterns(config.ignored_layers)
    towers = LayerPatterns(DEFAULT_TOWER_LAYERS if config.towers == "bf16" else ())
    plans = []
    for name, module in named_modules:
        if not is_experts_module(module):
            continue
        plan = ExpertsPlan(name, module)
        for weight_name in EXPERT_WEIGHTS:
            full_name = f"{name}.{weight_name}"
            weight = getattr(module, weight_name)
            decision, reason = _decide(full_name, weight, ignored, towers)
            if decision is Decision.FP8 and not ops.all_finite(weight):
                raise ValueError(
                    f"omni_fp8: expert weight {full_name!r} has Inf or NaN, which FP8 cannot scale; "
                    f"repair the checkpoint or keep it in BF16 with ignored_layers=[{full_name!r}]"
                )
            plan.decisions[weight_name] = (decision, reason)
        plans.append(plan)
    return plans


def quantize_expert_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, N, K] -> (FP8 [E, N, K], float32 [E, N]): per expert, one scale per output channel.

    Expert by expert, so the float32 working copy is one expert's, not the whole tensor's.
    """
    quantized = torch.empty(weight.shape, dtype=ops.FP8_DTYPE, device=weight.device)
    scales = torch.empty(weight.shape[:2], dtype=torch.float32, device=weight.device)
    for e in range(weight.shape[0]):
        quantized[e], scale = ops.quantize_weight(weight[e], "per_row")
        scales[e] = scale[:, 0]
    return quantized, scales


def apply_expert_plans(plans: list[ExpertsPlan], config: Fp8Config) -> QuantizationReport:
    """Convert the planned expert weights; returns their report entries."""
    report = QuantizationReport()
    for plan in plans:
        fp8_weights = {}
        for weight_name, (decision, reason) in plan.decisions.items():
            weight = getattr(plan.module, weight_name)
            _, n, k = weight.shape
            report.layers.append(LayerReport(f"{plan.name}.{weight_name}", n, k, decision, reason))
            if decision is Decision.FP8:
                report.bytes_before += tensor_bytes(weight)
                fp8_weights[weight_name] = quantize_expert_weight(weight)
                report.bytes_after += tensor_bytes(*fp8_weights[weight_name])
        if fp8_weights:
            Fp8Experts.from_quantized(plan.module, fp8_weights, fast_accum=config.fast_accum)
    return report


_FP8_CLASSES: dict[type, type] = {}


def _fp8_class(cls: type) -> type:
    """``Fp8<cls>``: the experts class with this file's forward, made once per class."""
    if cls not in _FP8_CLASSES:
        _FP8_CLASSES[cls] = type(f"Fp8{cls.__name__}", (Fp8Experts, cls), {})
    return _FP8_CLASSES[cls]


def has_grouped_fp8_gemm(device: torch.device) -> bool:
    """``torch._scaled_grouped_mm`` runs on Hopper (SM90) only."""
    return (
        device.type == "cuda"
        and hasattr(torch, "_scaled_grouped_mm")
        and torch.cuda.get_device_capability(device)[0] == 9
    )


def grouped_fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    offsets: torch.Tensor,
    fast_accum: bool,
    grouped: bool | None = None,
) -> torch.Tensor:
    """Rows ``offsets[e-1]:offsets[e]`` of ``x`` [S, K] times expert e's FP8 weight [N, K]^T.

    ``grouped`` forces (True) or avoids (False) the grouped GEMM; by default it is used where
    the device has one.
    """
    x_fp8, x_scale = ops.quantize_activation(x, "per_row")
    if grouped if grouped is not None else has_grouped_fp8_gemm(x.device):
        return torch._scaled_grouped_mm(
            x_fp8, weight.transpose(-2, -1), x_scale.reshape(-1), weight_scale,
            offs=offsets, out_dtype=x.dtype, use_fast_accum=fast_accum,
        )
    out = x.new_empty(x.shape[0], weight.shape[1])
    start = 0
    for expert, end in enumerate(offsets.tolist()):
        if end > start:
            # cuBLASLt wants 16-byte aligned scale vectors: a slice of x_scale that starts at an
            # odd row is not (CUBLAS_STATUS_NOT_SUPPORTED on an H100), so it is copied.
            out[start:end] = ops.fp8_matmul(
                x_fp8[start:end], x_scale[start:end].clone(), weight[expert], weight_scale[expert, :, None], None, x.dtype,
                fast_accum,
            )
        start = end
    return out


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The same product with a BF16 expert weight (one kept by an ignore pattern)."""
    out = x.new_empty(x.shape[0], weight.shape[1])
    start = 0
    for expert, end in enumerate(offsets.tolist()):
        if end > start:
            out[start:end] = F.linear(x[start:end], weight[expert])
        start = end
    return out


class Fp8Experts(nn.Module):
    """Mixed into an experts class in place of its forward (see :func:`apply_expert_plans`).

    Tokens are sorted by the expert they are routed to, each weight's product runs per expert
    group, and the outputs are weighted by the router and summed back per token, as
    transformers' grouped-GEMM experts forward does.
    """

    num_experts: int
    fast_accum: bool

    @classmethod
    def from_quantized(
        cls, module: nn.Module, fp8_weights: dict[str, tuple[torch.Tensor, torch.Tensor]], *, fast_accum: bool
    ) -> nn.Module:
        """Replace ``module``'s expert parameters by the given (FP8 weight, scale) pairs, in place."""
        for weight_name, (weight, scale) in fp8_weights.items():
            delattr(module, weight_name)
            module.register_buffer(weight_name, weight)
            module.register_buffer(f"{weight_name}_scale", scale)
        module.__class__ = _fp8_class(type(module))
        module.num_experts = module.gate_up_proj.shape[0]
        module.fast_accum = fast_accum
        return module

    def expert_linear(self, weight_name: str, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        weight = getattr(self, weight_name)
        scale = getattr(self, f"{weight_name}_scale", None)
        if scale is None:
            return grouped_linear(x, weight, offsets)
        return grouped_fp8_linear(x, weight, scale, offsets, self.fast_accum)

    def gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        apply_gate: Callable[[torch.Tensor], torch.Tensor] | None = getattr(self, "_apply_gate", None)
        if apply_gate is not None:
            return apply_gate(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> Any:
        if torch.is_grad_enabled() and hidden_states.requires_grad:
            raise RuntimeError("fp8_compile experts are inference-only; run the model under torch.no_grad()")
        num_tokens, top_k = top_k_index.shape
        expert_ids = top_k_index.reshape(-1)
        order = torch.argsort(expert_ids, stable=True)
        rows = hidden_states[order // top_k]
        offsets = torch.cumsum(torch.bincount(expert_ids, minlength=self.num_experts), 0).to(torch.int32)
        hidden = self.gate(self.expert_linear("gate_up_proj", rows, offsets))
        out = self.expert_linear("down_proj", hidden, offsets)
        out = out * top_k_weights.reshape(-1)[order, None].to(out.dtype)
        unsorted = torch.empty_like(out)
        unsorted[order] = out
        return unsorted.view(num_tokens, top_k, out.shape[-1]).sum(dim=1).to(hidden_states.dtype)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        # as ScaledLinear: FP8 weights and their float32 scales follow device moves, never casts
        return super()._apply(moving_only(fn, list(self._buffers.values())), recurse)
