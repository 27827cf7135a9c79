"""Lower to Inductor: the settings and the one heuristic the FP8 graphs need.

Row-wise dynamic quantization reduces a row (its amax) and then rewrites the same row (the
scaled FP8 cast). Inductor emits that as one kernel, reading the row once, only when the
reduction is *persistent* (the row held on chip); its default heuristic allows that up to
1024 elements, while DiT rows are 3072 to 15360 wide, so it emitted a reduction kernel and a
second kernel that read the row again. :class:`Fp8InductorChoices` allows persistent inner
reductions up to :data:`PERSISTENT_REDUCTION_LIMIT` elements in the kernels that write an FP8
tensor: norm + modulation + amax + cast becomes one pass over the activation. Other
reductions keep Inductor's heuristic: forced persistent, Wan2.2's q/k RMSNorm + RoPE over
5120 channels took 1233 ms per forward instead of 56 (H100, 32760 tokens).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch._inductor.choices import InductorChoices
from torch._inductor.compile_fx import compile_fx
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V

PERSISTENT_REDUCTION_LIMIT = 16384
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


class Fp8InductorChoices(InductorChoices):
    @staticmethod
    def should_use_persistent_reduction(features, cooperative_reduction: bool) -> bool:
        numel = features.reduction_numel
        if (
            not cooperative_reduction
            and features.get_reduction_hint() == ReductionHint.INNER
            and V.graph.sizevars.statically_known_leq(numel, PERSISTENT_REDUCTION_LIMIT)
            and writes_fp8(features)
        ):
            return True
        return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)

    def uuid(self) -> str:
        return f"fp8_compile.Fp8InductorChoices:persistent<={PERSISTENT_REDUCTION_LIMIT},fp8-writers"


def writes_fp8(features) -> bool:
    """Whether the kernel stores an FP8 tensor: an activation quantization fused into its producer."""
    return any(node.node.get_dtype() in FP8_DTYPES for node in features.scheduler_nodes())


def config_patches(device: torch.device, mode: str | None, cudagraphs: bool) -> dict:
    """Inductor settings for a graph of this backend on ``device``, in torch.compile ``mode``."""
    patches = dict(torch._inductor.list_mode_options(mode)) if mode else {}
    if cudagraphs:
        patches["triton.cudagraphs"] = True
    if hasattr(torch._inductor.config, "inductor_choices_class"):
        # Newer Inductor takes the heuristic from its config, whose cache key includes uuid().
        patches["inductor_choices_class"] = Fp8InductorChoices
    if device.type == "cpu":
        # With 512-bit vectors, Inductor's C++ kernels store 32-lane float8 vectors as 64
        # bytes, overwriting the next row (NaNs in Wan's attention). 256-bit vectors are right.
        patches["cpp.simdlen"] = 256
    return patches


@contextlib.contextmanager
def _fp8_choices() -> Iterator[None]:
    with V.set_choices_handler(Fp8InductorChoices()):
        yield


def compile_graph(
    gm: torch.fx.GraphModule, example_inputs: list, device: torch.device, mode: str | None, cudagraphs: bool
) -> Callable:
    """Inductor's compile_fx with this backend's settings and heuristic."""
    with _fp8_choices():
        return compile_fx(gm, example_inputs, config_patches=config_patches(device, mode, cudagraphs))
