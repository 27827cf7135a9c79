"""The FP8 passes on a traced tiny FLUX, as the backend runs them (before Inductor)."""

import torch

import fp8_compile
from fp8_compile import Decision, ops
from fp8_compile.backend import FP8_PASSES
from fp8_compile.config import Fp8Config
from fp8_compile.passes import Fp8Graph, Lowering, MatchLinearLayers

from conftest import build


def traced_after_passes(model, inputs, config=Fp8Config(), lowering=Lowering.W8A8):
    graphs = []

    def passes_only(gm, example_inputs):
        graph = Fp8Graph(gm, list(example_inputs), config, torch.device("cpu"), lowering)
        MatchLinearLayers()(graph)
        FP8_PASSES(graph)
        graphs.append(graph)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=passes_only, fullgraph=True)(**inputs)
    (graph,) = graphs
    return graph


def count(graph, target):
    return sum(node.target is target for node in graph.gm.graph.nodes)


def test_flux_graph_after_the_passes():
    model, inputs = build("flux")
    report = fp8_compile.quantize_(model)
    graph = traced_after_passes(model, inputs)
    n_fp8 = len(report.by_decision(Decision.FP8))
    assert count(graph, ops.fp8_matmul) == n_fp8  # every FP8 layer is a scaled-mm node
    assert count(graph, ops.weight_only_linear) == len(report.by_decision(Decision.WEIGHT_ONLY))
    # the 4 double-block MLPs (GELU) and the 2 single blocks (cat + GELU) quantize in one pass
    assert count(graph, ops.quantize_rows) == 6
    # to_q/to_k/to_v (with proj_mlp in single blocks) share one quantization of their input:
    # per double block 2 streams x (qkv, out, mlp in, mlp out) = 8, per single block 2, plus
    # x_embedder, context_embedder and proj_out: 2*8 + 2*2 + 3 = 23 for 37 FP8 layers
    assert n_fp8 == 37
    assert count(graph, ops.quantize_activation) + count(graph, ops.quantize_rows) == 23


def test_weight_only_lowering_turns_every_layer_weight_only():
    model, inputs = build("flux")
    report = fp8_compile.quantize_(model)
    graph = traced_after_passes(model, inputs, lowering=Lowering.WEIGHT_ONLY)
    assert count(graph, ops.fp8_matmul) == 0
    assert count(graph, ops.weight_only_linear) == report.num_quantized
