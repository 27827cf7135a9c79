"""A pipeline-level API in vLLM-Omni's vocabulary: whole diffusers pipelines with omni_fp8.

    from fp8_compile import Omni, OmniDiffusionSamplingParams
    omni = Omni(model="<local diffusers folder>", quantization="fp8")
    outputs = omni.generate("A cat sitting on a windowsill", OmniDiffusionSamplingParams(num_inference_steps=28))
    outputs[0].images[0].save("cat.png")

:class:`Omni` loads a pipeline from a local folder in BF16, converts the chosen components to
FP8 with :func:`fp8_compile.quantize_` and compiles them in place with ``backend="omni_fp8"``
(denoisers regionally, one graph per block class):
by default the denoiser(s) (``transformer``, and ``transformer_2`` for Wan2.2's second
expert); text encoders when the quantization config names them. The VAE stays BF16.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from packaging.version import Version

from fp8_compile.config import METHODS, Fp8Config, did_you_mean
from fp8_compile.convert import quantize_
from fp8_compile.report import QuantizationReport

logger = logging.getLogger("fp8_compile")

DENOISERS = ("transformer", "transformer_2", "unet")
# Components that are never quantized: the VAE's cost is in its convolutions, which FP8 linears
# leave alone, and its output is the image itself.
KEPT_IN_BF16 = ("vae",)
_OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(Fp8Config))


@dataclass
class OmniDiffusionSamplingParams:
    """What one generation asks for. ``None`` leaves the pipeline's own default.

    ``seed`` seeds a CPU generator, so a seed gives the same noise on every device.
    ``guidance_scale`` is whatever the pipeline calls by that name (FLUX.1's distilled guidance,
    Z-Image's and Wan's classifier-free guidance); ``true_cfg_scale`` is Qwen-Image's CFG.
    """

    num_inference_steps: int = 50
    seed: int | None = None
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None  # video pipelines
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None
    negative_prompt: str | None = None
    max_sequence_length: int | None = None
    num_outputs_per_prompt: int = 1


@dataclass
class StageStats:
    """Time and peak GPU memory of one stage of a generation (summed over its calls)."""

    seconds: float = 0.0
    peak_memory_bytes: int | None = None  # CUDA's peak allocated memory during the stage; None on the CPU


@dataclass
class OmniRequestOutput:
    """The result of one prompt: PIL images, or for a video pipeline the frames of each video."""

    prompt: str
    images: list[Any] = field(default_factory=list)
    frames: list[list[Any]] = field(default_factory=list)
    stages: dict[str, StageStats] = field(default_factory=dict)  # text_encoding, denoising, vae_decode
    step_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0
    peak_memory_bytes: int | None = None


def read_model_index(model: str | os.PathLike) -> dict[str, Any]:
    """The ``model_index.json`` of a local diffusers pipeline folder; ValueError if there is none."""
    index = Path(model) / "model_index.json"
    if not index.is_file():
        what = "folder" if Path(model).is_dir() else "path (no such folder)"
        raise ValueError(
            f"{os.fspath(model)!r} is not a diffusers pipeline folder: this {what} has no model_index.json. "
            "Pass a local pipeline folder (pipeline.save_pretrained(...) writes one; "
            "python -m fp8_compile.tiny_pipelines --kind flux --out DIR writes a small one)."
        )
    return json.loads(index.read_text())


def model_components(index: Mapping[str, Any]) -> list[str]:
    """The pipeline's components that are loaded from a folder (models, tokenizers, scheduler)."""
    return [name for name, value in index.items() if not name.startswith("_") and isinstance(value, list) and value[0]]


def component_configs(
    index: Mapping[str, Any], quantization: str | None, quantization_config: Mapping[str, Any] | None
) -> dict[str, Fp8Config]:
    """Which components to convert, each with its validated omni_fp8 config.

    ``quantization_config`` is either omni_fp8 options (applied to the denoisers) or a dict
    ``{component: options}``; ``quantization="fp8"`` alone converts the denoisers with the
    default options. Raises ValueError naming the method, component or option at fault.
    """
    if quantization is not None and quantization not in METHODS:
        hint = did_you_mean(str(quantization), METHODS)
        raise ValueError(f"unknown quantization method {quantization!r}{hint}; supported: {list(METHODS)}")
    if quantization_config is None:
        if quantization is None:
            return {}
        quantization_config = {}
    if not isinstance(quantization_config, Mapping):
        raise ValueError(f"quantization_config must be a dict, got {type(quantization_config).__name__}")
    components = model_components(index)
    pipeline = index.get("_class_name", "this pipeline")
    unknown = [key for key in quantization_config if key not in _OPTION_NAMES and key not in index]
    if unknown:
        raise ValueError(
            f"quantization_config key {unknown[0]!r} is neither an omni_fp8 option nor a component of {pipeline}"
            f"{did_you_mean(unknown[0], [*_OPTION_NAMES, *components])}; components: {', '.join(components)}; "
            f"options: {sorted(_OPTION_NAMES)}"
        )
    options_given = [key for key in quantization_config if key in _OPTION_NAMES]
    if options_given and len(options_given) < len(quantization_config):
        raise ValueError(
            f"quantization_config mixes omni_fp8 options ({options_given}) with components; give either options "
            "(for the denoisers) or {<component>: {options}}"
        )
    if options_given or not quantization_config:  # options, or none: for the denoisers
        denoisers = [name for name in DENOISERS if name in components]
        if not denoisers:
            raise ValueError(
                f"{index.get('_class_name')} has no denoiser named {' or '.join(DENOISERS)}; name the components "
                f"to convert: quantization_config={{<component>: {{...}}}} with a component among {components}"
            )
        per_component = {name: quantization_config for name in denoisers}
    else:
        per_component = dict(quantization_config)
    configs = {}
    for name, options in per_component.items():
        _check_component(name, components, index)
        if options is not None and not isinstance(options, Mapping):
            raise ValueError(f"quantization_config[{name!r}] must be a dict of omni_fp8 options, got {options!r}")
        options = dict(options or {})
        if quantization is not None:
            options.setdefault("method", quantization)
        try:
            configs[name] = Fp8Config.from_options(options)
        except ValueError as e:
            raise ValueError(f"quantization_config for {name!r}: {e}") from None
    return configs


def _check_component(name: str, components: list[str], index: Mapping[str, Any]) -> None:
    pipeline = index.get("_class_name", "this pipeline")
    if name in KEPT_IN_BF16:
        raise ValueError(f"{pipeline}'s {name!r} stays BF16: omni_fp8 converts denoisers and text encoders")
    if name not in components:
        known = ", ".join(components)
        raise ValueError(
            f"{name!r} is neither an omni_fp8 option nor a component of {pipeline}{did_you_mean(name, components)}; "
            f"components: {known}; options: {sorted(_OPTION_NAMES)}"
        )
    library, class_name = index[name][:2]
    if "Tokenizer" in class_name or "Scheduler" in class_name or library not in ("diffusers", "transformers"):
        raise ValueError(f"{pipeline}'s {name!r} is a {class_name}, not a model with linear layers")


def _check_cache_backend(cache_backend: str | None, cache_config: Mapping[str, Any] | None) -> None:
    if cache_backend is None:
        if cache_config is not None:
            raise ValueError("cache_config was given without a cache_backend")
        return
    from fp8_compile import caching

    caching.parse_cache_config(cache_backend, cache_config)


class _StageClock:
    """Times one pipeline call by stage: text encoding (``encode_prompt``), the denoising steps
    (from the end of text encoding to the VAE decode, one entry per step through the pipeline's
    ``callback_on_step_end``) and the VAE decode; peak CUDA memory per stage."""

    def __init__(self, device: torch.device, num_steps: int):
        self.cuda = device.type == "cuda"
        self.num_steps = num_steps
        self.stages: dict[str, StageStats] = {}
        self.step_seconds: list[float] = []
        # the denoising stage runs from the end of the last text encoding to the VAE decode
        self.mark = self.denoising_start = self.start = self._now()
        self._reset_peak()

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def _peak(self) -> int | None:
        return torch.cuda.max_memory_allocated() if self.cuda else None

    def _add(self, name: str, seconds: float) -> None:
        stage = self.stages.setdefault(name, StageStats())
        stage.seconds += seconds
        peak = self._peak()
        if peak is not None:
            stage.peak_memory_bytes = max(stage.peak_memory_bytes or 0, peak)

    def _close_denoising(self) -> None:
        if "denoising" not in self.stages:
            self._add("denoising", self._now() - self.denoising_start)

    def timed(self, name: str, fn: Callable) -> Callable:
        """``fn`` recorded as (part of) stage ``name``."""

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            if name == "vae_decode":
                self._close_denoising()
            start = self._now()
            self._reset_peak()
            result = fn(*args, **kwargs)
            self._add(name, self._now() - start)
            self.mark = self.denoising_start = self._now()
            self._reset_peak()
            return result

        return run

    def on_step_end(self, pipeline: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        now = self._now()
        self.step_seconds.append(now - self.mark)
        self.mark = now
        logger.info("denoising step %d/%d: %.1f ms", step + 1, self.num_steps, self.step_seconds[-1] * 1e3)
        return callback_kwargs

    def finish(self) -> float:
        self._close_denoising()
        return self._now() - self.start


def dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """diffusers' ``from_pretrained`` argument for the dtype: 0.42 renamed ``torch_dtype`` to
    ``dtype`` (the old name warns)."""
    import diffusers

    return {"dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype": dtype}


def _call_kwargs(pipeline: Any, params: OmniDiffusionSamplingParams) -> dict[str, Any]:
    """The pipeline ``__call__`` arguments for ``params``; ValueError for one the pipeline lacks."""
    accepted = inspect.signature(pipeline.__call__).parameters
    wanted = {
        "num_inference_steps": params.num_inference_steps,
        "height": params.height,
        "width": params.width,
        "num_frames": params.num_frames,
        "guidance_scale": params.guidance_scale,
        "true_cfg_scale": params.true_cfg_scale,
        "negative_prompt": params.negative_prompt,
        "max_sequence_length": params.max_sequence_length,
    }
    kwargs = {}
    for name, value in wanted.items():
        if value is None:
            continue
        if name not in accepted:
            raise ValueError(f"{type(pipeline).__name__} does not take {name} (sampling parameter {name}={value!r})")
        kwargs[name] = value
    per_prompt = next((n for n in ("num_images_per_prompt", "num_videos_per_prompt") if n in accepted), None)
    if per_prompt is not None:
        kwargs[per_prompt] = params.num_outputs_per_prompt
    elif params.num_outputs_per_prompt != 1:
        raise ValueError(
            f"{type(pipeline).__name__} takes no number of outputs per prompt "
            f"(sampling parameter num_outputs_per_prompt={params.num_outputs_per_prompt})"
        )
    if params.seed is not None:
        kwargs["generator"] = torch.Generator("cpu").manual_seed(params.seed)
    return kwargs


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Callable) -> Iterator[None]:
    """Shadow the method ``name`` of ``obj`` with ``value`` (an instance attribute), then restore it."""
    setattr(obj, name, value)
    try:
        yield
    finally:
        delattr(obj, name)


def _compile(module: nn.Module, config: Fp8Config) -> None:
    """Compile ``module`` in place with omni_fp8. A diffusers denoiser compiles regionally, one
    graph per block class reused by all its blocks (a fraction of the whole model's compile time,
    the same speed); a text encoder compiles whole."""
    if getattr(module, "_repeated_blocks", None):
        module.compile_repeated_blocks(backend="omni_fp8", options=config.to_dict())
    else:
        module.compile(backend="omni_fp8", options=config.to_dict())


class Omni:
    """A diffusers pipeline from a local folder, with omni_fp8 on the components the config names.

    ``quantization="fp8"`` converts the denoiser(s) with the default options;
    ``quantization_config`` holds omni_fp8 options for the denoisers (``{"method": "fp8",
    "ignored_layers": ["img_mlp"]}``) or per component (``{"transformer": {...},
    "text_encoder": {...}}``). Converted components are compiled in place with
    ``backend="omni_fp8"`` unless ``enforce_eager`` (then their FP8 layers run eagerly: no
    compile time, slower kernels). ``cache_backend="tea_cache"`` with ``cache_config=
    {"rel_l1_thresh": 0.2}`` is handed to ``fp8_compile.caching.apply_cache``.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        quantization: str | None = None,
        quantization_config: Mapping[str, Any] | None = None,
        cache_backend: str | None = None,
        cache_config: Mapping[str, Any] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.bfloat16,
        enforce_eager: bool = False,
    ):
        # Everything a user can get wrong is checked before any weight is loaded.
        index = read_model_index(model)
        self.configs = component_configs(index, quantization, quantization_config)
        if enforce_eager and any(config.fp8_attention for config in self.configs.values()):
            raise ValueError(
                "omni_fp8 option 'fp8_attention' takes effect in compiled graphs, and enforce_eager compiles none; "
                "drop one of them"
            )
        _check_cache_backend(cache_backend, cache_config)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.enforce_eager = enforce_eager
        start = time.perf_counter()
        self.pipeline = self._load(model, dtype)
        self.load_seconds = time.perf_counter() - start
        self.reports: dict[str, QuantizationReport] = {}
        for name, config in self.configs.items():
            self.reports[name] = self._quantize(name, config)
        if cache_backend is not None:
            from fp8_compile import caching

            caching.apply_cache(self.pipeline, cache_backend, dict(cache_config or {}))
        if not enforce_eager:
            for name, config in self.configs.items():
                _compile(getattr(self.pipeline, name), config)

    def _load(self, model: str | os.PathLike, dtype: torch.dtype) -> Any:
        from diffusers import DiffusionPipeline

        pipeline = DiffusionPipeline.from_pretrained(os.fspath(model), **dtype_kwarg(dtype))
        pipeline.set_progress_bar_config(disable=None, leave=False)
        return pipeline.to(self.device)

    def _quantize(self, name: str, config: Fp8Config) -> QuantizationReport:
        module = getattr(self.pipeline, name)
        if not isinstance(module, nn.Module):
            raise ValueError(f"{type(self.pipeline).__name__}'s {name!r} is not loaded (it is {module!r})")
        return quantize_(module, config)

    def generate(
        self, prompts: str | Sequence[str], sampling_params: OmniDiffusionSamplingParams | None = None
    ) -> list[OmniRequestOutput]:
        """Generate for each prompt; returns one :class:`OmniRequestOutput` per prompt."""
        params = sampling_params or OmniDiffusionSamplingParams()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return [self._generate_one(prompt, params) for prompt in prompts]

    def _generate_one(self, prompt: str, params: OmniDiffusionSamplingParams) -> OmniRequestOutput:
        pipeline = self.pipeline
        kwargs = _call_kwargs(pipeline, params)
        clock = _StageClock(self.device, params.num_inference_steps)
        with contextlib.ExitStack() as patches:
            if hasattr(pipeline, "encode_prompt"):
                patches.enter_context(_patched(pipeline, "encode_prompt", clock.timed("text_encoding", pipeline.encode_prompt)))
            if getattr(pipeline, "vae", None) is not None:
                patches.enter_context(_patched(pipeline.vae, "decode", clock.timed("vae_decode", pipeline.vae.decode)))
            if "callback_on_step_end" in inspect.signature(pipeline.__call__).parameters:
                kwargs["callback_on_step_end"] = clock.on_step_end
            result = pipeline(prompt=prompt, output_type="pil", **kwargs)
        seconds = clock.finish()
        output = OmniRequestOutput(prompt, stages=clock.stages, step_seconds=clock.step_seconds, seconds=seconds)
        if hasattr(result, "frames"):
            output.frames = [list(video) for video in result.frames]
        else:
            output.images = list(result.images)
        peaks = [s.peak_memory_bytes for s in clock.stages.values() if s.peak_memory_bytes is not None]
        output.peak_memory_bytes = max(peaks) if peaks else None
        return output
