"""Fit TeaCache coefficients from your own runs.

    python -m fp8_compile.caching.fit --pipeline <local diffusers folder> --prompt "a cat" --prompt "a city"
    python -m fp8_compile.caching.fit --zoo flux --generations 3     # random weights: to try the command

Over a few generations it records, for every denoiser call after a branch's first, the relative
L1 change of TeaCache's signal (the first block's timestep-modulated input) and of the
denoiser's output against the same CFG branch's previous call, then fits the polynomial that
maps the first to the second (numpy.polyfit, degree 4 as the TeaCache authors do). Pass the
printed coefficients as ``cache_config={"rel_l1_thresh": ..., "coefficients": [...]}``.
Coefficients fitted on random weights mean nothing; fit on the checkpoint you will run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from diffusers.hooks import HookRegistry, ModelHook
from tqdm.auto import tqdm

from fp8_compile.caching.loop import generate, prediction
from fp8_compile.caching.teacache import TeaCacheConfig, TeaCacheState, apply_teacache, relative_l1

RECORDER_HOOK = "fp8_compile_teacache_recorder"
# The recorder computes every step; an identity polynomial keeps apply_teacache from warning
# about coefficients that are not used.
_NEVER_SKIP = {"rel_l1_thresh": 0.0, "coefficients": (1.0, 0.0)}


class _OutputHook(ModelHook):
    def __init__(self, recorder: TeaCacheRecorder):
        super().__init__()
        self.recorder = recorder

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        self.recorder.record_output(prediction(output))
        return output


class TeaCacheRecorder:
    """Records (signal change, output change) pairs of a denoiser's calls, per CFG branch."""

    def __init__(self, denoiser: nn.Module, cfg_branches: int = 1, scheduler: Any = None):
        config = TeaCacheConfig(**_NEVER_SKIP, cfg_branches=cfg_branches)
        self.state: TeaCacheState = apply_teacache(denoiser, config, scheduler)
        HookRegistry.check_if_exists_or_initialize(getattr(denoiser, "_orig_mod", denoiser)).register_hook(
            _OutputHook(self), RECORDER_HOOK
        )
        self.previous_outputs: dict[str, torch.Tensor] = {}
        self.samples: list[tuple[float, float]] = []

    def record_output(self, output: torch.Tensor) -> None:
        branch = self.state.branch_name
        previous = self.previous_outputs.get(branch)
        signal_change = self.state.last_relative_change  # None on a branch's first call of a generation
        if signal_change is not None and previous is not None and previous.shape == output.shape:
            self.samples.append((signal_change, relative_l1(output, previous)))
        self.previous_outputs[branch] = output.detach()


def fit_coefficients(samples: Sequence[tuple[float, float]], degree: int = 4) -> tuple[float, ...]:
    """The degree-``degree`` polynomial (highest degree first) through (signal change, output change)."""
    if len(samples) <= degree:
        raise ValueError(
            f"fitting a degree-{degree} polynomial needs more than {degree} samples, got {len(samples)}; "
            "record more steps or generations"
        )
    x, y = np.asarray(samples, dtype=np.float64).T
    return tuple(float(c) for c in np.polyfit(x, y, degree))


def _record_pipeline(args: argparse.Namespace) -> tuple[str, TeaCacheRecorder]:
    from diffusers import DiffusionPipeline

    from fp8_compile.omni import dtype_kwarg

    pipe = DiffusionPipeline.from_pretrained(args.pipeline, **dtype_kwarg(getattr(torch, args.dtype))).to(args.device)
    denoiser = getattr(pipe, args.component, None)
    if not isinstance(denoiser, nn.Module):
        raise SystemExit(f"{args.pipeline}: the pipeline has no component {args.component!r}")
    recorder = TeaCacheRecorder(denoiser, scheduler=pipe.scheduler)
    for index, prompt in enumerate(args.prompt or ["a photograph of a cat sitting on a windowsill"]):
        generator = torch.Generator(args.device).manual_seed(args.seed + index)
        pipe(prompt=prompt, num_inference_steps=args.steps, generator=generator)
    return type(denoiser).__name__, recorder


def _record_zoo(args: argparse.Namespace) -> tuple[str, TeaCacheRecorder]:
    from fp8_compile.zoo import DITS, Resolution

    spec = DITS[args.zoo]
    torch.manual_seed(args.seed)
    model = spec.build(args.size, getattr(torch, args.dtype), args.device)
    recorder = TeaCacheRecorder(model)
    resolution = Resolution(args.height, args.width, frames=args.frames)
    with torch.no_grad():
        for index in tqdm(range(args.generations), desc="fit: generations", unit="generation", disable=None):
            torch.manual_seed(args.seed + index)
            inputs = spec.inputs(model, resolution, getattr(torch, args.dtype), args.device)
            generate(model, args.zoo, inputs, args.steps)
    return type(model).__name__, recorder


def main(argv: Sequence[str] | None = None) -> int:
    from fp8_compile.zoo import DITS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pipeline", help="a local diffusers pipeline folder (DiffusionPipeline.from_pretrained)")
    source.add_argument("--zoo", choices=sorted(DITS), help="a random-weight zoo denoiser (to try the command)")
    parser.add_argument("--prompt", action="append", help="a prompt per generation (--pipeline; repeat it)")
    parser.add_argument("--component", default="transformer", help="the denoiser component (or transformer_2)")
    parser.add_argument("--generations", type=int, default=3, help="generations to record (--zoo)")
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny", help="zoo model size (--zoo)")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--frames", type=int, default=5, help="video frames (--zoo video models)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--degree", type=int, default=4)
    parser.add_argument("--out", help="write the samples and the fit as JSON here")
    args = parser.parse_args(argv)

    model_name, recorder = _record_pipeline(args) if args.pipeline else _record_zoo(args)
    coefficients = fit_coefficients(recorder.samples, args.degree)
    x, y = np.asarray(recorder.samples).T
    rms = float(np.sqrt(np.mean((np.polyval(coefficients, x) - y) ** 2)))
    print(f"{model_name}: {len(recorder.samples)} samples, fit RMS error {rms:.4g} "
          f"(output changes {y.min():.4g} .. {y.max():.4g})")
    print(f"coefficients = {list(coefficients)}")
    print(f'cache_config = {{"rel_l1_thresh": 0.2, "coefficients": {list(coefficients)}}}')
    if args.out:
        with open(args.out, "w") as f:
            fit = {"model": model_name, "degree": args.degree, "coefficients": coefficients, "rms": rms}
            json.dump({**fit, "samples": recorder.samples}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
