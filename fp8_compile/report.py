"""What the conversion did to every linear layer, and why."""

from __future__ import annotations

import weakref
from collections import Counter
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import torch
import torch.nn as nn


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    """The memory the given tensors hold (None counts nothing), as the report's byte counts add it up."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class Decision(str, Enum):
    FP8 = "fp8"  # FP8 weight and FP8 activation (W8A8)
    WEIGHT_ONLY = "weight_only"  # FP8 weight, activation left in BF16
    BF16 = "bf16"  # left as it was


@dataclass(frozen=True)
class LayerReport:
    name: str
    out_features: int
    in_features: int
    decision: Decision
    reason: str  # why the layer got this decision, e.g. "ignored by 'img_mlp'"

    @property
    def quantized(self) -> bool:
        return self.decision is not Decision.BF16


@dataclass
class QuantizationReport:
    """One entry per linear layer of the converted model, plus the weight bytes it saved."""

    layers: list[LayerReport] = field(default_factory=list)
    bytes_before: int = 0  # weight + bias bytes of the quantized layers before conversion
    bytes_after: int = 0  # the same layers' weight, scale and bias bytes after it
    config: dict[str, Any] = field(default_factory=dict)  # the options of the latest conversion

    def merge(self, other: QuantizationReport) -> None:
        """Add a later conversion's entries; a layer decided again keeps its latest entry."""
        decided_again = {layer.name for layer in other.layers}
        self.layers = [layer for layer in self.layers if layer.name not in decided_again] + other.layers
        self.bytes_before += other.bytes_before
        self.bytes_after += other.bytes_after
        self.config = other.config or self.config

    def by_decision(self, decision: Decision) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.decision is decision]

    @property
    def num_quantized(self) -> int:
        return sum(layer.quantized for layer in self.layers)

    def summary(self) -> str:
        fp8 = len(self.by_decision(Decision.FP8))
        weight_only = len(self.by_decision(Decision.WEIGHT_ONLY))
        text = f"quantized {fp8 + weight_only} of {len(self.layers)} linear layers ({fp8} fp8, {weight_only} weight-only fp8)"
        kept = Counter(layer.reason for layer in self.by_decision(Decision.BF16))
        if kept:
            text += ", kept in BF16: " + ", ".join(f"{n} {reason}" for reason, n in kept.most_common())
        # how the FP8 layers scale, where it is not the default (static, block-wise, per expert)
        scaled = Counter(layer.reason for layer in self.by_decision(Decision.FP8) if layer.reason != "fp8")
        if scaled:
            text += ", fp8 with: " + ", ".join(f"{n} {reason}" for reason, n in scaled.most_common())
        if self.bytes_before:
            text += (
                f"; weights of the quantized layers {self.bytes_before / 2**20:.1f} MiB -> "
                f"{self.bytes_after / 2**20:.1f} MiB"
            )
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary(),
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "config": self.config,
            "layers": [{**asdict(layer), "decision": layer.decision.value} for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantizationReport:
        """The report :meth:`to_dict` wrote (as an FP8 checkpoint stores it)."""
        layers = [LayerReport(**{**layer, "decision": Decision(layer["decision"])}) for layer in data["layers"]]
        return cls(layers, data["bytes_before"], data["bytes_after"], data.get("config", {}))


_REPORTS: weakref.WeakKeyDictionary[nn.Module, QuantizationReport] = weakref.WeakKeyDictionary()


def record_report(model: nn.Module, report: QuantizationReport) -> QuantizationReport:
    """Attach ``report`` to ``model``; a model converted in several steps accumulates one report."""
    existing = _REPORTS.get(model)
    if existing is None:
        _REPORTS[model] = report
        return report
    existing.merge(report)
    return existing


def quantization_report(model: nn.Module) -> QuantizationReport | None:
    """The report of what omni_fp8 did to ``model`` (or to the model a compiled wrapper holds)."""
    model = getattr(model, "_orig_mod", model)
    return _REPORTS.get(model)
