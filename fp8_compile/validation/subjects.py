"""What a validation run generates: BF16 denoisers and one seeded generation with them (same
noise, conditioning and noise levels every time), run once as they are and once with FP8 copies.

* ``zoo_subject``: a denoiser of ``fp8_compile.zoo`` (tiny config or full size, random weights).
  Its inputs come from the zoo's input builder; the sampling loop replaces the latent and the
  timestep at every step. Without a VAE, the "decoded images" are the final latent laid out as
  images (all channels; the first frame of a video), compared over their own value range.
* ``digits_subject``: our trained digits DiT; its images are pixels in [0, 1].
* ``pipeline_subject``: a diffusers pipeline folder (e.g. from ``fp8_compile.tiny_pipelines``):
  prompt -> text encoder(s) -> denoiser(s) over the pipeline's own scheduler -> VAE. Only the
  denoisers (both Wan2.2 experts) are quantized; the images are the pipeline's, in [0, 1].
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from fp8_compile import digits
from fp8_compile.caching.api import DENOISER_COMPONENTS
from fp8_compile.caching.loop import CONVENTIONS, prediction
from fp8_compile.config import Fp8Config
from fp8_compile.convert import convert_model
from fp8_compile.flow_matching import StepCallback, euler_sample, sigmas
from fp8_compile.zoo import DITS, Resolution

# velocity(model, latent, sigma) -> prediction with the latent's shape, float32
Velocity = Callable[[nn.Module, torch.Tensor, float], torch.Tensor]

# A small image: 64 image tokens for the FLUX-like models, a few frames for the video ones.
DEFAULT_RESOLUTION = Resolution(height=128, width=128, frames=5, text_tokens=16)

TINY_RANDOM = "tiny random config"
FULL_RANDOM = "full-size random weights"
TRAINED = "our trained model"


# generate(denoisers by component name, step_callback) -> final images [B, C, H, W], float32
Generate = Callable[[Mapping[str, nn.Module], StepCallback], torch.Tensor]


@dataclass
class Subject:
    """One seeded generation, to run once with the BF16 denoisers and once with FP8 copies."""

    name: str
    validated_on: str  # TINY_RANDOM, FULL_RANDOM, TRAINED or the pipeline folder
    denoisers: dict[str, nn.Module]  # the BF16 denoisers by component name ("transformer", ...)
    generate: Generate  # calls step_callback(step, latent) after every denoising step
    steps: int
    image_range: float | None  # the images' fixed value range, or None: use the BF16 images' range
    seed: int
    device: str

    def fp8_copies(self, config: Fp8Config, only: set[str] | None = None) -> dict[str, nn.Module]:
        """Copies of the denoisers converted with ``config`` (each keeps its report); with
        ``only``, just the linears of those names are converted, the rest stay BF16."""
        copies = {}
        for component, model in self.denoisers.items():
            fp8 = copy.deepcopy(model)
            convert_model(fp8, [(n, m) for n, m in fp8.named_modules() if only is None or n in only], config)
            copies[component] = fp8
        return copies

    def linear_names(self) -> list[str]:
        """The linear layers' names, each once even where several denoisers share it."""
        names = (n for model in self.denoisers.values() for n, m in model.named_modules() if isinstance(m, nn.Linear))
        return list(dict.fromkeys(names))


# Zoo denoisers whose latents are packed tokens [B, tokens, channels]: 2x2 patches of the VAE
# latent, one token per 16x16 pixels (FLUX, FLUX.2, Qwen-Image). The others take [B, C, H, W],
# [B, C, F, H, W] or, Z-Image, a list of [C, F, H, W].
PACKED_PIXELS_PER_TOKEN = 16
# Z-Image's pipeline negates the model output to get the velocity.
NEGATED_OUTPUT = frozenset({"z_image"})


def _channel_dim(latent: torch.Tensor) -> int:
    return -1 if latent.dim() == 3 else 1


def fit_channels(prediction: torch.Tensor, latent: torch.Tensor, dim: int) -> torch.Tensor:
    """The prediction updates the latent's first channels. A model that takes more channels than
    it predicts (HunyuanVideo-1.5: latent + condition latents + mask) keeps the extra ones as
    they are; one that predicts more than it takes has the surplus dropped."""
    have, want = prediction.shape[dim], latent.shape[dim]
    if have > want:
        return prediction.narrow(dim, 0, want)
    if have < want:
        pad_shape = list(prediction.shape)
        pad_shape[dim] = want - have
        return torch.cat([prediction, prediction.new_zeros(pad_shape)], dim=dim)
    return prediction


def _zoo_velocity(name: str, inputs: dict[str, Any]) -> Velocity:
    """The model's velocity at noise level ``sigma``, called as the model's pipeline calls it
    (latent and timestep keys and timestep scale from the caching loop's conventions)."""
    conventions, sign = CONVENTIONS[name], -1.0 if name in NEGATED_OUTPUT else 1.0
    as_list = isinstance(inputs[conventions.latents], list)

    def velocity(model: nn.Module, latent: torch.Tensor, sigma: float) -> torch.Tensor:
        value = latent.to(next(model.parameters()).dtype)
        timestep = conventions.timestep_of(torch.tensor(1000.0 * sigma)).item()
        call = {
            **inputs,
            conventions.latents: list(value.unbind(0)) if as_list else value,
            conventions.timestep: torch.full_like(inputs[conventions.timestep], timestep),
        }
        return sign * fit_channels(prediction(model(**call)).float(), latent, _channel_dim(latent))

    return velocity


def _zoo_decode(resolution: Resolution) -> Callable[[torch.Tensor], torch.Tensor]:
    def decode(latent: torch.Tensor) -> torch.Tensor:
        if latent.dim() == 3:  # packed tokens
            h, w = resolution.height // PACKED_PIXELS_PER_TOKEN, resolution.width // PACKED_PIXELS_PER_TOKEN
            return latent.reshape(latent.shape[0], h, w, latent.shape[-1]).permute(0, 3, 1, 2).float()
        return (latent[:, :, 0] if latent.dim() == 5 else latent).float()  # first frame of a video

    return decode


def zoo_subject(
    name: str,
    size: str = "tiny",
    resolution: Resolution = DEFAULT_RESOLUTION,
    steps: int = 8,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> Subject:
    """A zoo denoiser with random weights (seeded) and one seeded sampling run of it."""
    if name not in DITS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(DITS)} or 'digits'")
    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
    spec = DITS[name]
    torch.manual_seed(seed)
    model = spec.build(size, torch.bfloat16, device)
    torch.manual_seed(seed + 1)
    inputs = spec.inputs(model, resolution, torch.bfloat16, device)
    start = inputs[CONVENTIONS[name].latents]
    noise = (torch.stack(start) if isinstance(start, list) else start).float()
    velocity, decode, levels = _zoo_velocity(name, inputs), _zoo_decode(resolution), sigmas(steps)

    def generate(denoisers: Mapping[str, nn.Module], step_callback: StepCallback) -> torch.Tensor:
        transformer = denoisers["transformer"]
        return decode(euler_sample(lambda x, sigma: velocity(transformer, x, sigma), noise, levels, step_callback))

    validated_on = TINY_RANDOM if size == "tiny" else FULL_RANDOM
    return Subject(name, validated_on, {"transformer": model}, generate, steps, None, seed, str(device))


def digits_subject(
    classes: Sequence[int] = tuple(range(10)),
    steps: int = digits.DEFAULT_STEPS,
    guidance: float = digits.DEFAULT_GUIDANCE,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> Subject:
    """Our trained digits DiT drawing one image per class in ``classes``."""
    model = digits.load_digits_dit(torch.bfloat16, device)

    def generate(denoisers: Mapping[str, nn.Module], step_callback: StepCallback) -> torch.Tensor:
        return digits.sample_digits(denoisers["transformer"], classes, steps, guidance, seed, step_callback)

    return Subject("digits", TRAINED, {"transformer": model}, generate, steps, 1.0, seed, str(device))


def _first_frame(images: torch.Tensor) -> torch.Tensor:
    """A pipeline's "pt" output as [B, C, H, W]: videos ([B, F, C, H, W]) give their first frame."""
    return (images[:, 0] if images.dim() == 5 else images).float().cpu()


def pipeline_subject(
    folder: str | Path,
    prompt: str = "a photograph of a red fox in the snow",
    steps: int = 8,
    seed: int = 0,
    device: str | torch.device = "cpu",
    height: int = 128,
    width: int = 128,
    frames: int = 5,
) -> Subject:
    """A diffusers pipeline loaded from ``folder`` in BF16; its denoiser(s) get quantized."""
    from diffusers import DiffusionPipeline

    from fp8_compile.omni import dtype_kwarg

    if not (Path(folder) / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    pipe = DiffusionPipeline.from_pretrained(folder, **dtype_kwarg(torch.bfloat16)).to(device)
    pipe.set_progress_bar_config(disable=True)  # sensitivity runs it dozens of times
    denoisers = {name: getattr(pipe, name) for name in DENOISER_COMPONENTS if getattr(pipe, name, None) is not None}
    if not denoisers:
        raise ValueError(f"the pipeline in {folder} ({type(pipe).__name__}) has no 'transformer' component")
    call_args: dict[str, Any] = dict(prompt=prompt, height=height, width=width, num_inference_steps=steps)
    if "num_frames" in inspect.signature(pipe.__call__).parameters:
        call_args["num_frames"] = frames

    def generate(models: Mapping[str, nn.Module], step_callback: StepCallback) -> torch.Tensor:
        def on_step_end(pipeline, step: int, timestep, tensors: dict[str, Any]) -> dict[str, Any]:
            step_callback(step, tensors["latents"])
            return tensors

        originals = {name: getattr(pipe, name) for name in models}
        for name, model in models.items():
            setattr(pipe, name, model)
        try:
            images = pipe(
                **call_args, generator=torch.Generator(device).manual_seed(seed), output_type="pt",
                callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"],
            )[0]
        finally:
            for name, model in originals.items():
                setattr(pipe, name, model)
        return _first_frame(images)

    return Subject(type(pipe).__name__, f"pipeline folder {folder}", denoisers, generate, steps, 1.0, seed, str(device))


SUBJECT_NAMES = (*sorted(DITS), "digits")


def build_subject(
    name: str,
    size: str = "tiny",
    steps: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    resolution: Resolution = DEFAULT_RESOLUTION,
) -> Subject:
    """A subject by name: a zoo denoiser (of ``size``, at ``resolution``) or ``"digits"`` (one
    size, 32x32); ``steps`` None takes each one's default."""
    if name == "digits":
        if size != "tiny":
            raise ValueError("the digits model has one size; leave --size out")
        return digits_subject(steps=steps or digits.DEFAULT_STEPS, seed=seed, device=device)
    return zoo_subject(name, size, resolution, steps or 8, seed, device)
