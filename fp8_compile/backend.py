"""The ``omni_fp8`` torch.compile backend.

    trace (Dynamo) -> match -> quantize -> fuse -> lower -> Inductor

Dynamo hands over a traced graph. ``MatchLinearLayers`` finds its linear layers. If the model
behind them has not been converted yet, the graph is returned wrapped in
:class:`ConvertOnFirstCall`: its first call converts the model's weights to FP8 (once, freeing
the BF16 copies) and computes that call in FP8 eagerly; the conversion changes the module
state that Dynamo guards on, so the next call is traced again, now through the FP8 modules,
and compiled for good. Converting with ``fp8_compile.quantize_`` before compiling skips that
first trace. A graph of converted modules runs through the passes below, in this order, and
then through Inductor, which generates the FP8 kernels.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx as fx
from torch._dynamo.exc import RestartAnalysis

from fp8_compile.config import Fp8Config
from fp8_compile.convert import convert_owner_of, is_pending, keep_weights, pack_for_fused_gemms
from fp8_compile.hardware import device_of, select_lowering
from fp8_compile.inductor import compile_graph as compile_with_inductor
from fp8_compile.modules import ScaledLinear
from fp8_compile.passes import (
    FeedFp8AttentionOutput,
    FuseActivationQuantization,
    FuseNormRotaryQuantization,
    FuseSiblingGemms,
    FuseSiluIntoWeightOnly,
    LINEAR_TARGETS,
    Fp8Graph,
    LayerKind,
    LowerBlockScaledLinear,
    LowerWeightOnly,
    MatchLinearLayers,
    PassManager,
    QuantizeAttention,
    QuantizeLinear,
    RealRotaryEmbedding,
    ShareActivationQuantization,
    UseWeightOnlyWithoutFp8Gemm,
    linear_args,
)

logger = logging.getLogger("fp8_compile")

FP8_PASSES = PassManager(
    [
        UseWeightOnlyWithoutFp8Gemm(),  # lower: no FP8 GEMM on this device -> weight-only
        RealRotaryEmbedding(),  # fuse: complex rotary embeddings as real arithmetic Inductor can fuse
        QuantizeLinear(),  # quantize: activation-quantize + scaled-mm nodes
        QuantizeAttention(),  # quantize: FP8 Q/K/V + cuDNN FP8 attention (option fp8_attention)
        FuseNormRotaryQuantization(),  # fuse: Q/K RMSNorm + rotary embedding + FP8 cast in one kernel
        LowerBlockScaledLinear(),  # quantize: block-FP8 layers -> group-quantize + block-scaled GEMM
        ShareActivationQuantization(),  # fuse: one quantization per activation read by several layers
        FuseSiblingGemms(),  # fuse: the layers reading one quantized activation as one GEMM (q/k/v)
        FuseActivationQuantization(),  # fuse: GELU / SiLU-gating (+ cat) and the quantization in one pass
        FeedFp8AttentionOutput(),  # fuse: the layer after an FP8 attention reads its FP8 output
        LowerWeightOnly(),  # lower: weight-only layers -> dequantize + GEMM
        FuseSiluIntoWeightOnly(),  # fuse: the SiLU of a weight-only GEMM's input into its kernel
    ]
)


def omni_fp8(
    gm: fx.GraphModule,
    example_inputs: list,
    options: Mapping[str, Any] | None = None,
    mode: str | None = None,
) -> Callable:
    """Compile a Dynamo graph with its linear layers in FP8. Registered as ``backend="omni_fp8"``."""
    config = Fp8Config.from_options(options)
    device = device_of(example_inputs)
    graph = Fp8Graph(gm, list(example_inputs), config, device, select_lowering(device, config.lowering))
    MatchLinearLayers()(graph)
    check_inference_only(graph)
    if any(layer.kind is LayerKind.BF16 and is_pending(layer.weight) for layer in graph.layers):
        return ConvertOnFirstCall(graph, mode)
    return compile_graph(graph, mode)


def check_inference_only(graph: Fp8Graph) -> None:
    """Refuse a graph that autograd would have to differentiate through FP8 layers.

    ``_scaled_mm`` has no derivative: left alone, AOTAutograd fails deep inside with
    "derivative for aten::_scaled_mm is not implemented". Dynamo guards on the grad mode, so
    the same model called under ``torch.no_grad()`` is traced again and compiled normally.
    """
    if not torch.is_grad_enabled():
        return
    if not any(isinstance(value, torch.Tensor) and value.requires_grad for value in graph.example_inputs):
        return
    fp8 = [layer.name for layer in graph.layers if layer.kind is not LayerKind.BF16 or is_pending(layer.weight)]
    if fp8:
        raise RuntimeError(
            f"omni_fp8 compiles for inference only (FP8 GEMMs have no backward), and {describe_graph(graph)} "
            "was called with gradients enabled on inputs or parameters that require grad. Call the model "
            "under torch.no_grad() or torch.inference_mode() (diffusers pipelines do)."
        )


class InductorFallbackWarning(UserWarning):
    """Inductor failed on a graph, which then runs its FP8 operations uncompiled."""


def compile_graph(graph: Fp8Graph, mode: str | None) -> Callable:
    """Run the FP8 passes on a matched graph, then Inductor.

    Should Inductor fail, the graph runs as the passes left it, uncompiled: the same FP8
    operations with the same scales, only slower, and a warning names the graph. A generation
    hours long then finishes instead of crashing; ``strict=True`` raises instead.
    """
    FP8_PASSES(graph)
    fp8_layers = sum(layer.kind is not LayerKind.BF16 for layer in graph.layers)
    logger.debug("omni_fp8: compiling a graph with %d FP8 layers of %d", fp8_layers, len(graph.layers))
    # Inductor rewrites the graph module it is given in place; a failure can leave it half done.
    uncompiled = _copy_graph_module(graph.gm)
    try:
        compiled = compile_with_inductor(graph.gm, graph.example_inputs, graph.device, mode, graph.config.cudagraphs)
        pack_for_fused_gemms(graph.packed_tensors)  # now that Inductor has seen them where Dynamo did
        return compiled
    except RestartAnalysis:
        raise  # Dynamo asking to trace the frame again (e.g. with its float scalars as tensors)
    except Exception as error:
        if graph.config.strict:
            raise
        warnings.warn(
            f"omni_fp8: Inductor failed on {describe_graph(graph)} ({_first_line(error)}); that graph now runs its FP8 "
            "operations uncompiled (same numerics, slower). Pass options={'strict': True} to raise instead.",
            InductorFallbackWarning,
            stacklevel=2,
        )
        logger.debug("omni_fp8: the Inductor failure in full", exc_info=True)
        return uncompiled


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    # Copies the nodes only; tensors the graph holds as attributes stay shared.
    return fx.GraphModule(gm, copy.deepcopy(gm.graph))


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def describe_graph(graph: Fp8Graph) -> str:
    """A graph as messages name it: Dynamo's compile id (as TORCH_LOGS prints it) and its layers."""
    compile_id = graph.gm.meta.get("dynamo_compile_id")
    names = [layer.name for layer in graph.layers]
    shown = names if len(names) <= 3 else [names[0], "...", names[-1]]
    layers = f"{len(names)} linear layer{'s' * (len(names) != 1)}: {', '.join(shown)}" if names else "no linear layer"
    return f"graph {compile_id if compile_id is not None else '?'} ({layers})"


class ConvertOnFirstCall:
    """A graph traced before its model was converted to FP8.

    Each call converts the model behind any weight still waiting for it, then computes in FP8
    eagerly. Dynamo traces the converted model again on its next call, so a model meets this
    once. A graph in which no layer was converted (all ignored, say) is compiled as it is.
    It keeps no reference to the example inputs, so the BF16 weights are freed on conversion.
    """

    def __init__(self, graph: Fp8Graph, mode: str | None):
        self.gm, self.config, self.device, self.lowering, self.mode = graph.gm, graph.config, graph.device, graph.lowering, mode
        placeholders = [n for n in graph.gm.graph.nodes if n.op == "placeholder"]
        self.weight_positions = sorted(
            {placeholders.index(linear_args(layer.node.args, layer.node.kwargs)[1]) for layer in graph.layers}
        )
        self.compiled: Callable | None = None

    def __call__(self, *args: Any) -> Any:
        if self.compiled is not None:
            return self.compiled(*args)
        weights = [args[i] for i in self.weight_positions]
        pending = [w for w in weights if is_pending(w)]
        replaced = convert_owner_of(pending, self.config) if pending else {}
        # Weights that no conversion reached (linears called on a bare parameter) stay as they are.
        keep_weights((w for w in pending if id(w) not in replaced and is_pending(w)), "not an nn.Linear")
        if any(id(w) in replaced for w in weights):
            return _RunWithConvertedWeights(self.gm, replaced).run(*args)
        graph = Fp8Graph(self.gm, list(args), self.config, self.device, self.lowering)
        MatchLinearLayers()(graph)
        self.compiled = compile_graph(graph, self.mode)
        return self.compiled(*args)


class _RunWithConvertedWeights(fx.Interpreter):
    """Runs a graph eagerly, with each converted layer's FP8 weights in place of its old ones."""

    def __init__(self, gm: fx.GraphModule, replaced: dict[int, ScaledLinear]):
        super().__init__(gm)
        self.replaced = replaced

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        if target in LINEAR_TARGETS:
            x, weight, bias = linear_args(args, kwargs)
            module = self.replaced.get(id(weight))
            if module is not None:
                return module.linear(x, bias)
        return super().call_function(target, args, kwargs)
