"""The traced graph as the passes see it, and helpers to read its linear nodes."""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from enum import Enum

import torch
import torch.fx as fx
import torch.nn.functional as F

from fp8_compile.config import Fp8Config

# How a linear layer appears in a graph that Dynamo traced.
LINEAR_TARGETS = (torch._C._nn.linear, F.linear)
MUL_TARGETS = (operator.mul, torch.mul)
RMS_NORMS = (F.rms_norm, torch.rms_norm)
# their arguments in order, as named_arguments reads them
RMS_NORM_ARGUMENTS = ("input", "normalized_shape", "weight", "eps")
SCALED_LINEAR = torch.ops.fp8_compile.scaled_linear.default
WEIGHT_ONLY_LINEAR = torch.ops.fp8_compile.weight_only_scaled_linear.default


class Lowering(str, Enum):
    """How FP8 layers run on the compiling device (chosen from its capability)."""

    W8A8 = "w8a8"  # FP8 x FP8 GEMM: SM89 and newer, and the CPU reference
    WEIGHT_ONLY = "weight_only"  # FP8 weights dequantized inside a BF16 GEMM: SM80-SM88


class LayerKind(str, Enum):
    BF16 = "bf16"  # a plain linear on a floating-point parameter
    FP8 = "fp8"  # fp8_compile::scaled_linear
    WEIGHT_ONLY = "weight_only"  # fp8_compile::weight_only_scaled_linear


@dataclass
class LinearLayer:
    """One linear node of the graph whose weight is a tensor of the compiled module (a parameter,
    or the FP8 buffer that replaced it)."""

    node: fx.Node
    name: str  # qualified module name relative to the compiled module, e.g. "attn.to_q"
    kind: LayerKind
    weight: torch.Tensor  # the weight, as passed to the graph


@dataclass
class Fp8Graph:
    """A Dynamo graph with its example inputs and what the passes learnt about it."""

    gm: fx.GraphModule
    example_inputs: list
    config: Fp8Config
    device: torch.device
    lowering: Lowering
    layers: list[LinearLayer] = field(default_factory=list)
    # Module tensors that fused GEMMs read as one: laid out back to back once the graph is
    # compiled (before, AOTAutograd would find them moved from where Dynamo saw them).
    packed_tensors: list[list[torch.Tensor]] = field(default_factory=list)

    def placeholder_values(self) -> dict[fx.Node, object]:
        """The example input bound to each placeholder node."""
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        return dict(zip(placeholders, self.example_inputs))


def named_arguments(node: fx.Node, names: tuple[str, ...]) -> dict:
    """A call's arguments by name, however they were spelled (positionally or as keywords)."""
    return {**dict(zip(names, node.args)), **node.kwargs}


def example_value(value: object) -> object:
    """The value Dynamo recorded for a node (a fake tensor, usually); None for a non-node."""
    return value.meta.get("example_value") if isinstance(value, fx.Node) else None


# Python's augmented assignments (q *= s) on tensors write in place
IN_PLACE_OPERATORS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
    operator.setitem,
}  # fmt: skip


def written_by(node: fx.Node) -> fx.Node | None:
    """The tensor ``node`` writes into: the first argument of an in-place method or function
    (``x.mul_(2)``, ``x[i] = y``, ``x *= 2``, ``F.relu(x, inplace=True)``) or its ``out=``
    argument; None when it writes into nothing."""
    if isinstance(node.kwargs.get("out"), fx.Node):
        return node.kwargs["out"]
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    in_place = (
        node.target in IN_PLACE_OPERATORS
        or node.kwargs.get("inplace") is True
        or (isinstance(name, str) and name.endswith("_") and not name.startswith("__"))
    )
    return node.args[0] if in_place and node.args and isinstance(node.args[0], fx.Node) else None


def linear_args(args: tuple, kwargs: dict) -> tuple:
    """(input, weight, bias) of a ``linear`` call however its arguments were spelled."""
    names = ("input", "weight", "bias")
    values = list(args) + [kwargs.get(n) for n in names[len(args) :]]
    return values[0], values[1], values[2] if len(values) > 2 else None


_SOURCE_PART = re.compile(r"""\.([A-Za-z_]\w*)|\[['"]([^'"]+)['"]\]|\[(\d+)\]""")


def source_module_path(placeholder: fx.Node) -> str | None:
    """The module path of a parameter placeholder, from the source Dynamo recorded for it.

    ``L['self']._modules['attn']._modules['to_q']._parameters['weight']`` gives ``attn.to_q``.
    """
    grapharg = placeholder.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return None
    name = source.name() if callable(source.name) else source.name
    head = re.match(r"^\w+\[['\"][^'\"]+['\"]\]", name)
    if head is None:
        return None
    parts = [a or b or c for a, b, c in _SOURCE_PART.findall(name[head.end() :])]
    parts = [p for p in parts if p not in ("__dict__", "_modules", "_parameters", "_buffers")]
    return ".".join(parts[:-1])  # drop the tensor's own name ("weight")
