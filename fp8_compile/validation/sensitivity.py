"""Layer sensitivity and the smallest ``ignored_layers`` list that meets a quality target.

Sensitivity: each candidate group (``groups.candidate_groups``) is quantized alone, everything
else left in BF16, and the final images are compared with the BF16 images. The error a group
causes alone estimates what keeping it in BF16 would remove from the fully quantized model.

Suggestion: starting from the user's options (everything quantized that they quantize), groups
are kept in BF16 one at a time, each time the one that removes the most estimated error per
parameter given up, and the whole model is measured again after each, until the PSNR target is
met. Then each chosen group is dropped again if the target still holds without it, so no group
in the answer is superfluous (a minimal list; not necessarily the global minimum, which would
need every combination).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch.nn as nn
from tqdm.auto import tqdm

from fp8_compile.config import Fp8Config
from fp8_compile.report import QuantizationReport, quantization_report
from fp8_compile.validation.groups import LayerGroup
from fp8_compile.validation.subjects import Subject
from fp8_compile.validation.trajectory import ImageQuality

logger = logging.getLogger("fp8_compile")

# measure(FP8 denoisers by component) -> quality of their final images against BF16
Measure = Callable[[Mapping[str, nn.Module]], ImageQuality]


@contextlib.contextmanager
def _quiet_conversions() -> Iterator[None]:
    """Each trial converts a fresh copy, and each conversion logs its summary at INFO; dozens of
    those would bury the sensitivity results, so the package logger says only warnings meanwhile."""
    previous = logger.level
    logger.setLevel(max(previous, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(previous)


def _fp8_copies(subject: Subject, config: Fp8Config, only: set[str] | None = None) -> dict[str, nn.Module]:
    with _quiet_conversions():
        return subject.fp8_copies(config, only)


def non_default_options(config: Fp8Config) -> dict[str, Any]:
    """The options of ``config`` that differ from the defaults: what a user would write."""
    defaults = Fp8Config().to_dict()
    return {key: value for key, value in config.to_dict().items() if value != defaults[key]}


@dataclass
class GroupSensitivity:
    name: str
    patterns: list[str]
    quantized_layers: int  # layers of the group that the options quantize
    parameters: int  # their parameter count
    psnr_db: float  # final images with only this group quantized
    ssim: float

    @property
    def relative_mse(self) -> float:
        """The error this group causes alone, as a mean square relative to the images' range."""
        return 10 ** (-self.psnr_db / 10) if math.isfinite(self.psnr_db) else 0.0


@dataclass
class Suggestion:
    target_psnr_db: float
    ignored_layers: list[str]  # the user's patterns plus the suggested ones
    psnr_db: float
    ssim: float
    met: bool
    evaluations: int  # full-model runs the search took

    def options(self, base: Fp8Config) -> dict[str, Any]:
        """The user's options with the suggested ignore list, as a dict to pass to omni_fp8."""
        return {**non_default_options(base), "ignored_layers": self.ignored_layers}

    def options_line(self, base: Fp8Config) -> str:
        return f'torch.compile(model, backend="omni_fp8", options={self.options(base)!r})'


def group_sensitivity(
    subject: Subject,
    config: Fp8Config,
    groups: Sequence[LayerGroup],
    quantized: dict[str, int],
    measure: Measure,
) -> list[GroupSensitivity]:
    """Quantize each group alone (only its layers that ``config`` quantizes; ``quantized`` maps
    those names to their parameter counts) and measure the final images."""
    results = []
    for group in tqdm(groups, desc="sensitivity: one group at a time", unit="group", disable=None):
        names = {name for name in group.layers if name in quantized}
        if not names:
            continue
        quality = measure(_fp8_copies(subject, config, only=names))
        results.append(
            GroupSensitivity(
                group.name, list(group.patterns), len(names), sum(quantized[n] for n in names),
                quality.psnr_db, quality.ssim,
            )
        )
        logger.info("sensitivity %-40s %3d layers  PSNR %6.2f dB  SSIM %.4f", group.name, len(names),
                    quality.psnr_db, quality.ssim)
    return results


def suggest_ignored_layers(
    subject: Subject,
    config: Fp8Config,
    sensitivities: Sequence[GroupSensitivity],
    groups: Sequence[LayerGroup],
    quantized: dict[str, int],
    full_quality: ImageQuality,
    target_psnr_db: float,
    measure: Measure,
) -> Suggestion:
    """The ignore list search described in the module docstring."""
    layers_of = {group.name: set(group.layers) & quantized.keys() for group in groups}
    evaluations = 0

    def evaluate(chosen: list[GroupSensitivity]) -> ImageQuality:
        nonlocal evaluations
        evaluations += 1
        patterns = dict.fromkeys([*config.ignored_layers, *(p for g in chosen for p in g.patterns)])
        return measure(_fp8_copies(subject, dataclasses.replace(config, ignored_layers=tuple(patterns))))

    chosen: list[GroupSensitivity] = []
    quality = full_quality
    kept: set[str] = set()
    while quality.psnr_db < target_psnr_db:
        gains = [
            (g.relative_mse / sum(quantized[n] for n in layers_of[g.name] - kept), g)
            for g in sensitivities
            if g not in chosen and layers_of[g.name] - kept
        ]
        if not gains:
            break
        best = max(gains, key=lambda pair: pair[0])[1]
        chosen.append(best)
        kept |= layers_of[best.name]
        quality = evaluate(chosen)
        logger.info("suggestion: + %-30s PSNR %6.2f dB", best.name, quality.psnr_db)

    if quality.psnr_db >= target_psnr_db:
        for group in list(reversed(chosen)):
            trial = [g for g in chosen if g is not group]
            trial_quality = evaluate(trial)
            if trial_quality.psnr_db >= target_psnr_db:
                chosen, quality = trial, trial_quality
                logger.info("suggestion: - %-30s PSNR %6.2f dB (not needed)", group.name, quality.psnr_db)

    patterns = list(dict.fromkeys([*config.ignored_layers, *(p for g in chosen for p in g.patterns)]))
    return Suggestion(target_psnr_db, patterns, quality.psnr_db, quality.ssim, quality.psnr_db >= target_psnr_db,
                      evaluations)


def quantized_parameters(fp8: Mapping[str, nn.Module], bf16: Mapping[str, nn.Module]) -> dict[str, int]:
    """The layers that the FP8 copies quantized, by name, with their parameter counts (summed over
    denoisers that share a layer name, as Wan2.2's two experts do)."""
    counts: dict[str, int] = {}
    for component, model in fp8.items():
        report = quantization_report(model) or QuantizationReport()
        modules = dict(bf16[component].named_modules())
        for layer in report.layers:
            if layer.quantized:
                counts[layer.name] = counts.get(layer.name, 0) + modules[layer.name].weight.numel()
    return counts
