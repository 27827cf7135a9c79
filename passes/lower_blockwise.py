"""Lower: block-scaled FP8 layers become a per-group activation quantization and the block GEMM.

``fp8_compile::block_scaled_linear(x, w, w_scale, bias, block_n, block_k)`` becomes

    x2d = x.reshape(-1, K)
    x_fp8, x_scale = quantize_activation_groups(x2d, block_k)   # per-group amax, scale, cast
    y2d = block_scaled_mm(x_fp8, x_scale, w, w_scale, bias, (block_n, block_k), out_dtype)
    y = y2d.reshape(*x.shape[:-1], N)

so that Inductor fuses the group quantization into the kernel that produces ``x``, and the GEMM
is the Triton block-scaled FP8 kernel (on CUDA).
"""

from __future__ import annotations

import operator

import torch

from fp8_compile.blockwise import block_scaled_mm, quantize_activation_groups
from fp8_compile.passes.graph import Fp8Graph
from fp8_compile.passes.pass_manager import GraphPass
from fp8_compile.passes.quantize_linear import restore_leading_dims

BLOCK_SCALED_LINEAR = torch.ops.fp8_compile.block_scaled_linear.default


class LowerBlockScaledLinear(GraphPass):
    def __call__(self, graph: Fp8Graph) -> None:
        g = graph.gm.graph
        for node in list(g.nodes):
            if node.op != "call_function" or node.target is not BLOCK_SCALED_LINEAR:
                continue
            x, weight, weight_scale, bias, block_n, block_k = node.args
            out_dtype = node.meta["example_value"].dtype
            in_features = x.meta["example_value"].shape[-1]
            with g.inserting_before(node):
                x2d = g.call_method("reshape", (x, -1, in_features))
                quantized = g.call_function(quantize_activation_groups, (x2d, block_k))
                x_fp8 = g.call_function(operator.getitem, (quantized, 0))
                x_scale = g.call_function(operator.getitem, (quantized, 1))
                y2d = g.call_function(
                    block_scaled_mm, (x_fp8, x_scale, weight, weight_scale, bias, (block_n, block_k), out_dtype)
                )
                y = g.call_function(restore_leading_dims, (y2d, x))
            y.meta["example_value"] = node.meta["example_value"]  # the same value: a next layer reads its shape
            node.replace_all_uses_with(y)
            g.erase_node(node)
