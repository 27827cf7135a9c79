"""Match: find the linear nodes on the module's weights (BF16 parameters or converted FP8
buffers), name them and classify them."""

from __future__ import annotations

import torch
import torch.nn as nn

from fp8_compile.passes.graph import (
    LINEAR_TARGETS,
    SCALED_LINEAR,
    WEIGHT_ONLY_LINEAR,
    Fp8Graph,
    LayerKind,
    LinearLayer,
    linear_args,
    source_module_path,
)
from fp8_compile.passes.pass_manager import GraphPass

_KINDS = {SCALED_LINEAR: LayerKind.FP8, WEIGHT_ONLY_LINEAR: LayerKind.WEIGHT_ONLY}


class MatchLinearLayers(GraphPass):
    """Fills ``graph.layers``: plain linears on parameters and the fp8_compile ops of converted ones."""

    def __call__(self, graph: Fp8Graph) -> None:
        values = graph.placeholder_values()
        for node in graph.gm.graph.nodes:
            if node.op != "call_function":
                continue
            if node.target in LINEAR_TARGETS:
                kind, weight_node = LayerKind.BF16, linear_args(node.args, node.kwargs)[1]
            elif node.target in _KINDS:
                kind, weight_node = _KINDS[node.target], node.args[1]
            else:
                continue
            weight = values.get(weight_node)
            if kind is LayerKind.BF16 and not isinstance(weight, nn.Parameter):
                continue  # a product of two activations, not a layer
            if not isinstance(weight, torch.Tensor):
                continue
            name = source_module_path(weight_node) or weight_node.name
            graph.layers.append(LinearLayer(node=node, name=name, kind=kind, weight=weight))
