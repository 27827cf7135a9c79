"""Generate an image with a diffusers pipeline whose denoiser (and optionally text encoders) run in FP8.

    python examples/text_to_image.py --model <pipeline folder> --quantization fp8 \
        [--ignored-layers img_mlp] [--steps 28] [--seed 0] [--output out.png]

Prints the quantization report of every converted component, the progress of each denoising
step, the time and peak memory of each stage, and writes the image. For a video pipeline
(Wan2.2) the frames are written side by side in one image. Without ``--model`` it runs on the
built-in default, a small FLUX.1 pipeline with random weights written to a temporary folder
(nothing is downloaded; the image is noise). Exits with status 2 and a one-line message on bad
input: a folder that is no pipeline, a component it lacks, an unknown quantization method.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fp8_compile.omni import Omni, OmniDiffusionSamplingParams, OmniRequestOutput
from fp8_compile.tiny_pipelines import PIPELINES, write_tiny_pipeline

DEFAULT_PROMPT = "A cat sitting on a windowsill"
DEFAULT_KIND = "flux"


def _patterns(text: str) -> list[str]:
    return [p for p in text.split(",") if p]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local diffusers pipeline folder (default: a built-in tiny FLUX.1 pipeline)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--quantization", default="fp8", help="'fp8' (default) or 'none' for BF16")
    parser.add_argument("--ignored-layers", type=_patterns, action="extend", default=[],
                        help="comma-separated layer patterns kept in BF16, e.g. 'img_mlp' (repeatable)")
    parser.add_argument("--components", type=_patterns,
                        help="comma-separated components to convert (default: the denoisers), "
                             "e.g. 'transformer,text_encoder_2'")
    parser.add_argument("--fp8-attention", action="store_true",
                        help="attention in FP8 too (cuDNN, Hopper+; pays off at long sequences, e.g. video)")
    parser.add_argument("--steps", type=int, default=28, help="denoising steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--num-frames", type=int, help="video pipelines only")
    parser.add_argument("--guidance-scale", type=float)
    parser.add_argument("--max-sequence-length", type=int, help="text tokens the T5/UMT5/Qwen encoders pad to")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--enforce-eager", action="store_true", help="run the FP8 layers without torch.compile")
    parser.add_argument("--warmup", action="store_true", help="generate once before the timed run (compiles)")
    parser.add_argument("--cache-backend", help="e.g. 'tea_cache'")
    parser.add_argument("--cache-config", type=json.loads, help='JSON, e.g. \'{"rel_l1_thresh": 0.2}\'')
    parser.add_argument("--output", default="out.png", help="image file to write")
    return parser.parse_args(argv)


def quantization(args: argparse.Namespace) -> tuple[str | None, dict[str, Any] | None]:
    """Omni's ``quantization`` and ``quantization_config`` as the flags describe them."""
    if args.quantization == "none":
        if args.ignored_layers or args.components or args.fp8_attention:
            raise ValueError(
                "--ignored-layers, --components and --fp8-attention need a quantization method (--quantization fp8)"
            )
        return None, None
    options: dict[str, Any] = {"ignored_layers": args.ignored_layers} if args.ignored_layers else {}
    if args.fp8_attention:
        options["fp8_attention"] = True
    if args.components is None:
        return args.quantization, options  # omni_fp8 options: applied to the denoisers
    return args.quantization, {name: options for name in args.components}


def sampling_params(args: argparse.Namespace, default_size: tuple[int | None, int | None, int | None]):
    height, width, frames = default_size
    return OmniDiffusionSamplingParams(
        num_inference_steps=args.steps, seed=args.seed, height=args.height or height, width=args.width or width,
        num_frames=args.num_frames or frames, guidance_scale=args.guidance_scale,
        max_sequence_length=args.max_sequence_length,
    )


def output_image(output: OmniRequestOutput):
    """The image to write: the first image, or a video's frames side by side."""
    from PIL import Image

    if output.images:
        return output.images[0]
    frames = output.frames[0]
    strip = Image.new("RGB", (sum(f.width for f in frames), frames[0].height))
    for i, frame in enumerate(frames):
        strip.paste(frame, (i * frame.width, 0))
    return strip


def _mib(n: int | None) -> str:
    return "n/a on CPU" if n is None else f"{n / 2**20:.1f} MiB"


def print_summary(omni: Omni, output: OmniRequestOutput) -> None:
    print(f"{type(omni.pipeline).__name__} on {omni.device}, loaded in {omni.load_seconds:.1f} s")
    for name, report in omni.reports.items():
        print(f"  {name}: {report.summary()}")
    if not omni.reports:
        print("  no quantization (BF16)")
    for name, stage in output.stages.items():
        print(f"  {name:14s} {stage.seconds * 1e3:9.1f} ms   peak memory {_mib(stage.peak_memory_bytes)}")
    steps = output.step_seconds
    if steps:
        print(f"  {len(steps)} steps, median {statistics.median(steps) * 1e3:.1f} ms per step")
    print(f"  total {output.seconds:.2f} s, peak memory {_mib(output.peak_memory_bytes)}, "
          f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")


def run(args: argparse.Namespace, model: str, default_size) -> Path:
    method, config = quantization(args)
    omni = Omni(
        model, quantization=method, quantization_config=config, cache_backend=args.cache_backend,
        cache_config=args.cache_config, device=args.device, enforce_eager=args.enforce_eager,
    )
    params = sampling_params(args, default_size)
    if args.warmup:
        start = time.perf_counter()
        omni.generate(args.prompt, params)
        print(f"warm-up generation: {time.perf_counter() - start:.1f} s")
    output = omni.generate(args.prompt, params)[0]
    print_summary(omni, output)
    path = Path(args.output)
    output_image(output).save(path)
    print(f"wrote {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.model is not None:
            run(args, args.model, (None, None, None))
            return 0
        spec = PIPELINES[DEFAULT_KIND]
        with tempfile.TemporaryDirectory(prefix="fp8_compile-tiny-") as folder:
            print(f"no --model: using a built-in tiny {spec.pipeline_class} with random weights (the image is noise)")
            run(args, write_tiny_pipeline(DEFAULT_KIND, folder), (spec.height, spec.width, spec.num_frames))
        return 0
    except (ValueError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
