"""The FP8 passes on a traced tiny FLUX, as the backend runs them (before Inductor)."""

import pytest
import torch

import fp8_compile
from fp8_compile import Decision, ops
from fp8_compile.backend import FP8_PASSES
from fp8_compile.config import Fp8Config
from fp8_compile.passes import Fp8Graph, FuseSiluIntoWeightOnly, Lowering, MatchLinearLayers, PassManager
from fp8_compile.passes.real_rotary import rotate_pairs

from conftest import build, first_output, rel_error


def traced_after_passes(model, inputs, config=Fp8Config(), lowering=Lowering.W8A8, passes=FP8_PASSES):
    graphs = []

    def passes_only(gm, example_inputs):
        graph = Fp8Graph(gm, list(example_inputs), config, torch.device("cpu"), lowering)
        MatchLinearLayers()(graph)
        passes(graph)
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
    packed = torch.ops.fp8_compile.packed_fp8_matmul.default
    # to_q/to_k/to_v (with proj_mlp in single blocks) read one activation and run as one GEMM:
    # 2 per double block (image, text), 1 per single block; the other FP8 layers one GEMM each
    assert count(graph, packed) == 2 * 2 + 2
    assert count(graph, ops.fp8_matmul) == n_fp8 - 2 * 2 * 3 - 2 * 4
    assert count(graph, ops.weight_only_linear) == len(report.by_decision(Decision.WEIGHT_ONLY))
    # the 4 double-block MLPs (GELU) and the 2 single blocks (cat + GELU) quantize in one pass
    assert count(graph, ops.quantize_rows) == 6
    # to_q/to_k/to_v (with proj_mlp in single blocks) share one quantization of their input:
    # per double block 2 streams x (qkv, out, mlp in, mlp out) = 8, per single block 2, plus
    # x_embedder, context_embedder and proj_out: 2*8 + 2*2 + 3 = 23 for 37 FP8 layers
    assert n_fp8 == 37
    assert count(graph, ops.quantize_activation) + count(graph, ops.quantize_rows) == 23
    assert count(graph, ops.fp8_matmul) + count(graph, packed) == 23  # one GEMM per quantization



def test_per_tensor_layers_keep_a_gemm_each():
    """One GEMM takes one weight scale per tensor: per-tensor q/k/v are not fused (their shared
    activation is still quantized once)."""
    model, inputs = build("flux")
    report = fp8_compile.quantize_(model, {"granularity": "per_tensor"})
    graph = traced_after_passes(model, inputs, config=Fp8Config(granularity="per_tensor"))
    assert count(graph, torch.ops.fp8_compile.packed_fp8_matmul.default) == 0
    assert count(graph, ops.fp8_matmul) == len(report.by_decision(Decision.FP8))
    assert graph.packed_tensors == []

def test_weight_only_lowering_turns_every_layer_weight_only():
    model, inputs = build("flux")
    report = fp8_compile.quantize_(model)
    graph = traced_after_passes(model, inputs, lowering=Lowering.WEIGHT_ONLY)
    assert count(graph, ops.fp8_matmul) == 0
    assert count(graph, ops.weight_only_linear) == report.num_quantized


@pytest.mark.parametrize("name, rotations", [("qwen_image", 8), ("z_image", 8)])
def test_complex_rotary_embeddings_become_real_arithmetic(name, rotations):
    """Inductor cannot fuse complex multiplies; the pass writes them on real and imaginary parts.
    The graph then holds no complex product, and computes what the eager model computes (float32:
    FP8 rounding of equal inputs is equal, so 1e-5 is far below one FP8 step)."""
    model, inputs = build(name, dtype=torch.float32)
    fp8_compile.quantize_(model)
    with torch.no_grad():
        expected = first_output(model(**inputs))
    graphs, outputs = [], []

    def passes_only(gm, example_inputs):
        graph = Fp8Graph(gm, list(example_inputs), Fp8Config(), torch.device("cpu"), Lowering.W8A8)
        MatchLinearLayers()(graph)
        FP8_PASSES(graph)
        graphs.append(graph)
        return gm.forward

    with torch.no_grad():
        outputs = first_output(torch.compile(model, backend=passes_only)(**inputs))
    assert sum(count(graph, torch.view_as_complex) for graph in graphs) == 0
    # queries and keys of every attention: Qwen-Image 2 blocks x (image, text), Z-Image 4 attentions
    assert sum(count(graph, rotate_pairs) for graph in graphs) == rotations
    assert rel_error(outputs, expected) < 1e-5


def test_rotate_pairs_is_the_complex_product():
    pairs = torch.randn(2, 5, 3, 8, 2)
    freqs = torch.polar(torch.ones(5, 1, 8), torch.rand(5, 1, 8) * 6.28)
    expected = torch.view_as_real(torch.view_as_complex(pairs) * freqs)
    torch.testing.assert_close(rotate_pairs(pairs, freqs), expected, rtol=1e-6, atol=1e-6)


class BroadcastGateMLP(torch.nn.Module):
    """SwiGLU-like: silu(up(x)) * gate with a gate broadcast over the tokens, then a linear."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(64, 64)
        self.down = torch.nn.Linear(64, 32)

    def forward(self, x, gate):
        return self.down(torch.nn.functional.silu(self.up(x)) * gate)


def test_a_broadcast_gate_is_not_fused_into_the_row_quantization():
    """The fused kernel reads the gate row by row, so it must only take a gate of the product's
    shape; a broadcast one ([2, 1, 64] for [2, 5, 64]) stays an ordinary multiply."""
    torch.manual_seed(0)
    model = BroadcastGateMLP()
    fp8_compile.quantize_(model)
    inputs = {"x": torch.randn(2, 5, 64), "gate": torch.randn(2, 1, 64)}
    graph = traced_after_passes(model, inputs)
    assert count(graph, ops.quantize_rows) == 0 and count(graph, ops.quantize_activation) == 2
    full_gate = {"x": inputs["x"], "gate": inputs["gate"].expand(2, 5, 64).contiguous()}
    assert count(traced_after_passes(model, full_gate), ops.quantize_rows) == 1
    with torch.no_grad():
        expected = model(**inputs)
        compiled = torch.compile(model, backend="omni_fp8")(**inputs)
    assert rel_error(compiled, expected) < 1e-3  # the same FP8 arithmetic, compiled


@pytest.mark.parametrize("name", ["z_image", "flux2_klein"])
def test_swiglu_is_quantized_in_one_pass(name):
    """SwiGLU's silu(w1(x)) * w3(x) (Z-Image) and silu(a) * b of one projection (FLUX.2): each
    feed-forward's down projection reads one fused row quantization (4 in either tiny model).
    Z-Image's gate is an FP8 linear's output, a node the quantize pass makes: it must carry the
    shape the fusion checks (without it Z-Image fused none)."""
    model, inputs = build(name)
    fp8_compile.quantize_(model)
    activations = []

    def passes_only(gm, example_inputs):
        graph = Fp8Graph(gm, list(example_inputs), Fp8Config(), torch.device("cpu"), Lowering.W8A8)
        MatchLinearLayers()(graph)
        FP8_PASSES(graph)
        activations.extend(node.args[3] for node in graph.gm.graph.nodes if node.target is ops.quantize_rows)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=passes_only)(**inputs)
    assert activations == ["silu_mul"] * 4


class InPlaceScale(torch.nn.Module):
    """A linear layer whose output is then scaled in place, the result of ``mul_`` unused."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(64, 64)

    def forward(self, x):
        y = self.proj(x)
        y.mul_(2)
        return y


def test_in_place_operations_survive_the_passes():
    """FX's dead-code elimination counts no method call as a side effect, so it would drop
    ``y.mul_(2)`` (nobody reads its result) and the output would be half what it should be."""
    torch.manual_seed(0)
    model, x = InPlaceScale(), torch.randn(8, 64)
    expected = model(x)
    fp8_compile.quantize_(model)
    graph = traced_after_passes(model, {"x": x})
    with torch.no_grad():
        assert rel_error(graph.gm(*graph.example_inputs)[0], expected) < 0.1


class SiluThenLinear(torch.nn.Module):
    def __init__(self, in_place=False):
        super().__init__()
        self.in_place = in_place
        self.linear = torch.nn.Linear(64, 384)

    def forward(self, temb):
        return self.linear(torch.nn.functional.silu(temb, inplace=self.in_place))


def test_the_modulation_gemvs_compute_their_inputs_silu():
    """FLUX's AdaLN layers (norm1 and norm1_context of 2 double blocks, norm of 2 single blocks)
    and the second layer of its 3 embedders read silu(x): their weight-only GEMMs compute it (9
    of the 13 weight-only layers); the numbers are the graph's without the fusion on the CPU,
    where the op applies torch's silu first. A SiLU written in place is left alone (its input
    is overwritten)."""
    model, inputs = build("flux")
    fp8_compile.quantize_(model)
    graph = traced_after_passes(model, inputs)
    fused = [layer.name for layer in graph.layers if layer.node.kwargs.get("input_silu")]
    assert len(fused) == 9 and sum(".norm1.linear" in n or ".norm.linear" in n for n in fused) == 4
    # one SiLU stays: norm_out casts silu(temb) to the input's dtype before its linear
    assert count(graph, torch.nn.functional.silu) == 1
    unfused = traced_after_passes(model, inputs, passes=PassManager([p for p in FP8_PASSES.passes if not isinstance(p, FuseSiluIntoWeightOnly)]))
    with torch.no_grad():
        assert torch.equal(graph.gm(*graph.example_inputs)[0], unfused.gm(*unfused.example_inputs)[0])
    in_place = SiluThenLinear(in_place=True)
    fp8_compile.quantize_(in_place, {"lowering": "weight_only"})
    graph = traced_after_passes(in_place, {"temb": torch.randn(1, 64)}, lowering=Lowering.WEIGHT_ONLY)
    assert [layer.node.kwargs.get("input_silu", False) for layer in graph.layers] == [False]
