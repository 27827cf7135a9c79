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
that compute the bound as a float32 scalar at run time, reducing only tensors much smaller than
Q (norm weights, rotary tables): the weights may change between calls (a LoRA, a new
checkpoint), so nothing is folded at compile time. Where a path leads to anything else (a linear
layer's output, an unknown op, a dtype reinterpreted) there is no bound, and the caller measures
the amax as before. A bound too small would silently clip values, so every rule errs the other
way: a graph that writes into any tensor in place before the attention call gets no bound at all
(a write through an alias is not always visible in the graph), except for buffers made by
``empty_like`` and filled by indexed assignment, as Wan's rotary embedding does.
"""

from __future__ import annotations

import functools
import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from fp8_compile import ops
from fp8_compile.passes.graph import (
    MUL_TARGETS,
    RMS_NORM_ARGUMENTS,
    RMS_NORMS,
    example_value,
    named_arguments,
    written_by,
)
from fp8_compile.passes.real_rotary import rotate_pairs

# A bound: a Python number, or a node computing a float32 scalar tensor.
Bound = float | fx.Node

# Operations that move, copy, cast or regroup elements: no element grows, as long as the result
# is a floating-point tensor of the same kind (checked: a view as another dtype reinterprets
# bits, a cast to an integer wraps). A cast to a narrower float may round up by half a step; the
# FP8 quantization saturates at 448 there.
_SAME_MAGNITUDE_METHODS = {
    "view", "reshape", "unflatten", "flatten", "permute", "transpose", "contiguous", "clone", "to",
    "float", "bfloat16", "half", "type_as", "unsqueeze", "squeeze", "expand", "repeat_interleave",
    "unbind", "chunk", "split", "neg", "flip",
}  # fmt: skip
_SAME_MAGNITUDE_FUNCTIONS = {
    operator.getitem, operator.neg, torch.neg, torch.permute, torch.transpose, torch.reshape,
    torch.flatten, torch.unsqueeze, torch.squeeze, torch.unbind, torch.chunk, torch.split, torch.flip,
}  # fmt: skip
_CASTS = {"to", "float", "bfloat16", "half", "type_as"}
_BOUNDED_BY_ONE = {"cos", "sin", torch.cos, torch.sin}
_ADD_TARGETS = (operator.add, torch.add, operator.sub, torch.sub)
_LAYER_NORMS = (F.layer_norm, torch.layer_norm)


def _tensor(node) -> torch.Tensor | None:
    value = example_value(node)
    return value if isinstance(value, torch.Tensor) else None


def _floating(node) -> bool:
    """A real floating-point tensor (a bound holds for nothing else)."""
    value = _tensor(node)
    return value is not None and value.dtype.is_floating_point


def _kind(value) -> str | None:
    """"real" or "complex" for a floating-point tensor (a bound on a complex one bounds the
    modulus); None for anything else."""
    if not isinstance(value, torch.Tensor):
        return None
    return "real" if value.dtype.is_floating_point else "complex" if value.is_complex() else None


def _keeps_values(node: fx.Node) -> bool:
    """Whether a same-magnitude op's results hold its input's values: floats of the input's kind
    (real or complex), and for ``view`` the same dtype (``view(dtype)`` reinterprets the bits)."""
    source = node.args[0] if node.args else None
    if node.target is operator.getitem and isinstance(example_value(source), (tuple, list)):
        return _kind(example_value(node)) is not None  # an element of split / chunk / unbind, checked there
    results = example_value(node)
    results = list(results) if isinstance(results, (tuple, list)) else [results]
    kind = _kind(example_value(source))
    if kind is None or any(_kind(r) != kind for r in results):
        return False
    return node.target != "view" or all(r.dtype == example_value(source).dtype for r in results)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _strip_float_casts(node):
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target in _CASTS and _keeps_values(node):
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
    if node.kwargs or len(node.args) != 2:
        return None
    for x, rsqrt in (node.args, reversed(node.args)):
        if not (isinstance(rsqrt, fx.Node) and rsqrt.target is torch.rsqrt and isinstance(x, fx.Node)):
            continue
        total = rsqrt.args[0] if len(rsqrt.args) == 1 and not rsqrt.kwargs else None
        if not (isinstance(total, fx.Node) and total.target in (operator.add, torch.add)):
            continue
        if total.kwargs or len(total.args) != 2:
            continue
        mean, eps = total.args if isinstance(total.args[0], fx.Node) else reversed(total.args)
        if not (_number(eps) and eps >= 0 and isinstance(mean, fx.Node)):
            continue
        if mean.target not in ("mean", torch.mean) or mean.kwargs != {"keepdim": True}:
            continue
        if mean.args[1:] not in ((-1,), ([-1],), ((-1,),)):
            continue
        square = mean.args[0]
        if not (isinstance(square, fx.Node) and square.target in ("pow", torch.pow) and square.args[1:] == (2,)):
            continue
        if _strip_float_casts(square.args[0]) is _strip_float_casts(x) and _floating(x):
            return _tensor(x).shape[-1]
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
        # the writes the anchor sees: those before it; only indexed assignments into buffers
        # made by empty_like are understood, any other write turns the bounds off
        self._fills: dict[fx.Node, list[fx.Node]] = {}
        self._enabled = True
        for node in graph.nodes:
            if node is anchor:
                break
            target = written_by(node)
            if target is None:
                continue
            if node.target is operator.setitem and target.target is torch.empty_like:
                self._fills.setdefault(target, []).append(node)
            else:
                self._enabled = False

    def __call__(self, node: fx.Node) -> Bound | None:
        if not self._enabled:
            return None
        if node not in self._bounds:
            self._bounds[node] = self._bound(node)
        return self._bounds[node]

    def _operand(self, value) -> Bound | None:
        if _number(value):
            return float(abs(value))
        return self(value) if isinstance(value, fx.Node) else None

    def _bound(self, node: fx.Node) -> Bound | None:
        target, args = node.target, node.args
        if node.op not in ("call_method", "call_function") or not args:
            return self._measured(node)
        if target in _BOUNDED_BY_ONE:
            return 1.0 if _floating(node) else None
        if target in _SAME_MAGNITUDE_METHODS or target in _SAME_MAGNITUDE_FUNCTIONS:
            return self._operand(args[0]) if _keeps_values(node) else None
        if target in (torch.cat, torch.stack) and isinstance(args[0], (list, tuple)):
            return self._maximum([self._operand(a) for a in args[0]])
        if target in RMS_NORMS:
            return self._normalized(node, RMS_NORM_ARGUMENTS)
        if target in _LAYER_NORMS:
            return self._normalized(node, ("input", "normalized_shape", "weight", "bias", "eps"))
        if target is rotate_pairs:  # |a cos - b sin| <= sqrt(a^2 + b^2) |freqs|
            return self._product([math.sqrt(2.0), self._operand(args[0]), self._operand(args[1])])
        if target in MUL_TARGETS and len(args) == 2 and not node.kwargs:
            rms_size = _divided_by_rms(node)
            if rms_size is not None:
                return math.sqrt(rms_size)
            return self._product([self._operand(a) for a in args])
        if target in _ADD_TARGETS and len(args) == 2 and not node.kwargs:
            return self._sum([self._operand(a) for a in args])
        if target in (operator.truediv, torch.div) and len(args) == 2 and not node.kwargs:
            divisor = args[1]
            return self._product([self._operand(args[0]), 1.0 / abs(divisor)]) if _number(divisor) and divisor else None
        if target is torch.empty_like:
            return self._filled_buffer(node)
        return self._measured(node)

    def _normalized(self, node: fx.Node, names: tuple[str, ...]) -> Bound | None:
        """RMSNorm: |w_i x_i / rms(x)| <= sqrt(d) max|w|. LayerNorm: the same for the centred row
        (its deviations from the mean), plus max|b|. Only with eps >= 0 (a negative eps shrinks
        the denominator)."""
        named = named_arguments(node, names)
        size = _normalized_size(named.get("normalized_shape"))
        eps = named.get("eps")
        if size is None or not (eps is None or (_number(eps) and eps >= 0)):
            return None
        bound: Bound | None = math.sqrt(size)
        if named.get("weight") is not None:
            bound = self._product([bound, self._operand(named["weight"])])
        if named.get("bias") is not None:
            bound = self._sum([bound, self._operand(named["bias"])])
        return bound

    def _filled_buffer(self, node: fx.Node) -> Bound | None:
        """``out = empty_like(x); out[...] = a; out[...] = b`` before the anchor: the largest of
        what was written. Trusts the model to write every element it then reads."""
        writes = self._fills.get(node)
        return self._maximum([self._operand(w.args[2]) for w in writes]) if writes else None

    def _measured(self, node: fx.Node) -> Bound | None:
        value = _tensor(node)
        if value is None or not (value.dtype.is_floating_point or value.is_complex()):
            return None
        if not 0 < value.numel() <= self.max_measured_numel:
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
