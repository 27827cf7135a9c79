"""Fuse: the layer after an FP8 attention reads its FP8 output (option ``fp8_attention``).

cuDNN's FP8 attention writes its output in FP8, with V's per-tensor scale (see
``fp8_compile.attention``). The output projection then quantized it again: dequantized to BF16,
a per-row amax, a second cast (FLUX: a kernel for each of to_out and to_add_out in a double
block; a BF16 copy written for the single blocks' row quantization of [attention, MLP]). This
pass hands those layers the FP8 output itself, regrouped as the model regroups it (permute,
flatten, split ...), with V's scale: to a ``quantize_activation`` reader as the FP8 rows and the
scale (repeated per row next to per-row weight scales), to ``quantize_rows`` as an FP8 prefix
and its scale. One rounding fewer than before, since the values are the kernel's FP8 ones;
anything else that reads the output (a residual, a norm) still reads it dequantized.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx

from fp8_compile import attention, ops
from fp8_compile.passes.graph import Fp8Graph, example_value
from fp8_compile.passes.pass_manager import GraphPass

logger = logging.getLogger("fp8_compile")

# operations that regroup elements without changing them, done on the FP8 output as on BF16
_LAYOUT_METHODS = {
    "permute", "transpose", "flatten", "unflatten", "reshape", "view", "contiguous", "split", "split_with_sizes",
    "chunk", "unsqueeze", "squeeze",
}  # fmt: skip
_LAYOUT_FUNCTIONS = {
    torch.permute, torch.transpose, torch.flatten, torch.reshape, torch.split, torch.chunk, torch.unsqueeze,
    torch.squeeze,
}  # fmt: skip
# casts between floating-point dtypes: the FP8 values are the ones the cast would have rounded
_CAST_METHODS = {"float", "bfloat16", "half"}  # x.float(): no argument


def _index_keeps_values(index) -> bool:
    """``x[index]`` selects elements (ints, slices, None, ...), no gather by a tensor."""
    parts = index if isinstance(index, tuple) else (index,)
    return all(isinstance(p, (int, slice, type(None))) or p is Ellipsis for p in parts)


def _regroups(node: fx.Node) -> bool:
    """Whether ``node`` reads its first argument's elements and only regroups or casts them."""
    if node.op == "call_method" and node.target == "type_as":  # Wan: out.type_as(query)
        return len(node.args) == 2 and _is_floating(example_value(node.args[1]))
    if node.op == "call_method" and node.target in _CAST_METHODS:
        return len(node.args) == 1 and not node.kwargs
    if node.op == "call_method" and node.target == "to":
        dtypes = [a for a in (*node.args[1:], node.kwargs.get("dtype")) if a is not None]
        return len(dtypes) == 1 and isinstance(dtypes[0], torch.dtype) and dtypes[0].is_floating_point
    if node.op == "call_method" and node.target in _LAYOUT_METHODS:
        return not any(isinstance(a, torch.dtype) for a in node.args[1:])  # view(dtype) reinterprets
    if node.op == "call_function" and node.target is operator.getitem:
        return _index_keeps_values(node.args[1])
    return node.op == "call_function" and node.target in _LAYOUT_FUNCTIONS


def _is_floating(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype.is_floating_point


def _is_cast(node: fx.Node) -> bool:
    return node.op == "call_method" and node.target in (*_CAST_METHODS, "to", "type_as")


class _Readers:
    """The FP8-capable readers of one attention call's output, through regrouping operations."""

    def __init__(self, call: fx.Node):
        self.reached = {call}
        self.activations: list[fx.Node] = []  # quantize_activation(x2d, granularity)
        self.prefixes: list[fx.Node] = []  # quantize_rows(x, gate, prefix, activation)
        queue = [call]
        while queue:
            for user in queue.pop().users:
                if user in self.reached:
                    continue
                if user.op == "call_function" and user.target is ops.quantize_activation:
                    if user.args[0] in self.reached and user.args[1] in ("per_row", "per_tensor"):
                        self.activations.append(user)
                elif user.op == "call_function" and user.target is ops.quantize_rows:
                    if len(user.args) == 4 and user.args[2] in self.reached and "prefix_scale" not in user.kwargs:
                        self.prefixes.append(user)
                elif user.args and isinstance(user.args[0], fx.Node) and user.args[0] in self.reached and _regroups(user):
                    self.reached.add(user)
                    queue.append(user)


class FeedFp8AttentionOutput(GraphPass):
    def __call__(self, graph: Fp8Graph) -> None:
        fx_graph = graph.gm.graph
        calls = [n for n in fx_graph.nodes if n.op == "call_function" and n.target is attention.fp8_attention]
        fed = 0
        for call in calls:
            readers = _Readers(call)
            if readers.activations or readers.prefixes:
                self._feed(fx_graph, call, readers)
                fed += 1
        if calls:
            logger.info(
                "omni_fp8: %d of %d FP8 attention outputs read in FP8 by the layer after them (no dequantize and requantize)",
                fed,
                len(calls),
            )

    def _feed(self, fx_graph: fx.Graph, call: fx.Node, readers: _Readers) -> None:
        with fx_graph.inserting_before(call):
            quantized = fx_graph.call_function(attention.fp8_attention_quantized, call.args, dict(call.kwargs))
            out8 = fx_graph.call_function(operator.getitem, (quantized, 0))
            out_scale = fx_graph.call_function(operator.getitem, (quantized, 1))
            dequantized = fx_graph.call_function(ops.dequantize, (out8, out_scale, example_value(call).dtype))
        dequantized.meta.update(call.meta)
        call.replace_all_uses_with(dequantized)
        fx_graph.erase_node(call)
        fp8_of = {dequantized: out8}

        def fp8_version(node: fx.Node) -> fx.Node:
            """The node's FP8 counterpart: the same regrouping applied to the FP8 output."""
            if node not in fp8_of:
                source = fp8_version(node.args[0])
                if _is_cast(node):
                    fp8_of[node] = source
                else:
                    with fx_graph.inserting_after(source):
                        fp8_of[node] = fx_graph.create_node(node.op, node.target, (source, *node.args[1:]), dict(node.kwargs))
            return fp8_of[node]

        for reader in readers.activations:
            x2d, granularity = reader.args
            with fx_graph.inserting_before(reader):
                replacement = fx_graph.call_function(attention.output_as_activation, (fp8_version(x2d), out_scale, granularity))
            reader.replace_all_uses_with(replacement)
            fx_graph.erase_node(reader)
        for reader in readers.prefixes:
            args = list(reader.args)
            args[2] = fp8_version(args[2])
            reader.args = tuple(args)
            reader.kwargs = {**reader.kwargs, "prefix_scale": out_scale}
