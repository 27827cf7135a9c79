"""Rectified-flow (flow matching) conventions shared by the digits model and the validation loop.

A noisy sample at noise level ``sigma`` in [0, 1] is ``x_sigma = (1 - sigma) * x0 + sigma * noise``
and the model predicts the velocity ``noise - x0`` (the convention of diffusers'
``FlowMatchEulerDiscreteScheduler``, used by FLUX, SD3, Qwen-Image and Wan). Sampling integrates
from sigma = 1 (pure noise) to sigma = 0 with Euler steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# velocity(latent, sigma) -> predicted velocity, same shape as latent
VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]
# step_callback(step index, latent after that step)
StepCallback = Callable[[int, torch.Tensor], None]


def sigmas(steps: int, shift: float = 1.0) -> list[float]:
    """``steps + 1`` noise levels from 1 down to 0, warped by ``shift`` (SD3's timestep shift:
    ``shift > 1`` spends more steps at high noise)."""
    if steps < 1:
        raise ValueError(f"the number of sampling steps must be at least 1, got {steps}")
    linear = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    shifted = shift * linear / (1 + (shift - 1) * linear)
    return shifted.tolist()


def noisy_sample(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``x_sigma`` for a batch; ``sigma`` has one entry per sample."""
    sigma = sigma.reshape(-1, *([1] * (x0.dim() - 1)))
    return (1 - sigma) * x0 + sigma * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def euler_sample(
    velocity: VelocityFn,
    noise: torch.Tensor,
    noise_levels: list[float],
    step_callback: StepCallback | None = None,
) -> torch.Tensor:
    """Integrate ``velocity`` from ``noise`` (at ``noise_levels[0]``) down the given levels.

    The latent is kept in float32 between steps, as diffusers' schedulers do, and handed to
    ``velocity`` in that dtype; ``velocity`` casts it to the model's dtype.
    """
    latent = noise.float()
    for step, (sigma, sigma_next) in enumerate(zip(noise_levels[:-1], noise_levels[1:])):
        latent = latent + (sigma_next - sigma) * velocity(latent, sigma).float()
        if step_callback is not None:
            step_callback(step, latent)
    return latent
