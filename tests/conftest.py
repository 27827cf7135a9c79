import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from fp8_compile.zoo import DITS, Resolution, first_output  # noqa: F401  (re-exported for the tests)

CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]

# A small image: 64 image tokens for the FLUX-like models, a few frames for the video ones.
SMALL = Resolution(height=128, width=128, frames=5, text_tokens=16)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts with empty Dynamo caches and counters."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def cosine(out: torch.Tensor, ref: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(out.flatten().float(), ref.flatten().float(), dim=0).item()


def unique_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def build(name: str, seed: int = 0, device="cpu", dtype=torch.bfloat16):
    """A tiny model of the given architecture and inputs for it (both seeded)."""
    spec = DITS[name]
    torch.manual_seed(seed)
    model = spec.build("tiny", dtype, device)
    torch.manual_seed(seed + 1)
    return model, spec.inputs(model, SMALL, dtype, device)


@pytest.fixture
def tiny_flux():
    """A BF16 tiny FLUX, its inputs and an untouched copy."""
    model, inputs = build("flux")
    return model, inputs, copy.deepcopy(model)


@pytest.fixture
def tiny_flux_fp32():
    """The same in float32, where Inductor's fused kernels and eager code round alike, so a
    compiled FP8 model must match the same FP8 model run eagerly almost exactly. (In BF16 the
    tiny FLUX differs by ~4% between eager and compiled even without FP8, from intermediates
    that Inductor keeps in float32.)"""
    model, inputs = build("flux", dtype=torch.float32)
    return model, inputs, copy.deepcopy(model)
