"""Which FP8 lowering the compiling device supports."""

from __future__ import annotations

import torch

from fp8_compile.passes.graph import Lowering


def device_of(example_inputs: list) -> torch.device:
    """The accelerator the graph runs on (the CPU when no input lives on one)."""
    for value in example_inputs:
        if isinstance(value, torch.Tensor) and value.device.type != "cpu":
            return value.device
    return torch.device("cpu")


def select_lowering(device: torch.device) -> Lowering:
    """W8A8 where FP8 tensor cores exist (SM89+) and on the CPU reference; weight-only on SM80-SM88."""
    if device.type == "cpu":
        return Lowering.W8A8
    if device.type == "cuda" and torch.version.hip is None:
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
        f"omni_fp8 does not support device {device} yet (ROCm's FP8 is e4m3fnuz, other devices have no FP8 "
        "lowering here); compile with the default backend for BF16"
    )
