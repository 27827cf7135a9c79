"""One generation of a subject with given denoisers, and the comparison of an FP8 generation
with the BF16 one."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from fp8_compile.validation.capture import Call, LayerRecorder
from fp8_compile.validation.metrics import compare, data_range_of, psnr_db, ssim
from fp8_compile.validation.subjects import Subject


@dataclass
class Trajectory:
    latents: list[torch.Tensor]  # the latent after each step, float32 on the CPU
    images: torch.Tensor  # final images [B, C, H, W], float32 on the CPU
    layers: dict[str, list[Call]] = field(default_factory=dict)  # per-layer capture of the first step


@dataclass
class StepError:
    step: int
    rel_error: float  # of the latent after this step
    cosine: float


@dataclass
class ImageQuality:
    psnr_db: float
    ssim: float
    data_range: float


def layer_prefix(component: str, denoisers: Mapping[str, nn.Module]) -> str:
    """How layer names are prefixed in a report: not at all for a single denoiser (so that names
    read as ignore patterns), by component for several (``transformer_2.blocks.0.ffn.net.2``)."""
    return "" if len(denoisers) == 1 else f"{component}."


@torch.no_grad()
def run_trajectory(denoisers: Mapping[str, nn.Module], subject: Subject, capture_rows: int | None = None) -> Trajectory:
    """Generate once with ``denoisers``. With ``capture_rows``, every linear layer's input and
    output are recorded during each denoiser's first denoising step: for the first denoiser the
    first step of the generation, where the BF16 and FP8 runs still see identical inputs (all its
    calls of that step: both CFG branches where there are two); for a denoiser that takes over
    later (Wan2.2's low-noise expert) its first step, whose inputs already carry the FP8 error of
    the steps before."""
    latents: list[torch.Tensor] = []
    recorders = {name: LayerRecorder(model, capture_rows) for name, model in denoisers.items()} if capture_rows else {}
    for recorder in recorders.values():
        recorder.start()

    def on_step(step: int, latent: torch.Tensor) -> None:
        latents.append(latent.float().cpu())
        for recorder in recorders.values():
            if recorder.calls:  # its denoiser ran in this step
                recorder.stop()

    try:
        images = subject.generate(denoisers, on_step)
    finally:
        for recorder in recorders.values():
            recorder.remove()
    layers = {
        layer_prefix(component, denoisers) + name: calls
        for component, recorder in recorders.items()
        for name, calls in recorder.calls.items()
    }
    return Trajectory(latents, images.float().cpu(), layers)


def step_errors(reference: Trajectory, test: Trajectory) -> list[StepError]:
    errors = []
    for step, (ref, out) in enumerate(zip(reference.latents, test.latents)):
        sums = compare(ref, out)
        errors.append(StepError(step, sums.relative_error, sums.cosine))
    return errors


def image_quality(reference: torch.Tensor, test: torch.Tensor, fixed_range: float | None) -> ImageQuality:
    """PSNR and SSIM of ``test`` images against ``reference`` over ``fixed_range`` (pixels), or
    over the reference images' own range (latents)."""
    data_range = fixed_range if fixed_range is not None else data_range_of(reference)
    return ImageQuality(psnr_db(reference, test, data_range), ssim(reference, test, data_range), data_range)
