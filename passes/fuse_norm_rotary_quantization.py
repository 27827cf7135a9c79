"""Fuse: a query's or key's RMSNorm, rotary embedding and FP8 cast in one kernel (option ``fp8_attention``).

Once Q and K are scaled from their norm's bound (``QuantizeAttention``), what is left before the
FP8 attention is element-wise work along each head's row: normalize, rotate channel pairs, cast.
Inductor writes it as a looped reduction that gathers each pair's partner from memory, and in
FLUX's double blocks as three kernels per operand around the text/image concatenation (the q/k
kernels took ~3.6 + ~2.6 ms of a FLUX.1-dev forward on an H100, against ~1.4 for their bytes).
This pass matches, on the query and key of each FP8 attention call, diffusers' real-table form

    apply_rotary_emb(rms_norm(x), (cos, sin))                              FLUX.1 / FLUX.2 single blocks
    apply_rotary_emb(cat([rms_norm(text), rms_norm(image)], dim=1), ...)    their double blocks

(``torch.nn.RMSNorm`` over the head dim, ``use_real_unbind_dim=-1``, tables [S, D]) and replaces
it by :func:`fp8_compile.attention.rms_norm_rotary_fp8`: one kernel that writes the FP8 operand and
its scale. Where the tables are inputs (FLUX computes them once, outside the blocks), their bound
max|cos| + max|sin| comes from one small kernel per graph, ``rotary_table_maxima``, whose partial
maxima the fused kernels finish reducing (Inductor made three kernels of it in every block).
Other forms are left to Inductor, as they were.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx

from fp8_compile import attention, ops
from fp8_compile.passes.graph import (
    MUL_TARGETS,
    RMS_NORM_ARGUMENTS,
    RMS_NORMS,
    Fp8Graph,
    example_value,
    named_arguments,
)
from fp8_compile.passes.magnitude_bound import MagnitudeBound
from fp8_compile.passes.pass_manager import GraphPass
from fp8_compile.passes.quantize_attention import MEASURED_FRACTION

logger = logging.getLogger("fp8_compile")

_NEG = (operator.neg, torch.neg, "neg")
_ADD = (operator.add, torch.add)
# layout-only steps between the rotary embedding and the attention call (diffusers' native
# backend permutes [B, S, H, D] to [B, H, S, D])
_LAYOUTS = {"permute", "transpose"}


def _arg(node: fx.Node, index: int, name: str, default=None):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _call(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and node.target in targets


def _shape(node) -> tuple | None:
    value = example_value(node)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _as_float(node) -> fx.Node | None:
    """x for ``x.float()`` / ``x.to(torch.float32)``."""
    if _call(node, "float") and len(node.args) == 1 and not node.kwargs:
        return node.args[0]
    if _call(node, "to") and node.args[1:] == (torch.float32,) and not node.kwargs:
        return node.args[0]
    return None


def _rotated_pairs(node) -> fx.Node | None:
    """x for ``stack([-x_odd, x_even], dim=-1).flatten(3)``, x_even, x_odd = x.reshape(..., -1, 2).unbind(-1)."""
    if not (_call(node, "flatten") and len(node.args) == 2 and node.args[1] in (3, -2) and not node.kwargs):
        return None
    stack = node.args[0]
    if not (_call(stack, torch.stack) and _arg(stack, 1, "dim") == -1 and len(stack.args[0]) == 2):
        return None
    negated, even = stack.args[0]
    if not (_call(negated, *_NEG) and len(negated.args) == 1):
        return None
    odd = negated.args[0]
    if not (_call(even, operator.getitem) and _call(odd, operator.getitem)):
        return None
    unbind = even.args[0]
    if odd.args[0] is not unbind or (even.args[1], odd.args[1]) != (0, 1):
        return None
    if not (_call(unbind, "unbind", torch.unbind) and _arg(unbind, 1, "dim", 0) == -1):
        return None
    reshape = unbind.args[0]
    if not (_call(reshape, "reshape") and reshape.args):
        return None
    x = reshape.args[0]
    shape = _shape(x)
    if shape is None or _shape(reshape) != (*shape[:-1], shape[-1] // 2, 2):
        return None
    return x


def _rms_norm_part(node, head_dim: int) -> tuple[fx.Node, fx.Node | None, float] | None:
    """(input, weight, eps) of ``rms_norm(input, (head_dim,), weight, eps)`` on a 4-D input."""
    if not _call(node, *RMS_NORMS):
        return None
    named = named_arguments(node, RMS_NORM_ARGUMENTS)
    if named.get("normalized_shape") not in (head_dim, (head_dim,), [head_dim]):
        return None
    x, weight, eps = named["input"], named.get("weight"), named.get("eps")
    value = example_value(x)
    if not (isinstance(value, torch.Tensor) and value.dim() == 4 and value.dtype.is_floating_point):
        return None
    if eps is None:  # torch's default: the eps of the float type it computes in (float32 for half types)
        eps = torch.finfo(torch.promote_types(value.dtype, torch.float32)).eps
    if not isinstance(eps, (int, float)) or eps < 0:
        return None
    return x, weight, float(eps)


def _normalized_parts(node, head_dim: int) -> list | None:
    """The (input, weight, eps) of ``rms_norm(x)`` or of ``cat([rms_norm(a), rms_norm(b)], dim=1)``."""
    part = _rms_norm_part(node, head_dim)
    if part is not None:
        return [part]
    if _call(node, torch.cat, torch.concat) and _arg(node, 1, "dim", 0) == 1 and len(node.args[0]) == 2:
        parts = [_rms_norm_part(p, head_dim) for p in node.args[0]]
        if None in parts or (parts[0][1] is None) != (parts[1][1] is None):
            return None  # the kernel takes a norm weight for both parts or for neither
        return parts
    return None


def match_rotary_norm(node) -> tuple[list, fx.Node, fx.Node] | None:
    """(normalized parts, cos, sin) when ``node`` is ``(x.float() * cos + rotated(x).float() * sin).to(dtype)``
    with x an RMSNorm (or two along the tokens) and [1, S, 1, D] tables."""
    if not (_call(node, "to") and len(node.args) == 2 and not node.kwargs):
        return None
    total = node.args[0]
    if not (_call(total, *_ADD) and len(total.args) == 2 and not total.kwargs):
        return None
    for direct, rotated in (total.args, total.args[::-1]):
        if not (_call(direct, *MUL_TARGETS) and _call(rotated, *MUL_TARGETS)):
            continue
        for x_float, cos in (direct.args, direct.args[::-1]):
            for rotated_float, sin in (rotated.args, rotated.args[::-1]):
                x = _as_float(x_float)
                if x is None or _rotated_pairs(_as_float(rotated_float)) is not x:
                    continue
                shape = _shape(x)
                if shape is None or len(shape) != 4:
                    continue
                table = (1, shape[1], 1, shape[3])
                if _shape(cos) != table or _shape(sin) != table:
                    continue
                parts = _normalized_parts(x, shape[3])
                if parts is not None:
                    return parts, cos, sin
    return None


def _measured_tables(bounds: list) -> tuple[fx.Node, fx.Node] | None:
    """The tensors whose amaxes bound the cos and sin tables (the tables themselves or the inputs
    they are views of), where both are measured and of one shape: rotary_table_maxima's input."""
    measured = [b.args[0] if isinstance(b, fx.Node) and b.target is ops.abs_max else None for b in bounds]
    shapes = {_shape(m) for m in measured}
    if None in measured or len(shapes) != 1 or len(shapes.pop()) == 0:
        return None
    return measured[0], measured[1]


class FuseNormRotaryQuantization(GraphPass):
    def __call__(self, graph: Fp8Graph) -> None:
        fx_graph = graph.gm.graph
        calls = [n for n in fx_graph.nodes if n.op == "call_function" and n.target is attention.fp8_attention]
        fused = 0
        # the tables' maxima, once per pair of tables (the query's and the key's, every block's of a graph)
        table_maxima: dict[tuple[fx.Node, fx.Node], fx.Node] = {}
        for call in calls:
            query, key = call.args[0], call.args[1]
            smallest = min(example_value(query).numel(), example_value(key).numel())
            bound = MagnitudeBound(fx_graph, call, max_measured_numel=smallest // MEASURED_FRACTION)
            for index, name in ((0, "query"), (1, "key")):
                # operands with no bound measure their amax (a graph that writes in place, say)
                if call.args[4 + index] is not None and self._fuse(fx_graph, call, index, name, bound, table_maxima):
                    fused += 1
        if calls:
            logger.info(
                "omni_fp8: %d of %d FP8 attention queries and keys normalized, rotated and cast in one kernel",
                fused,
                2 * len(calls),
            )

    def _fuse(
        self, fx_graph: fx.Graph, call: fx.Node, index: int, name: str, bound: MagnitudeBound, table_maxima: dict
    ) -> bool:
        operand = call.args[index]
        layout = operand if _call(operand, *_LAYOUTS) else None
        matched = match_rotary_norm(layout.args[0] if layout is not None else operand)
        if matched is None:
            return False
        parts, cos, sin = matched
        table_bounds = [bound(cos), bound(sin)]
        if None in table_bounds:
            return False
        with fx_graph.inserting_before(call):
            tables = _measured_tables(table_bounds)
            if tables is not None:
                if tables not in table_maxima:
                    table_maxima[tables] = fx_graph.call_function(attention.rotary_table_maxima, tables)
                rotary_bound = table_maxima[tables]
            elif any(isinstance(b, fx.Node) for b in table_bounds):
                rotary_bound = fx_graph.call_function(torch.add, tuple(table_bounds))
            else:
                rotary_bound = float(sum(table_bounds))
            (first, weight_first, eps_first), (second, weight_second, eps_second) = (parts + [(None, None, 0.0)])[:2]
            fused = fx_graph.call_function(
                attention.rms_norm_rotary_fp8,
                (first, second, weight_first, weight_second, eps_first, eps_second, cos, sin, rotary_bound),
            )
            quantized = fx_graph.call_function(operator.getitem, (fused, 0))
            scale = fx_graph.call_function(operator.getitem, (fused, 1))
            if layout is not None:
                quantized = fx_graph.create_node(layout.op, layout.target, (quantized, *layout.args[1:]), dict(layout.kwargs))
        args = list(call.args)
        args[index], args[4 + index] = quantized, None
        call.args = tuple(args)
        call.kwargs = {**call.kwargs, f"{name}_scale": scale}
        return True
