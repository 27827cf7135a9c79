"""fp8_compile: the ``omni_fp8`` torch.compile backend for diffusion transformers in FP8.

    model = torch.compile(model, backend="omni_fp8", options={"ignored_layers": ["img_mlp"]})

The backend is registered through the ``torch_dynamo_backends`` entry point, so no import is
needed for that line; import this package for the explicit API below.
"""

import logging

from fp8_compile.config import DEFAULT_CONDITIONING_LAYERS, Fp8Config
from fp8_compile.convert import quantize_
from fp8_compile.cudagraphs import mark_cudagraph_steps
from fp8_compile.modules import ScaledLinear
from fp8_compile.omni import Omni, OmniDiffusionSamplingParams
from fp8_compile.regions import compile_regions
from fp8_compile.report import Decision, LayerReport, QuantizationReport, quantization_report

logging.getLogger("fp8_compile").addHandler(logging.NullHandler())


def __getattr__(name: str):
    # fp8_compile.validate(...) is imported on first use: the validation tools load diffusers'
    # schedulers and hooks, seconds that the backend (which imports this package) never needs.
    if name == "validate":
        from fp8_compile.validation import validate

        return validate
    raise AttributeError(f"module 'fp8_compile' has no attribute {name!r}")

__all__ = [
    "DEFAULT_CONDITIONING_LAYERS",
    "Decision",
    "Fp8Config",
    "LayerReport",
    "Omni",
    "OmniDiffusionSamplingParams",
    "QuantizationReport",
    "ScaledLinear",
    "compile_regions",
    "mark_cudagraph_steps",
    "quantization_report",
    "quantize_",
    "validate",
]
__version__ = "0.1.0"
