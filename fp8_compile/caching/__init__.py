"""Step caches for the denoisers, composable with the omni_fp8 backend and torch.compile.

    from fp8_compile.caching import apply_cache
    apply_cache(pipe, "tea_cache", {"rel_l1_thresh": 0.2})          # ours, see teacache.py
    apply_cache(pipe, "first_block_cache", {"threshold": 0.05})     # diffusers' own caches

See docs/caching.md.
"""

from fp8_compile.caching.api import TEA_CACHE, apply_cache, cache_backends, parse_cache_config, reset_cache
from fp8_compile.caching.teacache import TeaCacheConfig, teacache_pattern

__all__ = [
    "TEA_CACHE",
    "TeaCacheConfig",
    "apply_cache",
    "cache_backends",
    "parse_cache_config",
    "reset_cache",
    "teacache_pattern",
]
