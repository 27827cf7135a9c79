"""Quantize: replace each FP8 linear by explicit activation-quantize and scaled-mm nodes.

``fp8_compile::scaled_linear(x, w, w_scale, bias)`` becomes

    x2d = x.reshape(-1, K)
    x_fp8, x_scale = quantize_activation(x2d)        # amax, scale, cast: element-wise work
    y2d = _scaled_mm(x_fp8, w.t(), x_scale, w_scale.t(), bias)   # scales and bias in the epilogue
    y = y2d.reshape(*x.shape[:-1], N)

so that Inductor sees the quantization as ordinary element-wise and reduction ops and fuses
them into the kernel that produces ``x`` (a norm, a modulation, a GELU). A layer with a static
``input_scale`` gets ``quantize_activation_static(x2d, input_scale)`` instead: no reduction,
a pointwise divide-clamp-cast that Inductor folds into the producer's kernel.
"""

from __future__ import annotations

import operator

import torch

from fp8_compile import ops
from fp8_compile.passes.graph import Fp8Graph, LayerKind
from fp8_compile.passes.pass_manager import GraphPass


def restore_leading_dims(y2d: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return y2d.reshape(*x.shape[:-1], y2d.shape[-1])


class QuantizeLinear(GraphPass):
    def __call__(self, graph: Fp8Graph) -> None:
        g = graph.gm.graph
        for layer in graph.layers:
            if layer.kind is not LayerKind.FP8:
                continue
            node = layer.node
            x, weight, weight_scale, bias, granularity, fast_accum = node.args
            input_scale = node.kwargs.get("input_scale")  # a calibrated scale: static quantization
            out_dtype = node.meta["example_value"].dtype
            in_features = layer.weight.shape[1]
            with g.inserting_before(node):
                x2d = g.call_method("reshape", (x, -1, in_features))
                if input_scale is None:
                    quantized = g.call_function(ops.quantize_activation, (x2d, granularity))
                    x_fp8 = g.call_function(operator.getitem, (quantized, 0))
                    x_scale = g.call_function(operator.getitem, (quantized, 1))
                else:
                    x_fp8 = g.call_function(ops.quantize_activation_static, (x2d, input_scale))
                    x_scale = g.call_function(ops.static_activation_scale, (input_scale, x2d, weight_scale))
                y2d = g.call_function(
                    ops.fp8_matmul, (x_fp8, x_scale, weight, weight_scale, bias, out_dtype, fast_accum)
                )
                y = g.call_function(restore_leading_dims, (y2d, x))
            y.meta["example_value"] = node.meta["example_value"]  # the same value: later passes read its shape
            node.replace_all_uses_with(y)
            g.erase_node(node)
            layer.node = y
