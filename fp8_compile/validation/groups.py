"""Layer groups by name: the families and block ranges that sensitivity analysis quantizes one
at a time, each expressed as ``ignored_layers`` patterns so that a suggestion can be pasted.

A layer name is read as ``<container>.<block index>.<rest>`` when it has a numeric component
(``transformer_blocks.3.img_mlp.net.0.proj``), else as a top-level layer (``proj_out``).

* Its **family** is the first component of ``rest`` (``img_mlp``, ``ff``, ``norm1``), except
  inside attention modules (a second component starting with ``to_`` or ``add_``), which split
  into query/key/value projections (``attn.to_q/k/v``, ``attn.add_q/k/v_proj``) and every other
  projection on its own (``attn.to_out``, ``attn.to_add_out``). A top-level layer's family is
  its first component (``x_embedder``, ``proj_out``).
* A **block range** is a run of consecutive blocks of one container (``transformer_blocks.0``
  to ``transformer_blocks.4``). A numbered linear with nothing after its index
  (``t_embedder.mlp.0``) is a layer of a Sequential, not a block, and belongs to the family of
  its top-level module.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from fp8_compile.patterns import LayerPatterns

_QKV = re.compile(r"to_[qkv]")
_ADDED_QKV = re.compile(r"add_[qkv]_proj")


@dataclass(frozen=True)
class LayerGroup:
    name: str  # for people: "ff", "attn.to_q/k/v", "transformer_blocks.0-4"
    patterns: tuple[str, ...]  # ignored_layers patterns that select exactly this group
    layers: tuple[str, ...]  # the layer names the patterns match


def split_block(name: str) -> tuple[str | None, int | None, list[str]]:
    """``(container, block index, rest)``; container and index are None for a top-level layer."""
    parts = name.split(".")
    for i, part in enumerate(parts[1:], start=1):
        if part.isdigit():
            return ".".join(parts[:i]), int(part), parts[i + 1 :]
    return None, None, parts


def _family(name: str) -> tuple[str, tuple[str, ...]]:
    """(family name, the patterns of the whole family) of one layer."""
    container, _, rest = split_block(name)
    if container is None or not rest:  # top level, or a linear indexed in a Sequential (``mlp.0``)
        top = name.split(".")[0]
        return top, (top,)
    module = rest[0]
    if len(rest) >= 2 and rest[1].startswith(("to_", "add_")):
        if _QKV.fullmatch(rest[1]):
            return f"{module}.to_q/k/v", tuple(f"{module}.to_{x}" for x in "qkv")
        if _ADDED_QKV.fullmatch(rest[1]):
            return f"{module}.add_q/k/v_proj", tuple(f"{module}.add_{x}_proj" for x in "qkv")
        return f"{module}.{rest[1]}", (f"{module}.{rest[1]}",)
    return module, (module,)


def layer_family(name: str) -> str:
    return _family(name)[0]


def _matched(patterns: Sequence[str], names: Sequence[str]) -> tuple[str, ...]:
    matcher = LayerPatterns(patterns)
    return tuple(n for n in names if matcher.first_match(n) is not None)


def family_groups(names: Sequence[str]) -> list[LayerGroup]:
    """One group per family, in order of first appearance; its layers are everything its
    patterns match (``proj_out`` also matches the FLUX single blocks' ``proj_out``, and the
    group says so)."""
    groups: dict[tuple[str, ...], str] = {}
    for name in names:
        family, patterns = _family(name)
        groups.setdefault(patterns, family)
    return [LayerGroup(family, patterns, _matched(patterns, names)) for patterns, family in groups.items()]


def block_range_groups(names: Sequence[str], ranges_per_container: int) -> list[LayerGroup]:
    """Each block container cut into up to ``ranges_per_container`` runs of consecutive blocks."""
    blocks: dict[str, set[int]] = {}
    for name in names:
        container, index, rest = split_block(name)
        if container is not None and rest:  # ``t_embedder.mlp.0`` is a layer of a Sequential, not a block
            blocks.setdefault(container, set()).add(index)
    groups = []
    for container, indices in blocks.items():
        ordered = sorted(indices)
        size = -(-len(ordered) // max(1, ranges_per_container))  # ceiling division
        for start in range(0, len(ordered), size):
            run = ordered[start : start + size]
            label = f"{container}.{run[0]}" if len(run) == 1 else f"{container}.{run[0]}-{run[-1]}"
            patterns = tuple(f"{container}.{i}" for i in run)
            groups.append(LayerGroup(label, patterns, _matched(patterns, names)))
    return groups


def candidate_groups(names: Sequence[str], ranges_per_container: int = 4) -> list[LayerGroup]:
    """Families, then block ranges, of the given layers; groups matching nothing are dropped."""
    groups = family_groups(names) + block_range_groups(names, ranges_per_container)
    return [group for group in groups if group.layers]
