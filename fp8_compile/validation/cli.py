"""The ``python -m fp8_compile.validate`` command."""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

from fp8_compile.config import Fp8Config
from fp8_compile.validation.api import DEFAULT_COLLAPSE_DB, validate
from fp8_compile.validation.report import REPORT_MD, ValidationReport
from fp8_compile.validation.subjects import (
    DEFAULT_RESOLUTION,
    SUBJECT_NAMES,
    Subject,
    build_subject,
    pipeline_subject,
)
from fp8_compile.zoo import Resolution

USAGE = """Compare a model's FP8 output with its BF16 output on one seeded generation.

examples:
  python -m fp8_compile.validate --model digits --out runs/digits
  python -m fp8_compile.validate --model qwen_image --target-psnr 30 --out runs/qwen
  python -m fp8_compile.validate --model flux --size full --device cuda --height 1024 --width 1024 --out runs/flux
  python -m fp8_compile.validate --pipeline /path/to/diffusers/folder --prompt "a cat" --out runs/pipe
"""


def _parse_options(text: str) -> dict:
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}); write e.g. '{{\"granularity\": \"per_tensor\"}}'") from None
    if not isinstance(options, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fp8_compile.validate", description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="digits", choices=SUBJECT_NAMES,
                        help="a zoo denoiser (random weights) or 'digits' (our trained model)")
    parser.add_argument("--pipeline", type=Path, default=None,
                        help="a diffusers pipeline folder to validate instead of --model (its denoisers are quantized)")
    parser.add_argument("--prompt", default="a photograph of a red fox in the snow", help="the pipeline's prompt")
    parser.add_argument("--size", default="tiny", choices=["tiny", "full"], help="zoo config size")
    parser.add_argument("--height", type=int, default=DEFAULT_RESOLUTION.height, help="zoo models and pipelines")
    parser.add_argument("--width", type=int, default=DEFAULT_RESOLUTION.width, help="zoo models and pipelines")
    parser.add_argument("--frames", type=int, default=DEFAULT_RESOLUTION.frames, help="video models")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: 20 digits, 8 others)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--options", type=_parse_options, default={}, help="omni_fp8 options as JSON")
    parser.add_argument("--ignored-layers", default="", help="comma-separated patterns, added to --options")
    parser.add_argument("--sensitivity", action="store_true", help="quantize one layer group at a time")
    parser.add_argument("--target-psnr", type=float, default=None,
                        help="search the smallest ignored_layers list whose images reach this PSNR (dB) vs BF16")
    parser.add_argument("--collapse-db", type=float, default=DEFAULT_COLLAPSE_DB,
                        help="output SQNR below which a layer is flagged as broken")
    parser.add_argument("--capture-rows", type=int, default=256, help="tokens kept per layer for the comparison")
    parser.add_argument("--out", type=Path, default=Path("validation"), help="folder for the report files")
    return parser


def print_summary(report: ValidationReport, out_dir: Path) -> None:
    collapse = report.first_collapse
    print(f"\n{report.model} ({report.model_class}), validated on {report.validated_on}")
    print(f"quantization:  {report.quantization}")
    print(f"final images:  PSNR {report.image.psnr_db:.2f} dB, SSIM {report.image.ssim:.4f}")
    last = report.denoising[-1]
    print(f"final latent:  relative error {last.rel_error:.4f}, cosine {last.cosine:.5f}")
    weakest = ", ".join(f"{e.name} {e.output_sqnr_db:.1f} dB" for e in report.weakest_layers if math.isfinite(e.output_sqnr_db))
    print(f"weakest layers (output SQNR): {weakest or 'none'}")
    print(f"first layer below {report.collapse_db:g} dB: {collapse.name if collapse else 'none'}")
    if report.suggestion is not None:
        s = report.suggestion
        print(f"target PSNR {s.target_psnr_db:g} dB {'met' if s.met else 'NOT met'}: PSNR {s.psnr_db:.2f} dB "
              f"with ignored_layers={s.ignored_layers}")
        print(f"options line:  {report.options_line}")
    print(f"report:        {out_dir / REPORT_MD}")


def _subject(args: argparse.Namespace) -> Subject:
    if args.pipeline is not None:
        return pipeline_subject(args.pipeline, args.prompt, args.steps or 8, args.seed, args.device, args.height,
                                args.width, args.frames)
    resolution = Resolution(args.height, args.width, args.frames, DEFAULT_RESOLUTION.text_tokens)
    return build_subject(args.model, args.size, args.steps, args.seed, args.device, resolution)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options = dict(args.options)
    extra = [p for p in args.ignored_layers.split(",") if p]
    if extra:
        options["ignored_layers"] = [*options.get("ignored_layers", []), *extra]
    try:
        config = Fp8Config.from_options(options)  # bad options fail before any model is built
        report = validate(
            _subject(args), config, out_dir=args.out, sensitivity=args.sensitivity, target_psnr=args.target_psnr,
            capture_rows=args.capture_rows, collapse_db=args.collapse_db,
        )
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print_summary(report, args.out)
