"""Per-layer capture: forward hooks on every linear layer record (a sample of) what goes in and
what comes out, so that a BF16 run and an FP8 run of the same inputs can be compared layer by
layer, in the order the layers ran.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from fp8_compile.validation.groups import layer_family
from fp8_compile.validation.metrics import ErrorSums

# (input rows, output rows) of one call of one layer
Call = tuple[torch.Tensor, torch.Tensor]


def sample_rows(t: torch.Tensor, max_rows: int) -> torch.Tensor:
    """Up to ``max_rows`` evenly spaced rows (tokens) of ``t`` flattened to [M, features], as
    float32 on the CPU. Both runs see the same M, so they keep the same rows; the cap bounds the
    memory a full-size model's activations would take."""
    rows = t.detach().reshape(-1, t.shape[-1])
    if rows.shape[0] > max_rows:
        index = torch.linspace(0, rows.shape[0] - 1, max_rows, device=rows.device).round().long()
        rows = rows[index]
    return rows.float().cpu()


class LayerRecorder:
    """Forward hooks on every ``nn.Linear`` (``ScaledLinear`` included) of ``model``; they record
    only between :meth:`start` and :meth:`stop`. :meth:`remove` takes the hooks off."""

    def __init__(self, model: nn.Module, max_rows: int = 256):
        self.max_rows = max_rows
        self.calls: dict[str, list[Call]] = {}  # insertion order = the order the layers first ran
        self._active = False
        self._handles = [
            module.register_forward_hook(partial(self._record, name), with_kwargs=True)
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear)
        ]

    def _record(self, name: str, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: torch.Tensor) -> None:
        if not self._active:
            return
        x = args[0] if args else kwargs["input"]
        self.calls.setdefault(name, []).append((sample_rows(x, self.max_rows), sample_rows(output, self.max_rows)))

    def start(self) -> None:
        self._active = True

    def stop(self) -> None:
        self._active = False

    def remove(self) -> None:
        self._active = False
        for handle in self._handles:
            handle.remove()


@dataclass
class LayerError:
    """One layer's input and output in the FP8 run against the BF16 run."""

    index: int  # position in the order the layers first ran (the depth axis)
    name: str
    family: str
    decision: str  # "fp8", "weight_only" or "bf16", from the FP8 model's quantization report
    calls: int
    input_sqnr_db: float
    input_rel_error: float
    output_sqnr_db: float
    output_rel_error: float


def compare_layers(
    reference: Mapping[str, list[Call]], test: Mapping[str, list[Call]], decisions: Mapping[str, str]
) -> list[LayerError]:
    """Errors of every layer that ran in both runs, in the reference run's order. A layer called
    several times per forward is compared call by call and summed over its calls."""
    errors = []
    for name, ref_calls in reference.items():
        test_calls = test.get(name, [])
        if not test_calls:
            continue
        inputs, outputs = ErrorSums(), ErrorSums()
        for (ref_in, ref_out), (test_in, test_out) in zip(ref_calls, test_calls):
            inputs.add(ref_in, test_in)
            outputs.add(ref_out, test_out)
        errors.append(
            LayerError(
                index=len(errors),
                name=name,
                family=layer_family(name),
                decision=decisions.get(name, "bf16"),
                calls=min(len(ref_calls), len(test_calls)),
                input_sqnr_db=inputs.sqnr_db,
                input_rel_error=inputs.relative_error,
                output_sqnr_db=outputs.sqnr_db,
                output_rel_error=outputs.relative_error,
            )
        )
    return errors


def first_collapse(layers: list[LayerError], threshold_db: float) -> LayerError | None:
    """The first layer, in depth order, whose output SQNR falls below ``threshold_db``: where a
    broken layer (a wrong scale, an overflow) first shows, since every layer after it inherits
    its error through its input."""
    return next((layer for layer in layers if layer.output_sqnr_db < threshold_db), None)
