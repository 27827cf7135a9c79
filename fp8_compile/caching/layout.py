"""Tensor layouts as torch.compile's guards see them, and rebuilding tensors to match one.

A compiled frame is guarded on the sizes and strides of its tensor inputs and, for an input that
is a view, on its base and on which other inputs share that base (FLUX's single blocks return
the text and image streams as two slices of one joint tensor). A cache that passes a block's
inputs on in place of its outputs must hand the next compiled frame tensors of the same layout,
or that frame is compiled again for the skipped steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Layout:
    shape: torch.Size
    stride: tuple[int, ...]
    offset: int
    base: int | None  # for a view, the index of its base among the distinct bases of its siblings
    base_shape: torch.Size | None
    base_stride: tuple[int, ...] | None


def layouts_of(tensors: Sequence[torch.Tensor]) -> tuple[Layout, ...]:
    bases: list[torch.Tensor] = []
    layouts = []
    for tensor in tensors:
        base = tensor._base
        index = None
        if base is not None:
            index = next((i for i, seen in enumerate(bases) if seen is base), len(bases))
            if index == len(bases):
                bases.append(base)
        layouts.append(
            Layout(
                tensor.shape, tensor.stride(), tensor.storage_offset(), index,
                None if base is None else base.shape, None if base is None else base.stride(),
            )
        )
    return tuple(layouts)


def with_layouts(tensors: Sequence[torch.Tensor], layouts: Sequence[Layout]) -> tuple[torch.Tensor, ...]:
    """``tensors`` laid out as ``layouts`` say: themselves where they already are, else copies."""
    tensors = tuple(tensors)
    shapes_differ = any(t.shape != layout.shape for t, layout in zip(tensors, layouts, strict=True))
    if shapes_differ or layouts_of(tensors) == tuple(layouts):
        return tensors
    bases: dict[int, torch.Tensor] = {}
    rebuilt = []
    for tensor, layout in zip(tensors, layouts, strict=True):
        if layout.base is None:
            target = torch.empty_strided(layout.shape, layout.stride, dtype=tensor.dtype, device=tensor.device)
        else:
            if layout.base not in bases:
                bases[layout.base] = torch.empty_strided(
                    layout.base_shape, layout.base_stride, dtype=tensor.dtype, device=tensor.device
                )
            target = bases[layout.base].as_strided(layout.shape, layout.stride, layout.offset)
        rebuilt.append(target.copy_(tensor))
    return tuple(rebuilt)
