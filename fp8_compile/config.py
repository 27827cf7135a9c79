"""The options a user passes as ``torch.compile(..., backend="omni_fp8", options={...})``.

Every option is validated here, before any weight is touched: unknown keys, wrong types and
unsupported values raise a ``ValueError`` that names the key and the valid choices.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fp8_compile.patterns import LayerPattern

METHODS = ("fp8",)
ACTIVATION_SCHEMES = ("dynamic", "static")
GRANULARITIES = ("per_row", "per_tensor")
LOWERINGS = ("auto", "w8a8", "weight_only")
CONDITIONING_MODES = ("weight_only", "fp8", "bf16")
MISSING_SCALE_MODES = ("error", "dynamic")
TOWER_MODES = ("bf16", "fp8")

# Linears that take one row per sample: AdaLN / modulation projections, timestep, guidance and
# pooled-text embedders, and the final AdaLN. Public FP8 DiT integrations lost quality on exactly
# these layers when their activations were quantized, and they are GEMVs, where quantizing the
# activation buys no speed. They hold ~27% of FLUX.1's weights, so they keep FP8 weights
# (weight-only) by default rather than staying BF16. Matched like ``ignored_layers``.
DEFAULT_CONDITIONING_LAYERS: tuple[str, ...] = (
    "norm1.linear",
    "norm1_context.linear",
    "norm.linear",
    "norm_out.linear",
    "img_mod",
    "txt_mod",
    "adaLN_modulation",
    "double_stream_modulation_img",
    "double_stream_modulation_txt",
    "single_stream_modulation",
    "time_text_embed",
    "time_guidance_embed",
    "time_condition_embed",
    "time_embed",
    "t_embedder",
    "condition_embedder.time_embedder",
    "condition_embedder.time_proj",
)


# Linears whose weight dtype the model code reads to cast their input (Z-Image's timestep
# embedder does ``t.to(self.mlp[0].weight.dtype)``); an FP8 weight there would make it cast the
# input to FP8, so they keep their dtype. T5's and UMT5's feed-forward output projection
# (FLUX.1's and Wan2.2's text encoders) does ``hidden_states.to(self.wo.weight.dtype)``: transformers
# keeps ``wo`` in float32 under fp16 because its input overflows fp16, and those outlier
# activations would cost W8A8 precision too, so BF16 is also the better choice for quality.
DTYPE_READ_LAYERS: tuple[str, ...] = ("t_embedder.mlp.0", "DenseReluDense.wo")

# The vision and audio encoders of multi-stage models (Qwen3-Omni's thinker, Qwen2.5-VL): their
# inputs (pixels, mel frames) have a range the language model's calibration says nothing about,
# and they run once per request, so they stay BF16 unless ``towers="fp8"``.
DEFAULT_TOWER_LAYERS: tuple[str, ...] = ("visual", "audio_tower", "vision_tower", "vision_model")


def did_you_mean(value: str, choices: Sequence[str]) -> str:
    """' (did you mean ...?)' naming the choice closest to a misspelt ``value``, or ''."""
    close = difflib.get_close_matches(value, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _choice(key: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        hint = did_you_mean(value, choices) if isinstance(value, str) else ""
        raise ValueError(f"omni_fp8 option {key!r} must be one of {list(choices)}, got {value!r}{hint}")
    return value


def _patterns(key: str, value: Any) -> tuple[str, ...]:
    # A single string is one pattern, not a sequence of one-letter patterns.
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence) or not all(isinstance(p, str) and p for p in value):
        raise ValueError(
            f"omni_fp8 option {key!r} must be a list of non-empty layer-name patterns "
            f"(strings such as 'img_mlp', '*.to_q' or 're:.*attn\\.to_(q|k)'), got {value!r}"
        )
    for pattern in value:
        try:
            LayerPattern(pattern)  # raises on an invalid regular expression
        except ValueError as error:
            raise ValueError(f"omni_fp8 option {key!r}: {error}") from None
    return tuple(value)


def _positive_number(value: Any) -> bool:
    try:
        return math.isfinite(float(value)) and float(value) > 0
    except (TypeError, ValueError):
        return False


def _activation_scales(value: Any) -> str | dict[str, float] | None:
    """A scales file (checked to exist here, read at conversion) or a {layer: scale} dict."""
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if not os.path.isfile(path):
            raise ValueError(f"omni_fp8 option 'activation_scales': no such file {path!r}")
        return path
    if isinstance(value, Mapping):
        bad = [name for name, scale in value.items() if not _positive_number(scale)]
        if bad:
            raise ValueError(
                f"omni_fp8 option 'activation_scales': scales must be finite and > 0; bad layers: {bad[:5]}"
            )
        return {str(name): float(scale) for name, scale in value.items()}
    raise ValueError(
        "omni_fp8 option 'activation_scales' must be a scales file written by fp8_compile.calibration "
        f"or a dict {{layer name: scale}}, got {type(value).__name__}"
    )


def _block_size(value: Any) -> tuple[int, int] | None:
    # block_k is the K step of the block-scaled GEMM: a power of two, at least the 32 of an FP8 MMA.
    if value is None:
        return None
    if (
        isinstance(value, Sequence)
        and len(value) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) and 32 <= b <= 512 and b & (b - 1) == 0 for b in value)
    ):
        return int(value[0]), int(value[1])
    raise ValueError(
        "omni_fp8 option 'weight_block_size' must be [block_n, block_k], powers of two from 32 to 512 "
        f"(block-FP8 checkpoints use [128, 128]), got {value!r}"
    )


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"omni_fp8 option {key!r} must be True or False, got {value!r}")
    return value


@dataclass(frozen=True)
class Fp8Config:
    """What to quantize and how.

    ``granularity`` is the scaling granularity of both operands: ``"per_row"`` scales each token
    of the activation and each output channel of the weight (the default: lower error than one
    scale per tensor, and as fast on Hopper, see the README), ``"per_tensor"`` uses one scale each.
    ``conditioning`` says how the layers matched by ``conditioning_layers`` are handled:
    ``"weight_only"`` (FP8 weights, BF16 activations), ``"fp8"`` (like every other layer) or
    ``"bf16"`` (left alone). ``fast_accum`` lets the FP8 tensor cores accumulate in reduced
    precision (faster on Hopper; the error it adds is measured in the benchmark).
    ``cudagraphs`` replays each compiled graph as a CUDA graph (Inductor's "reduce-overhead";
    ``torch.compile`` refuses ``mode=`` together with ``options=``, hence this option).
    ``activation_scheme="static"`` takes each FP8 layer's activation scale from
    ``activation_scales`` (a file written by ``fp8_compile.calibration`` or a dict); layers it
    lacks raise, or run with dynamic scales when ``missing_activation_scales="dynamic"``.
    ``weight_block_size=[block_n, block_k]`` scales the weights per block and the activations
    per (1 x block_k) group, as block-FP8 checkpoints do (``granularity`` then does not apply
    to the FP8 layers). ``towers`` says whether the vision/audio encoders matched by
    ``DEFAULT_TOWER_LAYERS`` stay BF16 (the default) or are converted like the rest.
    ``lowering`` forces how FP8 layers run: ``"w8a8"`` (FP8 x FP8 GEMM, SM89+ and the CPU),
    ``"weight_only"`` (FP8 weights dequantized inside a BF16 GEMM, as on SM80) or ``"auto"``
    (chosen from the device's compute capability).
    ``fp8_attention`` also runs attention in FP8 (Q, K, V scaled per tensor, cuDNN's FP8 kernel;
    Hopper or newer, and the CPU reference): faster, with an error of its own, see the README.
    ``strict`` makes an Inductor failure on a graph raise; by default that graph runs its FP8
    operations uncompiled (slower, same numerics) with a warning naming it.
    """

    method: str = "fp8"
    ignored_layers: tuple[str, ...] = ()
    activation_scheme: str = "dynamic"
    weight_block_size: tuple[int, int] | None = None
    granularity: str = "per_row"
    conditioning: str = "weight_only"
    conditioning_layers: tuple[str, ...] = field(default=DEFAULT_CONDITIONING_LAYERS)
    fast_accum: bool = True
    cudagraphs: bool = False
    activation_scales: str | dict[str, float] | None = None
    missing_activation_scales: str = "error"
    towers: str = "bf16"
    strict: bool = False
    lowering: str = "auto"
    fp8_attention: bool = False

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | Fp8Config | None) -> Fp8Config:
        """Build a validated config from the user's ``options`` dict (or pass a config through)."""
        if options is None:
            return cls()
        if isinstance(options, Fp8Config):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(f"omni_fp8 options must be a dict, got {type(options).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in options:
            if key not in valid:
                hint = did_you_mean(key, valid) if isinstance(key, str) else ""
                raise ValueError(f"unknown omni_fp8 option {key!r}{hint}; valid options: {valid}")
        return cls(**options)

    def __post_init__(self) -> None:
        # Normalise and validate in place (the dataclass is frozen, hence object.__setattr__).
        set_ = object.__setattr__
        _choice("method", self.method, METHODS)
        set_(self, "ignored_layers", _patterns("ignored_layers", self.ignored_layers))
        _choice("activation_scheme", self.activation_scheme, ACTIVATION_SCHEMES)
        set_(self, "activation_scales", _activation_scales(self.activation_scales))
        _choice("missing_activation_scales", self.missing_activation_scales, MISSING_SCALE_MODES)
        if (self.activation_scheme == "static") != (self.activation_scales is not None):
            raise ValueError(
                "omni_fp8 options 'activation_scheme'='static' and 'activation_scales' go together: static "
                "scales come from a calibration (python -m fp8_compile.calibration --help), and dynamic "
                f"scaling uses none; got activation_scheme={self.activation_scheme!r}, "
                f"activation_scales={'given' if self.activation_scales is not None else None}"
            )
        set_(self, "weight_block_size", _block_size(self.weight_block_size))
        if self.weight_block_size is not None and self.activation_scheme == "static":
            raise ValueError(
                "omni_fp8 option 'weight_block_size' scales activations per (1 x block_k) group on the fly "
                "and cannot take 'activation_scheme'='static'; use one or the other"
            )
        _choice("towers", self.towers, TOWER_MODES)
        _choice("granularity", self.granularity, GRANULARITIES)
        _choice("conditioning", self.conditioning, CONDITIONING_MODES)
        set_(self, "conditioning_layers", _patterns("conditioning_layers", self.conditioning_layers))
        _flag("fast_accum", self.fast_accum)
        _flag("cudagraphs", self.cudagraphs)
        _flag("strict", self.strict)
        _flag("fp8_attention", self.fp8_attention)
        _choice("lowering", self.lowering, LOWERINGS)
        if self.weight_block_size is not None and self.lowering == "weight_only":
            raise ValueError(
                "omni_fp8 option 'lowering'='weight_only' does not apply to 'weight_block_size': block-scaled "
                "layers quantize their activations per (1 x block_k) group and run their own kernel on every "
                "GPU; leave 'lowering' at 'auto'"
            )
        if self.fp8_attention and self.lowering == "weight_only":
            raise ValueError(
                "omni_fp8 option 'fp8_attention' quantizes attention's activations, which 'lowering'='weight_only' "
                "keeps in BF16 (it stands for GPUs without FP8 tensor cores); use one or the other"
            )

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
