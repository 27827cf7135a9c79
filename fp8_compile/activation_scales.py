"""Static activation scales: the file a calibration writes, and the checks before they are used.

A scales file is a safetensors file with one float32 scalar per FP8 layer, keyed by the layer's
qualified name; the scale is the calibrated input amax / 448, so ``x / scale`` lands on e4m3's
range. Its metadata names the format, the model class, the layers and the config that chose
them (see :func:`save_activation_scales`).

``options={"activation_scheme": "static", "activation_scales": <file or dict>}`` gives each FP8
layer its scale at conversion. Everything that can be wrong with the scales is found there,
before any weight is converted or any graph compiled, and raised as a ``ValueError`` naming the
file and the first offending layers.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from fp8_compile.config import Fp8Config
from fp8_compile.patterns import SHOWN_NAMES, shown_names
from fp8_compile.report import Decision

if TYPE_CHECKING:
    from fp8_compile.convert import LayerPlan

FORMAT = "fp8_compile.activation_scales"


@dataclass(frozen=True)
class ActivationScales:
    """Per-layer static activation scales and where they came from."""

    scales: dict[str, float]
    source: str  # the file, or a description of where the dict came from (used in errors)
    model_class: str | None = None  # the class they were calibrated on; None for a user's dict
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [name for name, scale in self.scales.items() if not (math.isfinite(scale) and scale > 0)]
        if bad:
            raise ValueError(
                f"{self.source}: activation scales must be finite and > 0; bad scales for layers {shown_names(bad)} "
                f"({', '.join(f'{n}={self.scales[n]}' for n in bad[:SHOWN_NAMES])})"
            )

    def check_model(self, model: nn.Module) -> None:
        """Raise when these scales were calibrated on another model."""
        model_class = type(model).__name__
        if self.model_class is not None and self.model_class != model_class:
            raise ValueError(
                f"{self.source} holds activation scales calibrated on {self.model_class}, not on {model_class}; "
                "calibrate this model (python -m fp8_compile.calibration --help)"
            )
        linears = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
        unknown = [name for name in self.scales if name not in linears]
        if unknown:
            raise ValueError(
                f"{self.source} has scales for layers that are not linear layers of {model_class}: {shown_names(unknown)}; "
                "was it calibrated on another model, or on a submodule with other layer names?"
            )


def save_activation_scales(scales: ActivationScales, path: str | os.PathLike) -> None:
    """Write ``scales`` as a safetensors file (one float32 scalar per layer, plus metadata)."""
    tensors = {name: torch.tensor(scale, dtype=torch.float32) for name, scale in scales.scales.items()}
    metadata = {
        **scales.metadata,
        "format": FORMAT,
        "model_class": scales.model_class or "",
        "layers": json.dumps(sorted(scales.scales)),
    }
    save_file(tensors, os.fspath(path), metadata=metadata)


def load_activation_scales(path: str | os.PathLike) -> ActivationScales:
    """Read a scales file; a file that is not one raises a ValueError naming it."""
    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a damaged header or body
        raise ValueError(f"activation scales file {path!r} is not a readable safetensors file: {e}") from None
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{path!r} is not an activation scales file (its metadata has no format {FORMAT!r}); "
            "write one with python -m fp8_compile.calibration"
        )
    not_scalar = [name for name, t in tensors.items() if t.numel() != 1 or not t.is_floating_point()]
    if not_scalar:
        raise ValueError(f"activation scales file {path!r}: expected one float scale per layer, not for {shown_names(not_scalar)}")
    return ActivationScales(
        {name: t.float().item() for name, t in tensors.items()},
        source=f"activation scales file {path!r}",
        model_class=metadata.get("model_class") or None,
        metadata=metadata,
    )


def activation_scales_from_option(value: str | Mapping[str, float]) -> ActivationScales:
    """The ``activation_scales`` option (a file or a dict, validated by Fp8Config) as scales."""
    if isinstance(value, Mapping):
        return ActivationScales(dict(value), source="the 'activation_scales' dict")
    return load_activation_scales(value)


def assign_static_scales(plans: list[LayerPlan], model: nn.Module, config: Fp8Config) -> None:
    """Give each planned FP8 layer its static scale (``plan.input_scale``) under ``config``.

    Raises, before anything is converted, on scales of another model and, unless
    ``missing_activation_scales="dynamic"``, on FP8 layers without a scale; with that option
    those layers keep dynamic scaling and their report entry says so.
    """
    if config.activation_scheme != "static":
        return
    scales = activation_scales_from_option(config.activation_scales)
    scales.check_model(model)
    fp8 = [plan for plan in plans if plan.decision is Decision.FP8]
    missing = [plan.name for plan in fp8 if plan.name not in scales.scales]
    if missing and config.missing_activation_scales == "error":
        raise ValueError(
            f"{scales.source} has no activation scale for {len(missing)} FP8 layers of {type(model).__name__}: "
            f"{shown_names(missing)}; calibrate them, keep them BF16 with 'ignored_layers', or let them scale "
            "dynamically with options={'missing_activation_scales': 'dynamic'}"
        )
    for plan in fp8:
        if plan.name in scales.scales:
            plan.input_scale = scales.scales[plan.name]
            plan.reason = "static activation scale"
        else:
            plan.reason = "dynamic activation scale: no static scale"
