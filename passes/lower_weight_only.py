"""Lower: weight-only FP8 layers become a GEMM on the dequantized weight.

On SM80-SM88, which have no FP8 tensor cores, the FP8 (W8A8) layers are turned into
weight-only ones first, so every FP8 layer keeps its FP8 weight in memory.
"""

from __future__ import annotations

from fp8_compile import ops
from fp8_compile.passes.graph import WEIGHT_ONLY_LINEAR, Fp8Graph, LayerKind, Lowering
from fp8_compile.passes.pass_manager import GraphPass


class UseWeightOnlyWithoutFp8Gemm(GraphPass):
    """Where the device has no FP8 GEMM, run the W8A8 layers weight-only."""

    def __call__(self, graph: Fp8Graph) -> None:
        if graph.lowering is not Lowering.WEIGHT_ONLY:
            return
        for layer in graph.layers:
            if layer.kind is LayerKind.FP8:
                x, weight, weight_scale, bias, _granularity, _fast_accum = layer.node.args
                layer.node.target = WEIGHT_ONLY_LINEAR
                layer.node.args = (x, weight, weight_scale, bias)
                layer.node.kwargs = {}  # a static input_scale has no use without an FP8 GEMM
                layer.kind = LayerKind.WEIGHT_ONLY


class LowerWeightOnly(GraphPass):
    def __call__(self, graph: Fp8Graph) -> None:
        for layer in graph.layers:
            if layer.kind is LayerKind.WEIGHT_ONLY:
                layer.node.target = ops.weight_only_linear
