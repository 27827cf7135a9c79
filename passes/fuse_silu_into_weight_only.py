"""Fuse: a weight-only GEMM computes the SiLU of its input where it loads it.

Every AdaLN block of a DiT modulates with ``linear(silu(temb))``: a weight-only GEMV (few rows)
preceded by a one-row SiLU kernel, one per block (57 per FLUX forward, ~1.5 us each plus the
gap before the next kernel, whose cost is the launch and not the work). The GEMM kernels apply
the SiLU to each input tile they load instead, in float32; the model rounds SiLU's output to its
dtype first, so the product can differ in the last bit of bf16.
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn.functional as F

from fp8_compile import ops
from fp8_compile.passes.graph import Fp8Graph, LayerKind
from fp8_compile.passes.pass_manager import GraphPass


def _silu_input(node: fx.Node) -> fx.Node | None:
    """x for ``silu(x)`` (not in place)."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is F.silu):
        return None
    in_place = node.args[1] if len(node.args) > 1 else node.kwargs.get("inplace", False)
    return None if in_place else node.args[0]


class FuseSiluIntoWeightOnly(GraphPass):
    def __call__(self, graph: Fp8Graph) -> None:
        for layer in graph.layers:
            node = layer.node
            if layer.kind is not LayerKind.WEIGHT_ONLY or node.target is not ops.weight_only_linear:
                continue
            x = _silu_input(node.args[0])
            if x is not None and not node.kwargs.get("input_silu"):
                node.args = (x, *node.args[1:])
                node.kwargs = {**node.kwargs, "input_silu": True}
