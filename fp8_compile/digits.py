"""A small class-conditional DiT trained by us on scikit-learn's handwritten digits.

Random weights have none of the outlier structure of trained ones, so the quality tests and
the validation command also run this model: diffusers' ``DiTTransformer2DModel`` (AdaLN-zero
blocks, class labels 0-9 plus a null label for classifier-free guidance), trained with flow
matching in pixel space on 32x32 upsampled digits (``examples/train_digits_dit.py``). Its
checkpoint ships with the package in ``fp8_compile/assets/digits_dit``.

    model = load_digits_dit()
    images = sample_digits(model, [0, 1, 2, 3])   # [4, 1, 32, 32] in [0, 1]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from fp8_compile.flow_matching import StepCallback, euler_sample, sigmas

DIGITS_DIT_DIR = Path(__file__).parent / "assets" / "digits_dit"
NUM_CLASSES = 10
NULL_LABEL = NUM_CLASSES  # the label diffusers' LabelEmbedding drops to, for classifier-free guidance
IMAGE_SIZE = 32
# The model sees timesteps on diffusers' usual 0..1000 scale: timestep = 1000 * sigma.
TIMESTEP_SCALE = 1000.0

# 6 blocks of width 128 (4 heads x 32), 4x4 patches of 8x8 pixels: 2.1 M parameters. Every
# linear's K and N is a multiple of 16, so all of them can take the FP8 GEMM.
MODEL_CONFIG: dict[str, Any] = dict(
    sample_size=IMAGE_SIZE,
    patch_size=8,
    in_channels=1,
    out_channels=1,
    num_layers=6,
    num_attention_heads=4,
    attention_head_dim=32,
    num_embeds_ada_norm=NUM_CLASSES,
    norm_type="ada_norm_zero",
)

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 2.0


def build_digits_dit(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> nn.Module:
    """A freshly initialised (untrained) model of the digits architecture."""
    from diffusers import DiTTransformer2DModel

    with torch.device(device):
        model = DiTTransformer2DModel(**MODEL_CONFIG)
    return model.to(dtype)


def load_digits_dit(
    dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu", path: str | Path = DIGITS_DIT_DIR
) -> nn.Module:
    """The trained model, in eval mode (so no class label is dropped at random)."""
    from diffusers import DiTTransformer2DModel

    from fp8_compile.omni import dtype_kwarg

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no digits DiT checkpoint in {path}: train one with examples/train_digits_dit.py --out {path}"
        )
    model = DiTTransformer2DModel.from_pretrained(path, **dtype_kwarg(dtype))
    return model.to(device).eval()


def guided_velocity(
    model: nn.Module, latent: torch.Tensor, sigma: float, labels: torch.Tensor, guidance: float
) -> torch.Tensor:
    """The classifier-free-guided velocity: both branches run in one batch of twice the size."""
    batch = latent.shape[0]
    dtype = next(model.parameters()).dtype
    hidden = torch.cat([latent, latent]).to(dtype)
    timestep = torch.full((2 * batch,), sigma * TIMESTEP_SCALE, device=latent.device)
    class_labels = torch.cat([labels, torch.full_like(labels, NULL_LABEL)])
    cond, uncond = model(hidden, timestep=timestep, class_labels=class_labels, return_dict=False)[0].float().chunk(2)
    return uncond + guidance * (cond - uncond)


def digit_labels(digits: Sequence[int], device: str | torch.device = "cpu") -> torch.Tensor:
    bad = [d for d in digits if not 0 <= d < NUM_CLASSES]
    if bad:
        raise ValueError(f"digit classes must be in 0..{NUM_CLASSES - 1}, got {bad}")
    return torch.tensor(list(digits), dtype=torch.long, device=device)


def initial_noise(batch: int, seed: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """The starting noise, drawn on the CPU so that a seed gives the same digits on every device."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator).to(device)


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """Model pixels in [-1, 1] -> images in [0, 1]."""
    return ((pixels.float() + 1) / 2).clamp(0, 1)


@torch.no_grad()
def sample_digits(
    model: nn.Module,
    digits: Sequence[int],
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    seed: int = 0,
    step_callback: StepCallback | None = None,
) -> torch.Tensor:
    """Draw one image per entry of ``digits``: [B, 1, 32, 32] float32 in [0, 1]."""
    device = next(model.parameters()).device
    labels = digit_labels(digits, device)
    noise = initial_noise(len(labels), seed, device)
    pixels = euler_sample(
        lambda x, sigma: guided_velocity(model, x, sigma, labels, guidance), noise, sigmas(steps), step_callback
    )
    return to_unit_range(pixels)
