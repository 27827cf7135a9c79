"""``fp8_compile.validate``: run a model in BF16 and in FP8 on the same inputs and report where
and how much they differ."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch.nn as nn

from fp8_compile.config import Fp8Config
from fp8_compile.report import QuantizationReport, quantization_report
from fp8_compile.validation.capture import compare_layers
from fp8_compile.validation.groups import candidate_groups
from fp8_compile.validation.pictures import save_side_by_side
from fp8_compile.validation.report import LAYER_CHART, REPORT_JSON, REPORT_MD, SIDE_BY_SIDE, ValidationReport
from fp8_compile.validation.sensitivity import (
    group_sensitivity,
    non_default_options,
    quantized_parameters,
    suggest_ignored_layers,
)
from fp8_compile.validation.subjects import Subject, build_subject
from fp8_compile.validation.trajectory import (
    ImageQuality,
    Trajectory,
    image_quality,
    layer_prefix,
    run_trajectory,
    step_errors,
)

logger = logging.getLogger("fp8_compile")

DEFAULT_COLLAPSE_DB = 10.0  # a healthy FP8 layer stays near 25-30 dB; 10 dB is a 32% error


def validate(
    model: str | Subject = "digits",
    options: Mapping[str, Any] | Fp8Config | None = None,
    *,
    size: str = "tiny",
    steps: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    out_dir: str | Path | None = None,
    fp8_model: nn.Module | Mapping[str, nn.Module] | None = None,
    sensitivity: bool = False,
    target_psnr: float | None = None,
    capture_rows: int = 256,
    collapse_db: float = DEFAULT_COLLAPSE_DB,
) -> ValidationReport:
    """Compare FP8 with BF16 on one seeded generation and return (and optionally write) the report.

    ``model``: ``"digits"`` (our trained model), a zoo name (``"flux"``, ``"qwen_image"``, ...
    with ``size`` "tiny" or "full", random weights), both built with ``steps``, ``seed`` and
    ``device``, or a :class:`Subject` (e.g. from ``zoo_subject`` at another resolution or
    ``pipeline_subject``), which brings its own. ``options`` are omni_fp8's; the FP8 denoisers are converted copies of
    the BF16 ones, run eagerly, unless ``fp8_model`` gives them (one module, or one per denoiser
    component). ``sensitivity`` quantizes one layer group at a time; ``target_psnr`` (dB against
    BF16) also searches the smallest ``ignored_layers`` list that meets it. ``capture_rows``
    bounds the tokens kept per layer. ``out_dir`` receives report.json, report.md,
    layers_sqnr.png and images.png.
    """
    config = Fp8Config.from_options(options)  # bad options fail before any model is built
    subject = model if isinstance(model, Subject) else build_subject(model, size, steps, seed, device)
    fp8 = _fp8_denoisers(subject, config, fp8_model)

    logger.info("validate %s: BF16 run", subject.name)
    reference = run_trajectory(subject.denoisers, subject, capture_rows)
    logger.info("validate %s: FP8 run", subject.name)
    test = run_trajectory(fp8, subject, capture_rows)

    report = ValidationReport(
        model=subject.name,
        model_class=", ".join(dict.fromkeys(type(m).__name__ for m in subject.denoisers.values())),
        validated_on=subject.validated_on,
        options=non_default_options(config),
        quantization=_summary(fp8),
        steps=subject.steps,
        seed=subject.seed,
        device=subject.device,
        collapse_db=collapse_db,
        image=image_quality(reference.images, test.images, subject.image_range),
        denoising=step_errors(reference, test),
        layers=compare_layers(reference.layers, test.layers, _decisions(fp8)),
    )
    if sensitivity or target_psnr is not None:
        _add_sensitivity(report, subject, config, fp8, reference, sensitivity, target_psnr)
    if out_dir is not None:
        write_files(report, Path(out_dir), reference, test, subject.image_range is not None)
    return report


def _fp8_denoisers(
    subject: Subject, config: Fp8Config, given: nn.Module | Mapping[str, nn.Module] | None
) -> dict[str, nn.Module]:
    if given is None:
        return subject.fp8_copies(config)
    modules = [given] if isinstance(given, nn.Module) else list(given.values())
    if any(hasattr(module, "_orig_mod") for module in modules):
        # Its layers are named '_orig_mod.*' (nothing was compared), and hooked inside compiled
        # code one layer's input came out far from the eager run's (3 dB against an exact match).
        raise ValueError(
            "fp8_model: pass the FP8 module itself, not its torch.compile wrapper (model._orig_mod): the "
            "per-layer comparison hooks every layer and runs the model eagerly"
        )
    if isinstance(given, nn.Module):
        if len(subject.denoisers) != 1:
            raise ValueError(
                f"fp8_model: {subject.name} has denoisers {list(subject.denoisers)}; pass a dict with one FP8 module each"
            )
        return {next(iter(subject.denoisers)): given}
    if set(given) != set(subject.denoisers):
        raise ValueError(f"fp8_model: expected FP8 modules for {sorted(subject.denoisers)}, got {sorted(given)}")
    return dict(given)


def _reports(fp8: Mapping[str, nn.Module]) -> dict[str, QuantizationReport]:
    return {component: quantization_report(model) or QuantizationReport() for component, model in fp8.items()}


def _summary(fp8: Mapping[str, nn.Module]) -> str:
    summaries = {c: r.summary() if r.layers else "no omni_fp8 conversion recorded" for c, r in _reports(fp8).items()}
    if len(summaries) == 1:
        return next(iter(summaries.values()))
    return "; ".join(f"{component}: {text}" for component, text in summaries.items())


def _decisions(fp8: Mapping[str, nn.Module]) -> dict[str, str]:
    """Each layer's decision, named as the layer capture names it."""
    return {
        layer_prefix(component, fp8) + layer.name: layer.decision.value
        for component, report in _reports(fp8).items()
        for layer in report.layers
    }


def _add_sensitivity(
    report: ValidationReport,
    subject: Subject,
    config: Fp8Config,
    fp8: Mapping[str, nn.Module],
    reference: Trajectory,
    sensitivity: bool,
    target_psnr: float | None,
) -> None:
    def measure(denoisers: Mapping[str, nn.Module]) -> ImageQuality:
        return image_quality(reference.images, run_trajectory(denoisers, subject).images, subject.image_range)

    groups = candidate_groups(subject.linear_names())
    quantized = quantized_parameters(fp8, subject.denoisers)
    # Per-group runs cost one generation each; a target the full FP8 model meets needs none.
    if sensitivity or (target_psnr is not None and report.image.psnr_db < target_psnr):
        report.sensitivity = group_sensitivity(subject, config, groups, quantized, measure)
    if target_psnr is not None:
        report.suggestion = suggest_ignored_layers(
            subject, config, report.sensitivity, groups, quantized, report.image, target_psnr, measure
        )
        report.options_line = report.suggestion.options_line(config)


def write_files(
    report: ValidationReport, out_dir: Path, reference: Trajectory, test: Trajectory, fixed_range: bool
) -> None:
    """report.json, report.md, the SQNR chart (when matplotlib is installed) and the images."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_side_by_side(reference.images, test.images, out_dir / SIDE_BY_SIDE, report.image.data_range, fixed_range)
    report.files["images"] = SIDE_BY_SIDE
    try:
        from fp8_compile.validation.chart import plot_layer_sqnr

        title = f"{report.model} ({report.validated_on}): output SQNR per layer"
        plot_layer_sqnr(report.layers, out_dir / LAYER_CHART, title, report.collapse_db)
        report.files["layer SQNR chart"] = LAYER_CHART
    except ImportError:
        logger.warning("no layer chart: matplotlib is not installed (pip install 'fp8-compile[validate]')")
    report.files["markdown"] = REPORT_MD
    report.files["json"] = REPORT_JSON
    report.write_markdown(out_dir / REPORT_MD)
    report.write_json(out_dir / REPORT_JSON)
