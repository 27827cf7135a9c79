"""Calibration: record each FP8 layer's input range on BF16 runs and turn it into static scales.

    scales = calibrate(model, [inputs_1, inputs_2, ...])           # forward kwargs per run
    scales = calibrate(pipe.transformer, lambda: pipe(prompts, num_inference_steps=28))
    save_activation_scales(scales, "flux_scales.safetensors")
    model = torch.compile(model, backend="omni_fp8", options={
        "activation_scheme": "static", "activation_scales": "flux_scales.safetensors"})

or from the command line (``python -m fp8_compile.calibration --help``). The layers calibrated
are those the given options would run in W8A8 (the same ``ignored_layers`` and conditioning
rules). Each layer's scale is ``amax / 448``, with ``amax`` either the largest input magnitude
seen over all calls (``method="max"``: nothing saturates on the calibration data) or, per call,
the ``percentile``-th percentile of the input magnitudes, maximised over calls
(``method="percentile"``: the rarest outliers saturate at 448, the rest keeps more precision).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from fp8_compile.activation_scales import ActivationScales, save_activation_scales
from fp8_compile.config import Fp8Config
from fp8_compile.convert import plan_layers
from fp8_compile.ops import AMAX_FLOOR, FP8_MAX
from fp8_compile.report import Decision

logger = logging.getLogger("fp8_compile")

METHODS = ("max", "percentile")


class InputRangeRecorder:
    """Forward pre-hooks that keep, per layer, the largest input range statistic seen so far.

    The statistic stays on the layer's device until :meth:`amax` is read, so recording adds no
    host synchronisation to the calibration runs.
    """

    def __init__(self, method: str, percentile: float):
        self.method, self.percentile = method, percentile
        self.ranges: dict[str, torch.Tensor] = {}

    def statistic(self, x: torch.Tensor) -> torch.Tensor:
        magnitudes = x.detach().abs().float().flatten()
        if self.method == "max":
            return magnitudes.max()
        rank = max(1, math.ceil(self.percentile / 100 * magnitudes.numel()))
        return magnitudes.kthvalue(rank).values

    def hook(self, name: str) -> Callable[..., None]:
        def record(_module: nn.Module, args: tuple) -> None:
            value = self.statistic(args[0])
            seen = self.ranges.get(name)
            self.ranges[name] = value if seen is None else torch.maximum(seen, value)

        return record

    def amax(self) -> dict[str, float]:
        return {name: value.item() for name, value in self.ranges.items()}


def _run(model: nn.Module, runs: Iterable[Any] | Callable[[], Any]) -> None:
    if callable(runs):
        runs()
        return
    for inputs in runs:
        if isinstance(inputs, Mapping):
            model(**inputs)
        else:
            model(*inputs)


def calibrate(
    model: nn.Module,
    runs: Iterable[Mapping[str, Any] | tuple] | Callable[[], Any],
    options: Mapping[str, Any] | Fp8Config | None = None,
    method: str = "max",
    percentile: float = 99.99,
) -> ActivationScales:
    """Static activation scales for the W8A8 layers of BF16 ``model``, from running it.

    ``runs`` is an iterable of forward inputs (a kwargs dict or an args tuple per call), or a
    callable that runs the model itself (a whole pipeline over prompts and all its steps).
    ``options`` are the omni_fp8 options the scales are meant for (they decide which layers are
    W8A8). A progress bar counts the model's forward calls. Layers that never ran get no scale;
    they are named in a warning.
    """
    if method not in METHODS:
        raise ValueError(f"calibration method must be one of {list(METHODS)}, got {method!r}")
    if not 0 < percentile <= 100:
        raise ValueError(f"calibration percentile must be in (0, 100], got {percentile!r}")
    config = Fp8Config.from_options(options)
    model = getattr(model, "_orig_mod", model)
    layers = [plan for plan in plan_layers(model.named_modules(), config) if plan.decision is Decision.FP8]
    recorder = InputRangeRecorder(method, percentile)
    hooks = [plan.module.register_forward_pre_hook(recorder.hook(plan.name)) for plan in layers]
    progress = tqdm(desc=f"calibrating {type(model).__name__}", unit="forward", disable=None)
    forward_calls = 0

    def count_call(*_: Any) -> None:
        nonlocal forward_calls
        forward_calls += 1
        progress.update(1)

    hooks.append(model.register_forward_hook(count_call))
    try:
        with torch.no_grad():
            _run(model, runs)
    finally:
        for hook in hooks:
            hook.remove()
        progress.close()
    amax = recorder.amax()
    never_ran = [plan.name for plan in layers if plan.name not in amax]
    if never_ran:
        logger.warning("calibration: %d W8A8 layers never ran and got no scale: %s", len(never_ran), never_ran[:5])
    calibration = {"method": method, "forward_calls": forward_calls, **({"percentile": percentile} if method == "percentile" else {})}
    return ActivationScales(
        {name: max(value, AMAX_FLOOR) / FP8_MAX for name, value in amax.items()},
        source="calibration",
        model_class=type(model).__name__,
        metadata={"config": json.dumps(config.to_dict()), "calibration": json.dumps(calibration)},
    )


def zoo_runs(spec: Any, model: nn.Module, steps: int, resolution: Any, dtype: torch.dtype, device: str) -> list[dict]:
    """Forward inputs of a zoo denoiser over ``steps`` denoising steps: fresh latents each step,
    and timesteps spread over the schedule (the zoo's input timestep is its mid-point)."""
    runs = []
    for step in range(steps):
        inputs = spec.inputs(model, resolution, dtype, device)
        key = "timestep" if "timestep" in inputs else "t"
        inputs[key] = inputs[key] * 2 * (steps - step - 0.5) / steps
        runs.append(inputs)
    return runs


def pipeline_runs(
    folder: str, prompts: list[str], steps: int, height: int, width: int, device: str, component: str | None = None
) -> tuple[nn.Module, Callable[[], Any]]:
    """A local diffusers pipeline's denoiser (``component``, by default its transformer or unet),
    and a run of the pipeline over ``prompts`` and all ``steps`` (the latents are kept: decoding
    them adds nothing to the denoiser's statistics)."""
    from diffusers import DiffusionPipeline

    from fp8_compile.omni import dtype_kwarg

    pipe = DiffusionPipeline.from_pretrained(folder, **dtype_kwarg(torch.bfloat16)).to(device)
    component = component or ("transformer" if getattr(pipe, "transformer", None) is not None else "unet")
    denoiser = getattr(pipe, component, None)
    if not isinstance(denoiser, nn.Module):
        raise ValueError(f"--component {component!r}: {type(pipe).__name__} has no such model")
    if component == "transformer" and getattr(pipe, "transformer_2", None) is not None:
        # Wan2.2's two experts share a class and layer names, so the scales would load into either
        logger.warning(
            "calibration: %s has a second denoiser, 'transformer_2', which runs other steps; calibrate it "
            "on its own with --component transformer_2 (these scales are the first one's)",
            type(pipe).__name__,
        )
    run = lambda: pipe(prompts, height=height, width=width, num_inference_steps=steps, output_type="latent")  # noqa: E731
    return denoiser, run


def main(argv: list[str] | None = None) -> None:
    from fp8_compile.zoo import DITS, Resolution

    parser = argparse.ArgumentParser(
        description="Calibrate static FP8 activation scales and write them to a safetensors file.",
        epilog="Use them with options={'activation_scheme': 'static', 'activation_scales': OUT}.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", choices=sorted(DITS), help="a zoo denoiser with random weights (seeded)")
    source.add_argument("--pipeline", help="a local diffusers pipeline folder; its denoiser is calibrated")
    parser.add_argument("--size", default="tiny", choices=["tiny", "full"], help="zoo model size")
    parser.add_argument("--seed", type=int, default=0, help="zoo model seed (use the one the model is built with)")
    parser.add_argument("--component", help="the pipeline's denoiser to calibrate (default: transformer, or unet)")
    parser.add_argument("--prompts", nargs="+", default=["a photo of a cat"], help="pipeline prompts")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per prompt (zoo: forward calls)")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--method", default="max", choices=METHODS)
    parser.add_argument("--percentile", type=float, default=99.99)
    parser.add_argument("--ignored-layers", nargs="*", default=[], help="omni_fp8 ignored_layers patterns")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True, help="the scales file to write (.safetensors)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    if args.model:
        spec = DITS[args.model]
        torch.manual_seed(args.seed)
        model = spec.build(args.size, torch.bfloat16, args.device)
        resolution = Resolution(args.height, args.width)
        runs: Any = zoo_runs(spec, model, args.steps, resolution, torch.bfloat16, args.device)
    else:
        model, runs = pipeline_runs(args.pipeline, args.prompts, args.steps, args.height, args.width, args.device, args.component)
    scales = calibrate(model, runs, {"ignored_layers": args.ignored_layers}, args.method, args.percentile)
    save_activation_scales(scales, args.out)
    print(f"wrote {len(scales.scales)} activation scales of {scales.model_class} to {args.out}")


if __name__ == "__main__":
    main()
