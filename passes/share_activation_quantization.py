"""Fuse: layers that read the same activation quantize it once.

Attention's to_q / to_k / to_v (and FLUX's single-block proj_mlp) all read one normalized
input. After QuantizeLinear each has its own quantize_activation of it; this pass keeps the
first and points the others at it, so the activation is read, reduced and cast once.
"""

from __future__ import annotations

from fp8_compile import ops
from fp8_compile.passes.graph import Fp8Graph
from fp8_compile.passes.pass_manager import GraphPass


class ShareActivationQuantization(GraphPass):
    def __call__(self, graph: Fp8Graph) -> None:
        seen: dict[tuple, object] = {}
        for node in list(graph.gm.graph.nodes):
            if node.op != "call_function" or node.target is not ops.quantize_activation:
                continue
            x2d, granularity = node.args
            # the reshape of the same activation to the same width is the same tensor
            key = (x2d.target, x2d.args, granularity) if x2d.op == "call_method" else (x2d, granularity)
            if key in seen:
                node.replace_all_uses_with(seen[key])
                graph.gm.graph.erase_node(node)
            else:
                seen[key] = node
