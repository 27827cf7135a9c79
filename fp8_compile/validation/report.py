"""The validation report: what was compared, the numbers, and the files that show them."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fp8_compile.validation.capture import LayerError, first_collapse
from fp8_compile.validation.sensitivity import GroupSensitivity, Suggestion
from fp8_compile.validation.trajectory import ImageQuality, StepError

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
LAYER_CHART = "layers_sqnr.png"
SIDE_BY_SIDE = "images.png"


@dataclass
class ValidationReport:
    model: str  # subject name: a zoo name, "digits", or a pipeline's class name
    model_class: str
    validated_on: str  # "tiny random config", "full-size random weights", "our trained model", "pipeline folder ..."
    options: dict[str, Any]  # the omni_fp8 options of the FP8 run that differ from the defaults
    quantization: str  # the quantization report's summary
    steps: int
    seed: int
    device: str
    collapse_db: float  # output SQNR below which a layer counts as broken
    image: ImageQuality
    denoising: list[StepError]
    layers: list[LayerError]
    sensitivity: list[GroupSensitivity] = field(default_factory=list)
    suggestion: Suggestion | None = None
    options_line: str | None = None  # the suggestion as a line to paste
    files: dict[str, str] = field(default_factory=dict)

    @property
    def first_collapse(self) -> LayerError | None:
        return first_collapse(self.layers, self.collapse_db)

    @property
    def weakest_layers(self) -> list[LayerError]:
        return sorted(self.layers, key=lambda layer: layer.output_sqnr_db)[:5]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        collapse = self.first_collapse
        data["first_collapse"] = collapse.name if collapse else None
        return json_safe(data)

    def write_json(self, path: Path) -> Path:
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        return path

    def write_markdown(self, path: Path) -> Path:
        path.write_text(self.to_markdown())
        return path

    def to_markdown(self) -> str:
        return "\n".join(
            [*self._summary_lines(), *self._step_lines(), *self._layer_lines(), *self._sensitivity_lines()]
        ) + "\n"

    def _summary_lines(self) -> list[str]:
        collapse = self.first_collapse
        lines = [
            f"# FP8 vs BF16: {self.model} ({self.model_class})",
            "",
            f"- validated on: **{self.validated_on}**, device {self.device}, {self.steps} denoising steps, "
            f"seed {self.seed}",
            f"- options: `{self.options or 'defaults'}`",
            f"- quantization: {self.quantization}",
            f"- final images: **PSNR {_db(self.image.psnr_db)}**, **SSIM {self.image.ssim:.4f}** "
            f"(data range {self.image.data_range:.3g})",
            f"- first layer with output SQNR below {self.collapse_db:g} dB: "
            + (f"**{collapse.name}** ({_db(collapse.output_sqnr_db)})" if collapse else "none"),
        ]
        if self.suggestion is not None:
            verdict = "met" if self.suggestion.met else "NOT met"
            lines.append(
                f"- target PSNR {self.suggestion.target_psnr_db:g} dB {verdict}: ignored_layers="
                f"`{self.suggestion.ignored_layers}` gives PSNR {_db(self.suggestion.psnr_db)}, "
                f"SSIM {self.suggestion.ssim:.4f} ({self.suggestion.evaluations} runs)"
            )
        if self.options_line:
            lines += ["", "```python", self.options_line, "```"]
        lines += ["", *(f"![{name}]({path})" for name, path in self.files.items() if path.endswith(".png")), ""]
        return lines

    def _step_lines(self) -> list[str]:
        lines = ["## Latent after each denoising step", "", "| step | rel. error | cosine |", "|---|---|---|"]
        lines += [f"| {s.step} | {s.rel_error:.4f} | {s.cosine:.5f} |" for s in self.denoising]
        return [*lines, ""]

    def _layer_lines(self) -> list[str]:
        lines = [
            "## Layers, in the order they ran (first denoising step)",
            "",
            "SQNR = 10 log10(signal / error power) against BF16; one e4m3 rounding gives about 29 dB, an FP8 "
            "GEMM about 25-28 dB. The input columns show the error the layer inherits, the output columns "
            "what it passes on.",
            "",
            "| # | layer | family | decision | input SQNR | input rel. err | output SQNR | output rel. err |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {e.index} | `{e.name}` | {e.family} | {e.decision} | {_db(e.input_sqnr_db)} | "
            f"{e.input_rel_error:.4f} | {_db(e.output_sqnr_db)} | {e.output_rel_error:.4f} |"
            for e in self.layers
        ]
        return [*lines, ""]

    def _sensitivity_lines(self) -> list[str]:
        if not self.sensitivity:
            return []
        lines = [
            "## Sensitivity: one group quantized at a time, the rest BF16",
            "",
            "| group | patterns | quantized layers | parameters | PSNR | SSIM |",
            "|---|---|---|---|---|---|",
        ]
        ranked = sorted(self.sensitivity, key=lambda g: g.psnr_db)
        lines += [
            f"| {g.name} | `{', '.join(g.patterns)}` | {g.quantized_layers} | {g.parameters:,} | "
            f"{_db(g.psnr_db)} | {g.ssim:.4f} |"
            for g in ranked
        ]
        return [*lines, ""]


def _db(value: float) -> str:
    return f"{value:.2f} dB" if math.isfinite(value) else f"{value} dB"


def json_safe(value: Any) -> Any:
    """JSON has no Inf or NaN: such floats become the strings "inf", "-inf" or "nan"
    (an infinite SQNR or PSNR means the FP8 value equals the BF16 one exactly)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value
