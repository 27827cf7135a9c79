"""The graph passes of omni_fp8, one transformation per module (installed as ``fp8_compile.passes``).

The backend applies them in this order: match -> (lower to weight-only where the device has no
FP8 GEMM) -> rotary embeddings in real arithmetic -> quantize linears -> quantize attention (option
``fp8_attention``) -> fuse the queries' and keys' norm, rotation and cast -> lower block-scaled
layers -> share activation quantization -> one GEMM for the layers that read the same activation
-> fuse activation functions into the quantization -> feed FP8 attention outputs to the layers
after them -> lower weight-only layers -> their input's SiLU into their kernel; Inductor then
fuses the remaining element-wise work into its kernels and generates them.
"""

from fp8_compile.passes.feed_fp8_attention_output import FeedFp8AttentionOutput
from fp8_compile.passes.fuse_activation_quantization import FuseActivationQuantization
from fp8_compile.passes.fuse_norm_rotary_quantization import FuseNormRotaryQuantization
from fp8_compile.passes.fuse_sibling_gemms import FuseSiblingGemms
from fp8_compile.passes.fuse_silu_into_weight_only import FuseSiluIntoWeightOnly
from fp8_compile.passes.graph import (
    LINEAR_TARGETS,
    Fp8Graph,
    LayerKind,
    LinearLayer,
    Lowering,
    example_value,
    linear_args,
    source_module_path,
)
from fp8_compile.passes.lower_blockwise import LowerBlockScaledLinear
from fp8_compile.passes.lower_weight_only import LowerWeightOnly, UseWeightOnlyWithoutFp8Gemm
from fp8_compile.passes.match_layers import MatchLinearLayers
from fp8_compile.passes.pass_manager import GraphPass, PassManager
from fp8_compile.passes.quantize_attention import QuantizeAttention
from fp8_compile.passes.quantize_linear import QuantizeLinear
from fp8_compile.passes.real_rotary import RealRotaryEmbedding
from fp8_compile.passes.share_activation_quantization import ShareActivationQuantization

__all__ = [
    "FeedFp8AttentionOutput",
    "FuseActivationQuantization",
    "FuseNormRotaryQuantization",
    "FuseSiblingGemms",
    "FuseSiluIntoWeightOnly",
    "LINEAR_TARGETS",
    "Fp8Graph",
    "GraphPass",
    "LayerKind",
    "LinearLayer",
    "LowerBlockScaledLinear",
    "LowerWeightOnly",
    "Lowering",
    "MatchLinearLayers",
    "PassManager",
    "QuantizeAttention",
    "QuantizeLinear",
    "RealRotaryEmbedding",
    "ShareActivationQuantization",
    "UseWeightOnlyWithoutFp8Gemm",
    "example_value",
    "linear_args",
    "source_module_path",
]
