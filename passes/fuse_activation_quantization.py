"""Fuse: quantize an activation in the same pass as the activation function that made it.

Matches, on the input of a per-row ``quantize_activation``:

    gelu(y)                      (FLUX, Qwen-Image, Wan, HunyuanVideo MLPs)
    silu(y) * gate               (SwiGLU: Z-Image, FLUX.2)
    cat([a, gelu(y)], dim=-1)    (FLUX single blocks: attention output next to the MLP branch)

and replaces the chain by one ``quantize_rows`` call (a Triton kernel on NVIDIA GPUs), so the
activation's BF16 output is never written and the row is read from memory once, instead of
Inductor's reduction kernel followed by a second kernel that re-reads the row for the cast.
Per-tensor scaling needs a global amax first and is left to Inductor.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from fp8_compile import ops
from fp8_compile.passes.graph import MUL_TARGETS, Fp8Graph
from fp8_compile.passes.pass_manager import GraphPass
from fp8_compile.passes.quantize_linear import restore_leading_dims

_GELU = (F.gelu,)  # the same object as torch._C._nn.gelu
_SILU = (F.silu,)
_CAT = (torch.cat, torch.concat)


def _only_user(node: fx.Node, user: fx.Node) -> bool:
    """``user`` is the only node reading ``node``'s values (others may read its shape)."""
    if not isinstance(node, fx.Node):
        return False
    return [u for u in node.users if u.target is not restore_leading_dims] == [user]


def _through_inference_dropout(node: fx.Node, reader: fx.Node) -> tuple[fx.Node, fx.Node]:
    """Follow eval-mode dropouts (identities) up from ``node``: (the node they pass on, its reader)."""
    while (
        node.op == "call_function"
        and node.target is F.dropout
        and not (node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True))
        and _only_user(node, reader)
    ):
        node, reader = node.args[0], node
    return node, reader


def _activation_of(node: fx.Node, user: fx.Node) -> tuple[fx.Node, fx.Node | None, str] | None:
    """(input, gate, activation name) when ``node`` is an activation read only by ``user``."""
    if not _only_user(node, user) or node.op != "call_function":
        return None
    if node.target in _GELU:
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return node.args[0], None, "gelu_tanh" if approximate == "tanh" else "gelu"
    if node.target in MUL_TARGETS and len(node.args) == 2:
        for silu, gate in (node.args, node.args[::-1]):
            if isinstance(silu, fx.Node) and silu.op == "call_function" and silu.target in _SILU and _only_user(silu, node):
                # the kernel reads x and gate row by row: a broadcast gate is left to Inductor
                if not silu.kwargs.get("inplace", False) and isinstance(gate, fx.Node) and _same_shape(silu, gate, node):
                    return silu.args[0], gate, "silu_mul"
    return None


def _same_shape(*nodes: fx.Node) -> bool:
    shapes = [getattr(node.meta.get("example_value"), "shape", None) for node in nodes]
    return None not in shapes and all(shape == shapes[0] for shape in shapes)


def _last_dim(node: fx.Node) -> bool:
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return dim in (-1, node.meta["example_value"].dim() - 1)


class FuseActivationQuantization(GraphPass):
    def __call__(self, graph: Fp8Graph) -> None:
        g = graph.gm.graph
        for node in list(g.nodes):
            if node.op != "call_function" or node.target is not ops.quantize_activation:
                continue
            x2d, granularity = node.args
            if granularity != "per_row" or x2d.op != "call_method" or not _only_user(x2d, node):
                continue
            prefix = None
            source, reader = _through_inference_dropout(x2d.args[0], x2d)
            if source.op == "call_function" and source.target in _CAT and _only_user(source, reader) and _last_dim(source):
                parts = source.args[0]
                if len(parts) != 2:
                    continue
                prefix, fused = parts[0], _activation_of(parts[1], source)
            else:
                fused = _activation_of(source, reader)
            if fused is None:
                continue
            x, gate, activation = fused
            with g.inserting_before(node):
                quantized = g.call_function(ops.quantize_rows, (x, gate, prefix, activation))
            node.replace_all_uses_with(quantized)
            g.erase_node(node)
