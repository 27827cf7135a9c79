"""Layer-name patterns, as used by ``ignored_layers`` and ``conditioning_layers``.

A pattern is matched against a layer's qualified name relative to the model being converted,
e.g. ``transformer_blocks.3.img_mlp.net.0.proj``:

* a plain name matches when it equals one dotted component or a run of components:
  ``img_mlp``, ``img_mlp.net`` and ``transformer_blocks.3`` all match the name above, ``mlp``
  does not (components are compared whole, so ``to_q`` never matches ``add_q_proj``);
* a glob (containing ``*``, ``?`` or ``[``) matches the whole name: ``*.to_q``,
  ``transformer_blocks.1?.*``;
* ``re:<regex>`` matches the whole name with :func:`re.fullmatch`: ``re:.*attn\\.to_(q|k|v)``.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LayerPattern:
    text: str

    def __post_init__(self) -> None:
        if self.text.startswith("re:"):
            try:
                re.compile(self.text[3:])
            except re.error as e:
                raise ValueError(f"layer pattern {self.text!r} is not a valid regular expression: {e}") from None

    def matches(self, name: str) -> bool:
        if self.text.startswith("re:"):
            return re.fullmatch(self.text[3:], name) is not None
        if any(c in self.text for c in "*?["):
            return fnmatch.fnmatchcase(name, self.text)
        wanted = self.text.split(".")
        parts = name.split(".")
        n = len(wanted)
        return any(parts[i : i + n] == wanted for i in range(len(parts) - n + 1))


class LayerPatterns:
    """An ordered list of patterns."""

    def __init__(self, patterns: Iterable[str]):
        self.patterns = [LayerPattern(p) for p in patterns]

    def first_match(self, name: str) -> str | None:
        """The first pattern that matches ``name`` (its text), or None."""
        return next((p.text for p in self.patterns if p.matches(name)), None)


def closest_names(pattern: str, names: Sequence[str], n: int = 3) -> list[str]:
    """Layer names (or runs of their components) that look most like ``pattern``."""
    text = pattern[3:] if pattern.startswith("re:") else pattern
    width = text.count(".") + 1
    candidates: set[str] = set()
    for name in names:
        parts = name.split(".")
        candidates.update(".".join(parts[i : i + width]) for i in range(len(parts) - width + 1))
    return difflib.get_close_matches(text, sorted(candidates), n=n, cutoff=0.5)


SHOWN_NAMES = 5  # offending layers or tensors an error names


def shown_names(names: Iterable[str], shown: int = SHOWN_NAMES) -> str:
    """The first ``shown`` names, quoted, and how many more there are: the offenders an error names."""
    names = list(names)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(repr(n) for n in names[:shown]) + more
