"""The per-layer SQNR chart (matplotlib, an optional dependency: ``pip install 'fp8-compile[validate]'``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from fp8_compile.validation.capture import LayerError


def _clip(values: list[float], ceiling: float) -> list[float]:
    """Infinite SQNR (a value equal to BF16's) is drawn at the top of the chart."""
    return [min(v, ceiling) if not math.isnan(v) else float("nan") for v in values]


def plot_layer_sqnr(layers: Sequence[LayerError], path: Path, title: str, collapse_db: float) -> Path:
    """Output SQNR of every layer along depth, one colour per layer family (hollow markers: layers
    kept in BF16), with the input SQNR as a grey line and the collapse threshold dashed."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    finite = [v for e in layers for v in (e.input_sqnr_db, e.output_sqnr_db) if math.isfinite(v)]
    ceiling = (max(finite) if finite else 60.0) + 5
    fig, ax = plt.subplots(figsize=(max(8.0, len(layers) * 0.12), 4.5))
    x = [e.index for e in layers]
    ax.plot(x, _clip([e.input_sqnr_db for e in layers], ceiling), color="0.6", lw=1, label="layer input (top: equal to BF16)")
    families = list(dict.fromkeys(e.family for e in layers))
    colours = plt.get_cmap("tab20")
    for i, family in enumerate(families):
        members = [e for e in layers if e.family == family]
        colour = colours(i % 20)
        for kept in (False, True):
            group = [e for e in members if (e.decision == "bf16") == kept]
            if group:
                ax.scatter(
                    [e.index for e in group],
                    _clip([e.output_sqnr_db for e in group], ceiling),
                    s=18,
                    facecolors="none" if kept else colour,
                    edgecolors=colour,
                    label=None if kept else family,
                )
    ax.axhline(collapse_db, color="red", ls="--", lw=1, label=f"collapse ({collapse_db:g} dB)")
    ax.set_xlabel("layer, in the order it ran")
    ax.set_ylabel("output SQNR vs BF16 (dB)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
