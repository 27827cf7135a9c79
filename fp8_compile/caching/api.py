"""``apply_cache``: one entry point for TeaCache and diffusers' own caches, on a pipeline or a denoiser."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import diffusers
import diffusers.hooks
import torch.nn as nn
from diffusers.hooks import HookRegistry
from diffusers.models.cache_utils import CacheMixin
from packaging.version import Version

from fp8_compile.caching.specs import TEACACHE_MODELS, teacache_model_of
from fp8_compile.caching.teacache import TeaCacheConfig, apply_teacache, non_negative_number, refuse_second_cache

TEA_CACHE = "tea_cache"
# cache_backend -> (diffusers config class, the function applying it to a model that is not a CacheMixin)
DIFFUSERS_CACHES: dict[str, tuple[str, str]] = {
    "first_block_cache": ("FirstBlockCacheConfig", "apply_first_block_cache"),
    "mag_cache": ("MagCacheConfig", "apply_mag_cache"),
    "taylorseer_cache": ("TaylorSeerCacheConfig", "apply_taylorseer_cache"),
}
DENOISER_COMPONENTS = ("transformer", "transformer_2")  # Wan2.2 A14B has two experts

# Combinations that fail inside diffusers (<= 0.42.1, the version tested) at the first denoiser
# call; refused when the cache is applied instead.
LAST_BROKEN_DIFFUSERS = Version("0.42.1")
_READS_HIDDEN_STATES = "its hooks read a 'hidden_states' argument, which Z-Image's blocks call 'x'"
BROKEN_IN_DIFFUSERS: dict[tuple[str, str], str] = {
    ("first_block_cache", "ZImageTransformer2DModel"): _READS_HIDDEN_STATES,
    ("mag_cache", "ZImageTransformer2DModel"): _READS_HIDDEN_STATES,
    ("first_block_cache", "Flux2Transformer2DModel"): "its last-block hook fails on the single blocks' joint output",
}


def cache_backends() -> list[str]:
    """The cache_backend names this installation accepts (diffusers' caches as far as it has them)."""
    available = [name for name, (config, _) in DIFFUSERS_CACHES.items() if hasattr(diffusers.hooks, config)]
    return sorted([TEA_CACHE, *available])


def apply_cache(
    pipeline_or_denoiser: Any, cache_backend: str, cache_config: Mapping[str, Any] | None = None
) -> list[nn.Module]:
    """Apply a step cache to a diffusers pipeline's denoiser(s) or to one denoiser; returns them.

        apply_cache(pipe, "tea_cache", {"rel_l1_thresh": 0.2})
        apply_cache(pipe.transformer, "first_block_cache", {"threshold": 0.05})

    Apply it before the first call, compiled or not. Every input is checked before any model is
    touched: an unknown backend, a bad or unknown ``cache_config`` key or a denoiser the backend
    does not support raises a ValueError naming the choices.
    """
    config = parse_cache_config(cache_backend, cache_config)
    denoisers, scheduler = _denoisers_of(pipeline_or_denoiser)
    for denoiser in denoisers:
        refuse_second_cache(denoiser)
    if cache_backend == TEA_CACHE:
        for denoiser in denoisers:
            teacache_model_of(denoiser)
        for denoiser in denoisers:
            apply_teacache(denoiser, config, scheduler)
    else:
        for denoiser in denoisers:
            _refuse_known_failure(denoiser, cache_backend)
        for denoiser in denoisers:
            _apply_diffusers_cache(denoiser, cache_backend, config)
    return denoisers


def parse_cache_config(cache_backend: str, cache_config: Mapping[str, Any] | None) -> Any:
    """The validated config of ``cache_backend``: a TeaCacheConfig or diffusers' config object.

    Needs no model, so user input can be checked before one is loaded; raises a ValueError
    naming the valid backends or keys.
    """
    backends = cache_backends()
    if not isinstance(cache_backend, str) or cache_backend not in backends:
        raise ValueError(f"unknown cache_backend {cache_backend!r}; choose one of: {', '.join(backends)}")
    if cache_backend == TEA_CACHE:
        return TeaCacheConfig.from_options(cache_config)
    return _diffusers_config(cache_backend, cache_config)


def reset_cache(pipeline_or_denoiser: Any) -> None:
    """Forget every cached step (TeaCache's or diffusers'), as pipelines do at the end of a generation."""
    for denoiser in _denoisers_of(pipeline_or_denoiser)[0]:
        HookRegistry.check_if_exists_or_initialize(denoiser).reset_stateful_hooks()


def _denoisers_of(obj: Any) -> tuple[list[nn.Module], Any]:
    """The denoisers of a pipeline (with its scheduler) or the module itself (unwrapped from torch.compile)."""
    if isinstance(obj, nn.Module):
        return [getattr(obj, "_orig_mod", obj)], None
    if not hasattr(obj, "components"):
        raise TypeError(f"apply_cache takes a diffusers pipeline or a denoiser nn.Module, got {type(obj).__name__}")
    components = [getattr(obj, name, None) for name in DENOISER_COMPONENTS]
    denoisers = [getattr(c, "_orig_mod", c) for c in components if c is not None]
    if not denoisers:
        raise ValueError(
            f"{type(obj).__name__} has no denoiser component ({' or '.join(DENOISER_COMPONENTS)}) to cache"
        )
    return denoisers, getattr(obj, "scheduler", None)


def _diffusers_config(cache_backend: str, options: Mapping[str, Any] | None) -> Any:
    config_class = getattr(diffusers.hooks, DIFFUSERS_CACHES[cache_backend][0])
    options = dict(options or {})
    known = [field.name for field in dataclasses.fields(config_class)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown {cache_backend} cache_config key {unknown[0]!r}; valid keys: {', '.join(known)}")
    if "threshold" in options:
        options["threshold"] = non_negative_number("threshold", options["threshold"])
    return config_class(**options)


def _refuse_known_failure(denoiser: nn.Module, cache_backend: str) -> None:
    reason = BROKEN_IN_DIFFUSERS.get((cache_backend, type(denoiser).__name__))
    if reason is not None and Version(diffusers.__version__) <= LAST_BROKEN_DIFFUSERS:
        raise ValueError(
            f"diffusers' {cache_backend} fails on {type(denoiser).__name__} in diffusers {diffusers.__version__}: "
            f"{reason}; use cache_backend={TEA_CACHE!r}"
        )


def _apply_diffusers_cache(denoiser: nn.Module, cache_backend: str, config: Any) -> None:
    try:
        if isinstance(denoiser, CacheMixin):
            denoiser.enable_cache(config)
            return
        # ZImageTransformer2DModel, for one, is not a CacheMixin; diffusers' apply_* functions take any model.
        getattr(diffusers.hooks, DIFFUSERS_CACHES[cache_backend][1])(denoiser, config)
    except ValueError as e:  # e.g. "Model class ... not registered." for blocks diffusers' caches do not know
        raise ValueError(
            f"diffusers' {cache_backend} cannot be applied to {type(denoiser).__name__}: {e} "
            f"(cache_backend={TEA_CACHE!r} supports {', '.join(sorted(TEACACHE_MODELS))})"
        ) from e
    HookRegistry.check_if_exists_or_initialize(denoiser).invalidate_child_registries_cache()
