"""Which FP8 lowering the compiling device supports.

| device | lowering |
|---|---|
| NVIDIA SM89+ (Ada, Hopper, Blackwell) | W8A8: FP8 x FP8 GEMM |
| NVIDIA SM80-SM88 (Ampere) | weight-only: FP8 weights, dequantized inside a BF16 GEMM (few rows) or slice by slice before cuBLAS (1024+ rows) |
| older NVIDIA | error: no BF16 tensor cores for the weight-only kernel |
| CPU | W8A8 reference (``torch._scaled_mm`` runs on the CPU) |
| ROCm | error: its FP8 is e4m3fnuz, another format than the e4m3fn weights made here |
| anything else (XPU, MPS, ...) | error naming the device |

The errors are raised before any weight is converted, so the model is left as it was and can
be compiled with the default backend.
"""

from __future__ import annotations

import torch

from fp8_compile.passes.graph import Lowering


def device_of(example_inputs: list) -> torch.device:
    """The accelerator the graph runs on (the CPU when no input lives on one)."""
    for value in example_inputs:
        if isinstance(value, torch.Tensor) and value.device.type != "cpu":
            return value.device
    return torch.device("cpu")


def _device_lowering(device: torch.device) -> Lowering:
    """The best lowering ``device`` supports, or a clear error."""
    if device.type == "cpu":
        return Lowering.W8A8
    if device.type == "cuda" and torch.version.hip is not None:
        raise RuntimeError(
            f"omni_fp8 does not support ROCm device {device}: its FP8 format is e4m3fnuz, while omni_fp8 "
            "stores e4m3fn weights; compile with the default backend (BF16) instead"
        )
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability >= (8, 9):
            return Lowering.W8A8
        if capability >= (8, 0):
            return Lowering.WEIGHT_ONLY
        raise RuntimeError(
            f"omni_fp8 needs an NVIDIA GPU of compute capability 8.0 or newer; "
            f"{torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}"
        )
    raise RuntimeError(
        f"omni_fp8 has no FP8 lowering for device type {device.type!r} ({device}); "
        "compile with the default backend (BF16) instead"
    )


def select_lowering(device: torch.device, requested: str = "auto") -> Lowering:
    """The lowering for ``device``: the ``lowering`` option when forced, else the device's best.

    Forcing ``"weight_only"`` works wherever FP8 works (it is how SM80 runs, so it can be
    tested and measured on newer GPUs); forcing ``"w8a8"`` where the device has no FP8 GEMM
    is an error.
    """
    best = _device_lowering(device)
    if requested == "auto":
        return best
    forced = Lowering(requested)
    if forced is Lowering.W8A8 and best is not Lowering.W8A8:
        raise ValueError(
            f"omni_fp8 option 'lowering'='w8a8' needs FP8 tensor cores (compute capability 8.9+), "
            f"which {device} lacks; use 'weight_only' or 'auto'"
        )
    return forced
