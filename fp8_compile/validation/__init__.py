"""Validation of FP8 against BF16: per-layer SQNR, per-step latent error, image PSNR/SSIM,
layer sensitivity and suggested ignore lists. Entry points: ``fp8_compile.validate(...)`` and
``python -m fp8_compile.validate``; see docs/validation.md."""

from fp8_compile.validation.api import validate
from fp8_compile.validation.report import ValidationReport
from fp8_compile.validation.subjects import Subject, build_subject, digits_subject, pipeline_subject, zoo_subject

__all__ = [
    "Subject",
    "ValidationReport",
    "build_subject",
    "digits_subject",
    "pipeline_subject",
    "validate",
    "zoo_subject",
]
