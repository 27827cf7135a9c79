"""Weight conversion: decide per layer, then turn BF16 linears into FP8 ``ScaledLinear`` ones.

Conversion happens once per layer. ``quantize_(model, options)`` does it explicitly at load
time; otherwise the backend does it on the first call of the first graph that uses a layer
(see ``backend.py``). Either way every layer is decided from its qualified name by the same
rules, recorded in the model's :class:`QuantizationReport`, and its BF16 weight is freed as
soon as its FP8 copy exists (layer by layer, so the peak is one layer above the BF16 model).
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils.weak import WeakIdKeyDictionary
from tqdm.auto import tqdm

from fp8_compile import ops
from fp8_compile.activation_scales import assign_static_scales
from fp8_compile.blockwise import BlockScaledLinear, describe_blocks
from fp8_compile.config import DEFAULT_TOWER_LAYERS, DTYPE_READ_LAYERS, Fp8Config
from fp8_compile.modules import ScaledLinear
from fp8_compile.ops import CONVERTIBLE_DTYPES, GEMM_ALIGNMENT, all_finite
from fp8_compile.moe import EXPERT_WEIGHTS, apply_expert_plans, is_experts_module, plan_experts
from fp8_compile.patterns import LayerPattern, LayerPatterns, closest_names
from fp8_compile.report import (
    Decision,
    LayerReport,
    QuantizationReport,
    quantization_report,
    record_report,
    tensor_bytes,
)

logger = logging.getLogger("fp8_compile")

_DTYPE_READ = LayerPatterns(DTYPE_READ_LAYERS)
_TOWERS = LayerPatterns(DEFAULT_TOWER_LAYERS)

# Weights that a conversion decided to keep in their dtype, so that a graph using them is not
# taken for one whose model still waits for conversion.
_KEPT_WEIGHTS: WeakIdKeyDictionary = WeakIdKeyDictionary()


@dataclass
class LayerPlan:
    name: str
    module: nn.Linear
    decision: Decision
    reason: str
    input_scale: float | None = None  # the static activation scale, if the config has them


def _decide(name: str, module: nn.Linear, config: Fp8Config, ignored: LayerPatterns, conditioning: LayerPatterns):
    pattern = ignored.first_match(name)
    if pattern is not None:
        return Decision.BF16, f"ignored by {pattern!r}"
    if _DTYPE_READ.first_match(name) is not None:
        return Decision.BF16, "the model reads its weight dtype"
    if "forward" in vars(module):
        # A hook set up before conversion (diffusers' context-parallel gather on proj_out, its
        # offloading or casting hooks) holds the bound nn.Linear.forward and would go on calling
        # it, on the FP8 weight, after the class swap.
        return Decision.BF16, "forward wrapped by a hook added before conversion (convert first)"
    if config.towers == "bf16" and _TOWERS.first_match(name) is not None:
        return Decision.BF16, "vision/audio tower"
    if module.weight.dtype not in CONVERTIBLE_DTYPES:
        return Decision.BF16, f"weight dtype {module.weight.dtype}"
    pattern = conditioning.first_match(name)
    if pattern is not None and config.conditioning != "fp8":
        if config.conditioning == "bf16":
            return Decision.BF16, "conditioning layer"
        return Decision.WEIGHT_ONLY, "conditioning layer"
    for dim, size in (("K", module.in_features), ("N", module.out_features)):
        if size % GEMM_ALIGNMENT:
            return Decision.BF16, f"{dim}={size} not a multiple of {GEMM_ALIGNMENT}"
    return Decision.FP8, "fp8"


def _tied_weights(modules: Iterable[nn.Module]) -> set[int]:
    """Ids of the parameters that several modules hold, as a tied lm_head and token embedding do
    (Qwen3-4B, FLUX.2-klein's text encoder). Converting the linear would keep the BF16 copy alive
    for the other module, and ``tie_weights()`` would put it back into the FP8 layer."""
    holders = Counter(id(p) for module in modules for p in module.parameters(recurse=False))
    return {key for key, count in holders.items() if count > 1}


def plan_layers(named_modules: Iterable[tuple[str, nn.Module]], config: Fp8Config) -> list[LayerPlan]:
    """Decide every ``nn.Linear`` among ``named_modules``; nothing is changed yet.

    Raises ValueError, naming the layer, when a weight to be quantized holds Inf or NaN.
    """
    ignored = LayerPatterns(config.ignored_layers)
    conditioning = LayerPatterns(config.conditioning_layers)
    named_modules = list(named_modules)
    tied = _tied_weights(module for _, module in named_modules)
    plans = []
    for name, module in named_modules:
        # ScaledLinear layers were converted already; other Linear subclasses (LoRA wrappers,
        # quantized layers of other libraries) have forward code that a swap would bypass.
        if type(module) is not nn.Linear:
            continue
        decision, reason = _decide(name, module, config, ignored, conditioning)
        if decision is not Decision.BF16 and id(module.weight) in tied:
            decision, reason = Decision.BF16, "weight tied to another module"
        if decision is not Decision.BF16 and not all_finite(module.weight):
            raise ValueError(
                f"omni_fp8: layer {name!r} has Inf or NaN in its weight, which FP8 cannot scale; "
                f"repair the checkpoint or keep the layer in BF16 with ignored_layers=[{name!r}]"
            )
        plans.append(LayerPlan(name, module, decision, reason))
    return plans


def warn_unmatched_patterns(patterns: Iterable[str], model: nn.Module) -> None:
    """Warn about ``ignored_layers`` patterns that match no linear layer (or expert weight) of ``model``."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    names += [f"{name}.{w}" for name, m in model.named_modules() if is_experts_module(m) for w in EXPERT_WEIGHTS]
    for pattern in patterns:
        if not any(LayerPattern(pattern).matches(name) for name in names):
            close = closest_names(pattern, names)
            logger.warning(
                "omni_fp8: ignored_layers pattern %r matches no linear layer of %s%s",
                pattern,
                type(model).__name__,
                f"; closest layer names: {', '.join(close)}" if close else "",
            )


def apply_plans(plans: list[LayerPlan], config: Fp8Config) -> QuantizationReport:
    """Convert the planned layers one by one; returns what was done."""
    report = QuantizationReport()
    for plan in tqdm(plans, desc="omni_fp8: converting weights", unit="layer", disable=None, leave=False):
        module = plan.module
        report.layers.append(
            LayerReport(plan.name, module.out_features, module.in_features, plan.decision, plan.reason)
        )
        if plan.decision is Decision.BF16:
            _KEPT_WEIGHTS[module.weight] = plan.reason
            continue
        report.bytes_before += tensor_bytes(module.weight, module.bias)
        _convert_layer(plan, config)
        report.bytes_after += tensor_bytes(module.weight, module.weight_scale, module.input_scale, module.bias)
    return report


def _convert_layer(plan: LayerPlan, config: Fp8Config) -> None:
    if plan.decision is Decision.FP8 and config.weight_block_size is not None:
        BlockScaledLinear.convert(plan.module, block_size=config.weight_block_size)
        return
    ScaledLinear.convert(
        plan.module,
        quantize_input=plan.decision is Decision.FP8,
        granularity=config.granularity,
        fast_accum=config.fast_accum,
        input_scale=plan.input_scale,
    )


def convert_model(
    model: nn.Module, named_modules: Iterable[tuple[str, nn.Module]], config: Fp8Config
) -> dict[int, ScaledLinear]:
    """Plan and convert ``named_modules`` (all inside ``model``); the report is kept on ``model``.

    Returns the converted layers keyed by the id of the weight each one replaced. Everything
    that can refuse the conversion (non-finite weights, static scales that do not fit) is
    checked before the first layer is converted.
    """
    named_modules = list(named_modules)
    warn_unmatched_patterns(config.ignored_layers, model)
    plans = plan_layers(named_modules, config)
    assign_static_scales(plans, model, config)
    describe_blocks(plans, config)
    expert_plans = plan_experts(named_modules, config)
    replaced = {id(plan.module.weight): plan.module for plan in plans if plan.decision is not Decision.BF16}
    report = apply_plans(plans, config)
    report.merge(apply_expert_plans(expert_plans, config))
    report.config = config.to_dict()
    report = record_report(model, report)
    logger.info("omni_fp8 %s: %s", type(model).__name__, report.summary())
    return replaced


def quantize_(model: nn.Module, options: Mapping[str, Any] | Fp8Config | None = None) -> QuantizationReport:
    """Convert ``model``'s linear layers to FP8 in place, at load time (torchao style).

    ``options`` are those of ``torch.compile(..., backend="omni_fp8", options=...)``. Compile the
    model afterwards with the same backend; running it uncompiled also works (slower kernels).
    Layers converted earlier are left as they are, so calling this twice converts nothing twice.
    Returns the model's report, which accumulates over conversions.
    """
    config = Fp8Config.from_options(options)
    model = getattr(model, "_orig_mod", model)
    convert_model(model, model.named_modules(), config)
    return quantization_report(model)


def is_pending(weight: torch.Tensor) -> bool:
    """A BF16/FP16/FP32 parameter of a linear that no conversion has decided on yet."""
    return isinstance(weight, nn.Parameter) and weight.dtype in CONVERTIBLE_DTYPES and weight not in _KEPT_WEIGHTS


def keep_weights(weights: Iterable[torch.Tensor], reason: str) -> None:
    for weight in weights:
        _KEPT_WEIGHTS[weight] = reason


# The frames of module calls (module(...)). Reading a frame's locals makes Python (before 3.13)
# keep a snapshot of them with the frame until it returns: read only these frames' (the call's
# own arguments) first, and a user's frames (holding e.g. the last step's inputs) only as a
# last resort.
_MODULE_CALLS = (nn.Module._wrapped_call_impl.__code__, nn.Module._call_impl.__code__)


def _modules_on_call_stack(module_calls_only: bool) -> list[nn.Module]:
    """The nn.Modules whose methods are running now, innermost first (compile wrappers unwrapped)."""
    found: list[nn.Module] = []
    frame = sys._getframe(1)
    while frame is not None:
        if not module_calls_only or frame.f_code in _MODULE_CALLS:
            module = frame.f_locals.get("self")
            if isinstance(module, nn.Module):
                module = getattr(module, "_orig_mod", module)
                if not any(module is m for m in found):
                    found.append(module)
        frame = frame.f_back
    return found


def _named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


def running_owner(tensors: Iterable[torch.Tensor]) -> tuple[nn.Module, nn.Module] | None:
    """(owner, root): the innermost running module holding all ``tensors`` (as parameters or
    buffers) and the outermost running module around it; None if no running module holds them.

    With regional compilation (``compile_repeated_blocks``, ``block.compile()``) the owner is one
    block, and the other blocks of its class, which share its compiled graph, are in ``root``.
    """
    wanted = {id(t) for t in tensors}
    for module_calls_only in (True, False):  # modules called as module(...), then any method's self
        stack = _modules_on_call_stack(module_calls_only)
        owner = next((m for m in stack if wanted <= {id(t) for _, t in _named_tensors(m)}), None)
        if owner is not None:
            return owner, [m for m in stack if any(sub is owner for sub in m.modules())][-1]
    return None


def convert_owner_of(weights: list[torch.Tensor], config: Fp8Config) -> dict[int, ScaledLinear]:
    """Convert the model that owns ``weights``, found among the modules running on the call stack
    (:func:`running_owner`): the owner and every module of its class inside the outermost running
    model, which names the layers. Returns what :func:`convert_model` returns.
    """
    found = running_owner(weights)
    if found is None:
        raise RuntimeError(
            "omni_fp8 could not find the nn.Module that owns the weights it was asked to quantize "
            "(a compiled function rather than a module?). Compile the module itself with "
            "torch.compile(module, backend='omni_fp8'), or convert it first with "
            "fp8_compile.quantize_(module, options)."
        )
    owner, root = found
    named = []
    for unit_name, unit in root.named_modules():
        if type(unit) is type(owner):
            prefix = f"{unit_name}." if unit_name else ""
            named.extend((prefix + name, module) for name, module in unit.named_modules())
    return convert_model(root, named, config)


def pack_for_fused_gemms(groups: list[list[torch.Tensor]]) -> None:
    """Lay each group of tensors out back to back in one storage (``ops.packed_rows``), as the
    fused GEMM that reads them as one tensor expects, in the compiled module and in every module
    of its class: blocks of one class share one compiled graph, and a block laid out at its first
    call instead could be laid out inside a CUDA-graph warm-up, whose memory pool must not come
    to hold weights. A block whose tensors differ (a layer kept in BF16 there) is left as it is:
    Dynamo's guards give it a graph of its own, compiled and laid out for it."""
    found = running_owner(t for group in groups for t in group)
    if found is None:  # a graph called outside any module: only its own tensors are known
        for group in groups:
            ops.packed_rows(group)
        return
    owner, root = found
    names = {id(t): name for name, t in _named_tensors(owner)}
    plans = [[names[id(t)] for t in group] for group in groups]
    for unit in root.modules():
        if type(unit) is not type(owner):
            continue
        tensors = dict(_named_tensors(unit))
        for plan, group in zip(plans, groups):
            twins = [tensors.get(name) for name in plan]
            if all(_same_layout(twin, t) for twin, t in zip(twins, group)):
                ops.packed_rows(twins)


def _same_layout(twin: object, tensor: torch.Tensor) -> bool:
    return (
        isinstance(twin, torch.Tensor)
        and (twin.dtype, twin.shape, twin.device) == (tensor.dtype, tensor.shape, tensor.device)
        and twin.is_contiguous()
    )
