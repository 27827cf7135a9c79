"""Fuse: layers that read the same quantized activation run as one GEMM.

After ShareActivationQuantization, attention's to_q / to_k / to_v (and FLUX's single-block
proj_mlp beside them) read one FP8 activation but still run a GEMM each. This pass replaces the
``fp8_matmul`` nodes of such siblings by one ``packed_fp8_matmul`` over their weights stacked by
rows, and gives each layer its block of the output's columns (a view, no copy):

    y = packed_fp8_matmul(x_fp8, x_scale, [w_q, w_k, w_v], [s_q, s_k, s_v], [b_q, b_k, b_v])
    q, k, v = y[:, :N_q], y[:, N_q:N_q + N_k], y[:, N_q + N_k:]

One wide GEMM keeps the tensor cores busier than three narrow ones (N = 3072 GEMMs are the least
efficient of a FLUX forward) and saves two launches, and two cuBLASLt workspace memsets, per
group. The weights are not copied: once the graph is compiled, the backend lays the layers'
tensors out as blocks of one storage (``ops.packed_rows``), which the op reads as one tensor
(it checks the layout at every call, and lays the tensors out again if they were moved or
replaced); the modules, their names, their tensors' values and their checkpoints stay as they were.
Per-tensor layers keep their own GEMMs: one GEMM takes one weight scale per tensor.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor

from fp8_compile import ops
from fp8_compile.passes.graph import Fp8Graph, example_value
from fp8_compile.passes.pass_manager import GraphPass


def _gemms_reading(quantize: fx.Node) -> list[fx.Node]:
    """The ``fp8_matmul`` nodes whose activation and scale are the two outputs of ``quantize``
    (each through a ``getitem`` of its own, as ShareActivationQuantization leaves them)."""

    def output(node: object, index: int) -> bool:
        return isinstance(node, fx.Node) and node.target is operator.getitem and node.args == (quantize, index)

    return [
        gemm
        for x_fp8 in quantize.users
        if output(x_fp8, 0)
        for gemm in x_fp8.users
        if gemm.target is ops.fp8_matmul and gemm.args[0] is x_fp8 and output(gemm.args[1], 1)
    ]


def _signature(gemm: fx.Node) -> tuple | None:
    """What must agree for two GEMMs to run as one; None for a GEMM that cannot be packed."""
    _, _, weight, weight_scale, bias, out_dtype, fast_accum = gemm.args
    w, s = example_value(weight), example_value(weight_scale)
    if weight.op != "placeholder" or weight_scale.op != "placeholder" or w is None or s is None:
        return None  # packing re-points module tensors: only graph inputs qualify
    if s.dim() != 2 or s.shape[0] != w.shape[0]:
        return None  # a per-tensor weight scale
    b = example_value(bias)
    if bias is not None and (bias.op != "placeholder" or b is None):
        return None
    return (w.dtype, s.dtype, None if b is None else b.dtype, out_dtype, fast_accum)


class FuseSiblingGemms(GraphPass):
    def __call__(self, graph: Fp8Graph) -> None:
        g = graph.gm.graph
        order = {node: i for i, node in enumerate(g.nodes)}  # packing order = graph order: stable
        values = graph.placeholder_values()
        for quantize in [n for n in g.nodes if n.op == "call_function" and n.target is ops.quantize_activation]:
            groups: dict[tuple, list[fx.Node]] = {}
            for gemm in sorted(_gemms_reading(quantize), key=order.__getitem__):
                signature = _signature(gemm)
                if signature is not None:
                    groups.setdefault(signature, []).append(gemm)
            for gemms in groups.values():
                weights = [gemm.args[2] for gemm in gemms]
                if len(gemms) > 1 and len(set(weights)) == len(weights):
                    self.record_layout(graph, values, gemms)
                    self.fuse(g, gemms)

    @staticmethod
    def record_layout(graph: Fp8Graph, values: dict[fx.Node, object], gemms: list[fx.Node]) -> None:
        """Ask for the layers' tensors to be laid out as the packed GEMM reads them once the graph
        is compiled, so that no call allocates for it (the first may run inside a CUDA-graph
        warm-up, whose memory pool must not come to hold weights)."""
        for i in (2, 3, 4):
            tensors = [values.get(gemm.args[i]) for gemm in gemms]
            if all(isinstance(t, torch.Tensor) and not isinstance(t, FakeTensor) for t in tensors):
                graph.packed_tensors.append(tensors)

    @staticmethod
    def fuse(g: fx.Graph, gemms: list[fx.Node]) -> None:
        x_fp8, x_scale, _, _, bias, out_dtype, fast_accum = gemms[0].args
        weights, scales, biases = ([gemm.args[i] for gemm in gemms] for i in (2, 3, 4))
        with g.inserting_before(gemms[0]):
            packed = g.call_function(
                torch.ops.fp8_compile.packed_fp8_matmul.default,
                (x_fp8, x_scale, weights, scales, [] if bias is None else biases, out_dtype, fast_accum),
            )
            start, columns = 0, []
            for weight in weights:
                width = example_value(weight).shape[0]
                columns.append(g.call_function(torch.narrow, (packed, 1, start, width)))
                start += width
        for gemm, block in zip(gemms, columns):
            gemm.replace_all_uses_with(block)
            g.erase_node(gemm)
