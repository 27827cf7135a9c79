"""A hand-driven flow-matching denoising loop over a zoo denoiser: what a pipeline does around its
denoiser (scheduler, CFG, cache contexts), without text encoders or a VAE. The cache tests, the
fit command's ``--zoo`` mode and ``benchmarks/bench_cache.py`` generate with it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
from diffusers import FlowMatchEulerDiscreteScheduler

# How the loop names each denoiser call for the caches: "step" = cache_context(branch,
# step_index=i, num_inference_steps=n) as Wan's pipeline does; "name" = cache_context(branch) as
# FLUX's does; "none" = no context at all (the caches tell branches apart by call order).
ContextStyle = Literal["step", "name", "none"]


@dataclass(frozen=True)
class Conventions:
    """Where a zoo denoiser takes its latents and timestep, and the timestep's scale."""

    latents: str
    timestep: str
    timestep_of: Callable[[torch.Tensor], torch.Tensor]  # scheduler timestep (1000 .. 0) -> the model's


def _per_unit(t: torch.Tensor) -> torch.Tensor:
    return t / 1000


def _per_thousand(t: torch.Tensor) -> torch.Tensor:
    return t


def _time_to_clean(t: torch.Tensor) -> torch.Tensor:  # Z-Image counts up towards the clean image
    return (1000 - t) / 1000


CONVENTIONS: dict[str, Conventions] = {
    "flux": Conventions("hidden_states", "timestep", _per_unit),
    "flux2_klein": Conventions("hidden_states", "timestep", _per_unit),
    "qwen_image": Conventions("hidden_states", "timestep", _per_unit),
    "wan": Conventions("hidden_states", "timestep", _per_thousand),
    "z_image": Conventions("x", "t", _time_to_clean),
    "hunyuan_video15": Conventions("hidden_states", "timestep", _per_thousand),
    "glm_image": Conventions("hidden_states", "timestep", _per_thousand),
}


def prediction(output: Any) -> torch.Tensor:
    """A denoiser's prediction as one tensor (Z-Image returns a list of per-sample tensors)."""
    output = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
    return torch.stack(output) if isinstance(output, list) else output


def _as_model_latents(latents: torch.Tensor, like: Any) -> Any:
    return list(latents.unbind(0)) if isinstance(like, list) else latents


def _call_context(model: nn.Module, branch: str, step: int, steps: int, style: ContextStyle):
    if style == "none" or not hasattr(model, "cache_context"):
        return contextlib.nullcontext()
    kwargs = {"step_index": step, "num_inference_steps": steps} if style == "step" else {}
    return model.cache_context(branch, **kwargs)


def _euler_step(
    scheduler: FlowMatchEulerDiscreteScheduler, velocity: torch.Tensor, t: torch.Tensor, latents: torch.Tensor
) -> torch.Tensor:
    if velocity.shape == latents.shape:
        return scheduler.step(velocity, t, latents).prev_sample
    # Input channels beyond the predicted ones are conditioning, kept as they are (HunyuanVideo-1.5's
    # image latents and mask); predicted channels beyond the input's are unused (the tiny
    # HunyuanVideo-1.5 config predicts 16 channels from 9).
    channels = min(velocity.shape[1], latents.shape[1])
    noisy, condition = latents[:, :channels], latents[:, channels:]
    return torch.cat([scheduler.step(velocity[:, :channels], t, noisy).prev_sample, condition], dim=1)


def generate(
    model: nn.Module,
    name: str,
    inputs: dict[str, Any],
    steps: int,
    *,
    negative: dict[str, Any] | None = None,
    guidance_scale: float = 4.0,
    scheduler: FlowMatchEulerDiscreteScheduler | None = None,
    context: ContextStyle = "step",
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Denoise ``inputs`` (a zoo ``DiTSpec.inputs`` dict, its latents the starting noise) for ``steps``.

    ``negative`` overrides inputs for an unconditional branch (classifier-free guidance, two
    denoiser calls per step: "cond" then "uncond"); ``on_step(i)`` runs after step ``i``.
    Returns the final latents, stacked into one tensor.
    """
    conventions = CONVENTIONS[name]
    scheduler = scheduler or FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(steps)
    original = inputs[conventions.latents]
    latents = torch.stack(original) if isinstance(original, list) else original
    template = inputs[conventions.timestep]
    for step, t in enumerate(scheduler.timesteps):
        call = {
            **inputs,
            conventions.latents: _as_model_latents(latents, original),
            conventions.timestep: torch.full_like(template, conventions.timestep_of(t).item()),
        }
        with _call_context(model, "cond", step, steps, context):
            velocity = prediction(model(**call))
        if negative is not None:
            with _call_context(model, "uncond", step, steps, context):
                unconditional = prediction(model(**{**call, **negative}))
            velocity = unconditional + guidance_scale * (velocity - unconditional)
        latents = _euler_step(scheduler, velocity, t, latents)
        if on_step is not None:
            on_step(step)
    return latents
