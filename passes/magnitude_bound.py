"""Upper bounds on |x| read off the graph, so that FP8 attention can scale Q and K without an amax.

A dynamic per-tensor scale needs the largest |q| of the whole tensor: a global reduction that
Inductor cannot fuse into the kernel that makes q, so q is written in BF16, reduced, and read
again to be cast (with V: 3.3 -> 9.2 ms of quantize kernels in a FLUX.1-dev forward on an H100).
Queries and keys come out of a normalization, which bounds them with no pass over the data: an
RMSNorm row divided by its root mean square has no element above sqrt(d) (x_i^2 <= sum x^2), times
the norm weight's largest |w|; a rotary embedding multiplies by cosines and sines, at most 1.
A scale from the bound maps the largest *possible* value to 448 instead of the largest actual
one. e4m3 is floating point: a value below that keeps its 3 mantissa bits unless it falls under
2^-6 of the scale into the subnormals, so the looser scale costs nearly nothing (tested).

:class:`MagnitudeBound` walks back from a tensor through the operations below and inserts nodes
that compute the bound as a float32 scalar at run time, from small tensors only (norm weights,
rotary tables): the weights may change between calls (a LoRA, a new checkpoint), so nothing is
folded at compile time. Where a path leads to anything else (a linear layer's output, an
unknown op) there is no bound, and the caller measures the amax as before.
"""

from __future__ import annotations

import functools
import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from fp8_compile import ops
from fp8_compile.passes.graph import MUL_TARGETS, example_value, written_by
from fp8_compile.passes.real_rotary import rotate_pairs

# A bound: a Python number, or a node computing a float32 scalar tensor.
Bound = float | fx.Node

# Operations that move, copy, cast or regroup elements: no element grows. (A cast to a narrower
# float may round up by half a step; the FP8 quantization saturates at 448 there.)
_SAME_MAGNITUDE_METHODS = {
    "view", "reshape", "unflatten", "flatten", "permute", "transpose", "contiguous", "clone", "to",
    "float", "bfloat16", "half", "type_as", "unsqueeze", "squeeze", "expand", "repeat_interleave",
    "unbind", "chunk", "split", "neg", "flip",
}  # fmt: skip
_SAME_MAGNITUDE_FUNCTIONS = {
    operator.getitem, operator.neg, torch.neg, torch.permute, torch.transpose, torch.reshape,
    torch.flatten, torch.unsqueeze, torch.squeeze, torch.unbind, torch.chunk, torch.split, torch.flip,
}  # fmt: skip
_BOUNDED_BY_ONE = {"cos", "sin", torch.cos, torch.sin}
_ADD_TARGETS = (operator.add, torch.add, operator.sub, torch.sub)
_RMS_NORMS = (F.rms_norm, torch.rms_norm)
_LAYER_NORMS = (F.layer_norm, torch.layer_norm)


def _numel(node: fx.Node) -> int | None:
    value = example_value(node)
    return value.numel() if isinstance(value, torch.Tensor) else None


def _is_complex(node: fx.Node) -> bool:
    value = example_value(node)
    return not isinstance(value, torch.Tensor) or value.is_complex()


def _nonzero_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value != 0


def _written_in_place(node: fx.Node) -> list[fx.Node]:
    """The nodes that write into ``node``, directly or through a view of it (``setitem``, an
    in-place method such as ``mul_``, an ``out=`` argument)."""
    writes, views, seen = [], [node], {node}
    while views:
        tensor = views.pop()
        for user in tensor.users:
            if written_by(user) is tensor:
                writes.append(user)
            elif user not in seen and (user.target in _SAME_MAGNITUDE_METHODS or user.target in _SAME_MAGNITUDE_FUNCTIONS):
                seen.add(user)
                views.append(user)
    return writes


def _strip_casts(node):
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target in ("to", "float", "type_as"):
        node = node.args[0]
    return node


def _normalized_size(normalized_shape) -> int | None:
    if isinstance(normalized_shape, int):
        return normalized_shape
    if isinstance(normalized_shape, (tuple, list)) and all(isinstance(d, int) for d in normalized_shape):
        return math.prod(normalized_shape)
    return None


def _divided_by_rms(node: fx.Node) -> int | None:
    """d when ``node`` is ``x * rsqrt(mean(x^2, -1, keepdim=True) + eps)`` (an RMSNorm spelled out,
    as in diffusers' own RMSNorm), x with d elements per row; None otherwise."""
    if node.target not in MUL_TARGETS or len(node.args) != 2:
        return None
    for x, rsqrt in (node.args, reversed(node.args)):
        if not (isinstance(rsqrt, fx.Node) and rsqrt.target is torch.rsqrt and isinstance(x, fx.Node)):
            continue
        total = rsqrt.args[0]
        if not (isinstance(total, fx.Node) and total.target in (operator.add, torch.add)):
            continue
        mean, eps = total.args if isinstance(total.args[0], fx.Node) else reversed(total.args)
        if not (isinstance(eps, (int, float)) and eps >= 0 and isinstance(mean, fx.Node)):
            continue
        if mean.target not in ("mean", torch.mean) or not mean.kwargs.get("keepdim", False):
            continue
        if mean.args[1:2] not in ((-1,), ([-1],), ((-1,),)):
            continue
        square = mean.args[0]
        if not (isinstance(square, fx.Node) and square.target in ("pow", torch.pow) and square.args[1:] == (2,)):
            continue
        value = example_value(x)
        if _strip_casts(square.args[0]) is _strip_casts(x) and isinstance(value, torch.Tensor):
            return value.shape[-1]
    return None


class MagnitudeBound:
    """Bounds for tensors of one graph, with the nodes that compute them inserted before ``anchor``
    (the node that will use them). A tensor of at most ``max_measured_numel`` elements with no
    rule of its own (a norm weight, a rotary table) is bounded by its measured amax."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node, max_measured_numel: int):
        self.graph = graph
        self.anchor = anchor
        self.max_measured_numel = max_measured_numel
        self._bounds: dict[fx.Node, Bound | None] = {}

    def __call__(self, node: fx.Node) -> Bound | None:
        if node not in self._bounds:
            # a tensor written in place after it was made may hold anything (GLM-Image writes its
            # rotary embedding into Q and K so); the one pattern of writes read is a buffer filled
            # by indexed assignments (Wan's rotary embedding)
            if node.target is torch.empty_like:
                self._bounds[node] = self._filled_buffer(node)
            elif _written_in_place(node):
                self._bounds[node] = None
            else:
                self._bounds[node] = self._bound(node)
        return self._bounds[node]

    def _operand(self, value) -> Bound | None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(abs(value))
        return self(value) if isinstance(value, fx.Node) else None

    def _bound(self, node: fx.Node) -> Bound | None:
        target, args = node.target, node.args
        if node.op in ("call_method", "call_function"):
            if target in _BOUNDED_BY_ONE and not _is_complex(node):
                return 1.0
            if target in _SAME_MAGNITUDE_METHODS or target in _SAME_MAGNITUDE_FUNCTIONS:
                return self._operand(args[0])
            if target in (torch.cat, torch.stack):
                return self._maximum([self._operand(a) for a in args[0]])
            if target in _RMS_NORMS:
                return self._normalized(node, weight_index=2, bias_index=None)
            if target in _LAYER_NORMS:
                return self._normalized(node, weight_index=2, bias_index=3)
            if target is rotate_pairs:  # |a cos - b sin| <= sqrt(a^2 + b^2) |freqs|
                return self._product([math.sqrt(2.0), self._operand(args[0]), self._operand(args[1])])
            if target in MUL_TARGETS and len(args) == 2:
                rms_size = _divided_by_rms(node)
                if rms_size is not None:
                    return math.sqrt(rms_size)
                return self._product([self._operand(a) for a in args])
            if target in _ADD_TARGETS and len(args) == 2 and "alpha" not in node.kwargs:
                return self._sum([self._operand(a) for a in args])
            if target in (operator.truediv, torch.div) and not node.kwargs and _nonzero_number(args[1]):
                return self._product([self._operand(args[0]), 1.0 / abs(args[1])])
        return self._measured(node)

    def _normalized(self, node: fx.Node, weight_index: int, bias_index: int | None) -> Bound | None:
        """RMSNorm: |w_i x_i / rms(x)| <= sqrt(d) max|w|. LayerNorm: the same for the centred row
        (its deviations from the mean), plus max|b|."""
        args = list(node.args) + [None] * 5
        named = {"normalized_shape": args[1], "weight": args[weight_index]}
        if bias_index is not None:
            named["bias"] = args[bias_index]
        named.update({k: v for k, v in node.kwargs.items() if k in named})
        size = _normalized_size(named["normalized_shape"])
        if size is None:
            return None
        bound: Bound | None = math.sqrt(size)
        if named["weight"] is not None:
            bound = self._product([bound, self._operand(named["weight"])])
        if named.get("bias") is not None:
            bound = self._sum([bound, self._operand(named["bias"])])
        return bound

    def _filled_buffer(self, node: fx.Node) -> Bound | None:
        """``out = empty_like(x); out[...] = a; out[...] = b``: the largest of what is written.
        Trusts the model to write every element it then reads; any other write gives no bound."""
        writes = _written_in_place(node)
        if not writes or any(w.target is not operator.setitem or w.args[0] is not node for w in writes):
            return None
        return self._maximum([self._operand(w.args[2]) for w in writes])

    def _measured(self, node: fx.Node) -> Bound | None:
        numel = _numel(node)
        if numel is None or numel > self.max_measured_numel:
            return None
        with self.graph.inserting_before(self.anchor):
            return self.graph.call_function(ops.abs_max, (node,))

    def _combine(self, bounds, fold_numbers, tensor_op, tensor_number_op) -> Bound | None:
        if any(b is None for b in bounds):
            return None
        numbers = [b for b in bounds if not isinstance(b, fx.Node)]
        nodes = [b for b in bounds if isinstance(b, fx.Node)]
        number = functools.reduce(fold_numbers, numbers) if numbers else None
        if not nodes:
            return number
        with self.graph.inserting_before(self.anchor):
            combined = functools.reduce(lambda a, b: self.graph.call_function(tensor_op, (a, b)), nodes)
            if number is not None:
                combined = self.graph.call_function(tensor_number_op, (combined, number))
        return combined

    def _product(self, bounds):
        return self._combine(bounds, operator.mul, torch.mul, torch.mul)

    def _sum(self, bounds):
        return self._combine(bounds, operator.add, torch.add, torch.add)

    def _maximum(self, bounds):
        return self._combine(bounds, max, torch.maximum, torch.clamp_min)
